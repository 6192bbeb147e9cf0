/**
 * The `sim` machine driver: a whole two-disk machine modelled in a directory, for tests, the
 * demo and the fleet benchmark. The install steps run the same code against it as against a
 * real host; only the disks, the firmware and the power button are simulated.
 *
 * Layout of a machine directory DIR (contract for tests and the demo):
 *
 *   DIR/machine.json      hardware + firmware + partition tables (SimState, sim-state.ts): host id, NICs
 *                         (name, MAC), boot entries {default, once, rescue}, disks and their
 *                         partitions {name, role, filesystem}, fault flags, reboot counter,
 *                         pending-reboot flag, boot log (last 50 boots).
 *   DIR/running.json      what runs now, written only by the firmware (simBoot) and reboot():
 *                         {state: 'running', id, version, device, boot, at} | {state: 'rebooting'|'down', …}
 *   DIR/actions.jsonl     append-only log of every effect the driver had (one JSON object a line:
 *                         {at, pid, op, …}); no-ops are not logged, so a test can prove that an
 *                         effect happened once. A torn last line (kill -9) is ignored on read.
 *   DIR/disks/<disk>/<pN>/  the filesystem of partition <disk><pN> (a root tree, a bundle store…);
 *                         present exactly when the partition has a filesystem.
 *   DIR/machine.lock      short-lived write lock, a pid lock (../lock.ts: holder's pid, boot id and start
 *                         time); the lock of a dead holder is taken over.
 *   DIR/agent.lock        the agent's machine lock (same module), held for the agent's life.
 *   DIR/.tmp-<pid>-*, .trash-*  temp files of atomic writes (shared/fs-atomic.ts) and of the lock, and
 *                         partitions being deleted; those of dead processes are removed at boot.
 *
 * This file owns the driver (SimMachine: disks, partitions, installs, boot entries, reboot).
 * The rest lives beside it and is re-exported here: the state files, their atomic writes and
 * the lock (sim-state.ts), the firmware with its boot semantics and faults (sim-firmware.ts),
 * and machine creation (sim-init.ts).
 */
import { promises as fsp } from 'node:fs';
import { scError } from '../../../shared/errors.js';
import { NET_FORMATS, type NetFormat } from '../../../shared/manifest.js';
import { apply, capture, type Nic } from '../carry/index.js';
import type { CarryConfig } from '../carry/types.js';
import {
  type BootConfig,
  DISK_RE,
  type DiskInfo,
  type ExitAction,
  type InstalledOs,
  type InstallMark,
  type MachineDriver,
  type MachineInspect,
  type PartitionInfo,
  type PartitionSpec,
  processExit,
  type RunningOs,
  validateLayout,
} from './driver.js';
import { identityAt, installedOsAt, writeMarker } from './os.js';
import {
  logAction,
  partitionOf,
  paths,
  readSimRunning,
  readSimState,
  removeTree,
  type SimRunning,
  type SimState,
  simStateSchema,
  splitDevice,
  updateState,
  writeJsonAtomic,
} from './sim-state.js';

export { type SimBootResult, simBoot, simClearFaults, simFault, simRebootPending } from './sim-firmware.js';
export { initSimMachine, type SimInitOptions } from './sim-init.js';
export { type BootRecord, readActionLog, readSimRunning, readSimState, type SimAction, type SimRunning, type SimState, writeJsonAtomic } from './sim-state.js';

/** Options of a SimMachine. */
export interface SimMachineOptions {
  /** How reboot() ends the agent (default: process.exit). See ExitAction. */
  exit?: ExitAction;
}

/** The sim MachineDriver over a machine directory (see the layout at the top of this file). */
export class SimMachine implements MachineDriver {
  readonly kind = 'sim' as const;
  readonly dir: string;
  readonly #exit: ExitAction;

  constructor(dir: string, opts: SimMachineOptions = {}) {
    this.dir = dir;
    this.#exit = opts.exit ?? processExit;
  }

  async hostId(): Promise<string> {
    return (await readSimState(this.dir)).hostId;
  }

  async running(): Promise<RunningOs> {
    const r = await readSimRunning(this.dir);
    if (r.state !== 'running') throw scError('SC_ERR_BOOT_FAILED', `machine is ${r.state}${r.state === 'down' ? `: ${r.reason}` : ''}`);
    return { id: r.id, version: r.version, device: r.device };
  }

  async #runningDevice(): Promise<string | null> {
    const r = await readSimRunning(this.dir);
    return r.state === 'running' ? r.device : null;
  }

  async #partitionInfo(disk: string, p: SimState['disks'][string]['partitions'][number]): Promise<PartitionInfo> {
    const device = `${disk}${p.name}`;
    const dirp = paths(this.dir).part(disk, p.name);
    const os = p.filesystem ? await installedOsAt(dirp) : null;
    return {
      device,
      name: p.name,
      role: p.role as PartitionInfo['role'],
      filesystem: p.filesystem,
      empty: p.filesystem ? await dirEmpty(dirp) : true,
      os: os ? { id: os.id, version: os.version } : null,
    };
  }

  async disks(): Promise<DiskInfo[]> {
    const s = await readSimState(this.dir);
    const out: DiskInfo[] = [];
    for (const [name, d] of Object.entries(s.disks).sort()) {
      out.push({ name, partitions: await Promise.all(d.partitions.map((p) => this.#partitionInfo(name, p))) });
    }
    return out;
  }

  async inspect(): Promise<MachineInspect> {
    const s = await readSimState(this.dir);
    const r = await readSimRunning(this.dir);
    const running = r.state === 'running' ? { id: r.id, version: r.version, device: r.device } : null;
    const disks: MachineInspect['disks'] = {};
    for (const d of await this.disks()) disks[d.name] = { partitions: d.partitions };
    let netFormat: NetFormat | null = null;
    let ident: Awaited<ReturnType<typeof identityAt>> | null = null;
    if (running) {
      const { disk, part } = splitDevice(running.device);
      const root = paths(this.dir).part(disk, part);
      netFormat = (await installedOsAt(root))?.netFormat ?? null;
      if (netFormat) ident = await identityAt(root, netFormat, s.nics);
    }
    return {
      driver: 'sim',
      hostId: s.hostId,
      hostname: ident?.hostname ?? null,
      state: r.state,
      bootDevice: s.boot.default,
      bootOnce: s.boot.once,
      rescueEntry: s.boot.rescue,
      running,
      netFormat,
      ip: ident?.ip ?? null,
      addresses: ident?.addresses ?? [],
      gateway: ident?.gateway ?? null,
      mac: ident?.mac ?? null,
      hostKeyFingerprint: ident?.hostKeyFingerprint ?? null,
      hostKeyFingerprints: ident?.hostKeyFingerprints ?? {},
      authorizedKeys: ident?.authorizedKeys ?? [],
      disks,
      reboots: s.reboots,
      faults: s.faults,
      lastBoot: s.bootLog[s.bootLog.length - 1] ?? null,
      nics: s.nics,
      ...(ident?.errors.length ? { problems: ident.errors } : {}),
    };
  }

  /** The devices the firmware booted, oldest first (the boot log keeps the last 50 boots). */
  async bootPath(): Promise<string[]> {
    const s = await readSimState(this.dir);
    return s.bootLog.map((b) => b.booted ?? 'none');
  }

  async partition(disk: string, layout: PartitionSpec[]): Promise<{ changed: boolean }> {
    if (!DISK_RE.test(disk ?? '')) throw scError('SC_ERR_NO_DEVICE', `bad disk name ${JSON.stringify(String(disk).slice(0, 40))}`);
    const want = validateLayout(layout);
    const runningDev = await this.#runningDevice();
    const changed = await updateState(this.dir, async (s) => {
      const d = s.disks[disk];
      if (!d) throw scError('SC_ERR_NO_DEVICE', `this machine has no ${disk}`);
      const same =
        d.partitions.length === want.length &&
        want.every((w, i) => d.partitions[i].name === w.name && d.partitions[i].role === w.role && d.partitions[i].sizeMiB === w.sizeMiB);
      if (same) return [false, false];
      if (runningDev && splitDevice(runningDev).disk === disk) throw scError('SC_ERR_CONFLICT', `${disk} holds the running OS (${runningDev})`);
      const total = want.reduce((a, w) => a + (w.sizeMiB ?? 0), 0);
      if (total >= d.sizeMiB) throw scError('SC_ERR_BAD_CONFIG', `layout needs ${total} MiB, ${disk} has ${d.sizeMiB} MiB`);
      // Old partitions go first (so a crash never leaves a new table over old contents).
      for (const p of d.partitions) await removeTree(this.dir, paths(this.dir).part(disk, p.name));
      d.partitions = want.map((w) => ({ name: w.name, role: w.role, ...(w.sizeMiB ? { sizeMiB: w.sizeMiB } : {}), filesystem: null }));
      return [true, true];
    });
    if (changed) await logAction(this.dir, 'partition', { disk, layout: want });
    return { changed };
  }

  async #refuseRunning(device: string, what: string): Promise<void> {
    if ((await this.#runningDevice()) === device) throw scError('SC_ERR_CONFLICT', `cannot ${what} ${device}: the running OS lives there`);
  }

  async mkfs(device: string): Promise<void> {
    await this.#refuseRunning(device, 'format');
    await updateState(this.dir, async (s) => {
      const { disk, part, p } = partitionOf(s, device);
      const dirp = paths(this.dir).part(disk, part);
      await removeTree(this.dir, dirp);
      await fsp.mkdir(dirp, { recursive: true });
      p.filesystem = 'ext4';
      return [true, undefined];
    });
    await logAction(this.dir, 'mkfs', { device });
  }

  async wipe(device: string): Promise<void> {
    await this.#refuseRunning(device, 'wipe');
    const changed = await updateState(this.dir, async (s) => {
      const { disk, part, p } = partitionOf(s, device);
      const dirp = paths(this.dir).part(disk, part);
      const had = p.filesystem !== null || (await exists(dirp));
      p.filesystem = null;
      // machine.json is committed first: a half-deleted tree is never taken for a filesystem.
      await writeJsonAtomic(paths(this.dir).state, simStateSchema.parse(s));
      await removeTree(this.dir, dirp);
      return [false, had];
    });
    if (changed) await logAction(this.dir, 'wipe', { device });
  }

  async mountPath(device: string): Promise<string> {
    const s = await readSimState(this.dir);
    const { disk, part, p } = partitionOf(s, device);
    if (!p.filesystem) throw scError('SC_ERR_CONFLICT', `${device} has no filesystem`);
    const dirp = paths(this.dir).part(disk, part);
    await fsp.mkdir(dirp, { recursive: true });
    return dirp;
  }

  async isEmpty(device: string): Promise<boolean> {
    const s = await readSimState(this.dir);
    const { disk, part, p } = partitionOf(s, device);
    return p.filesystem ? dirEmpty(paths(this.dir).part(disk, part)) : true;
  }

  async markInstalled(device: string, os: InstallMark): Promise<void> {
    if (!(NET_FORMATS as readonly string[]).includes(os?.netFormat)) throw scError('SC_ERR_BAD_CONFIG', `bad netFormat ${String(os?.netFormat)}`);
    const root = await this.mountPath(device);
    if (await writeMarker(root, os, new Date().toISOString())) await logAction(this.dir, 'mark-installed', { device, ...os });
  }

  async installedOs(device: string): Promise<InstalledOs | null> {
    const s = await readSimState(this.dir);
    const { disk, part, p } = partitionOf(s, device);
    return p.filesystem ? installedOsAt(paths(this.dir).part(disk, part)) : null;
  }

  async #setEntry(key: keyof BootConfig, device: string, op: string): Promise<void> {
    const changed = await updateState(this.dir, (s) => {
      partitionOf(s, device);
      if (s.boot[key] === device) return [false, false];
      s.boot[key] = device;
      return [true, true];
    });
    if (changed) await logAction(this.dir, op, { device });
  }

  setBootOnce(device: string): Promise<void> {
    return this.#setEntry('once', device, 'set-boot-once');
  }

  setDefault(device: string): Promise<void> {
    return this.#setEntry('default', device, 'set-default');
  }

  setRescueEntry(device: string): Promise<void> {
    return this.#setEntry('rescue', device, 'set-rescue');
  }

  async bootConfig(): Promise<BootConfig> {
    return { ...(await readSimState(this.dir)).boot };
  }

  async reboot(): Promise<never> {
    const reboots = await updateState(this.dir, async (s) => {
      s.reboots += 1;
      s.pendingReboot = true;
      await writeJsonAtomic(paths(this.dir).running, { state: 'rebooting', at: new Date().toISOString(), reboots: s.reboots } satisfies SimRunning);
      return [true, s.reboots];
    });
    await logAction(this.dir, 'reboot', { reboots });
    await this.#exit(reboots);
    throw scError('SC_ERR_INTERNAL', 'the reboot exit action returned');
  }

  async captureConfig(): Promise<CarryConfig> {
    const r = await this.running();
    const s = await readSimState(this.dir);
    const root = await this.mountPath(r.device);
    const os = await installedOsAt(root);
    if (!os) throw scError('SC_ERR_BOOT_FAILED', `no OS on the running device ${r.device}`);
    return capture(root, os.netFormat, { nics: s.nics as Nic[] });
  }

  async applyConfig(device: string, cfg: CarryConfig, netFormat: NetFormat): Promise<void> {
    const root = await this.mountPath(device);
    const res = await apply(root, cfg, netFormat);
    if (res.written.length || res.disabled.length) await logAction(this.dir, 'apply-config', { device, netFormat, written: res.written, disabled: res.disabled });
  }
}

async function exists(p: string): Promise<boolean> {
  return fsp.access(p).then(
    () => true,
    () => false,
  );
}

async function dirEmpty(p: string): Promise<boolean> {
  try {
    return (await fsp.readdir(p)).filter((e) => e !== 'lost+found').length === 0;
  } catch {
    return true;
  }
}
