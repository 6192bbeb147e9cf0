/**
 * The `linux` machine driver: real commands for a two-disk machine. Every change is a plan (a
 * list of argv arrays, built by the pure functions of linux-plans.ts and linux-boot.ts) handed
 * to a Runner; the default runner executes them, the dry-run runner prints them
 * (`+ parted --script …`) and runs only read-only queries (lsblk, findmnt, efibootmgr,
 * grub-editenv list). Nothing is run through a shell.
 *
 * Decisions (see README, "Machine drivers"):
 * - Partitioning: GPT with `parted --script` (argv only). Partition names (GPT PARTLABEL) are
 *   `sc-<role>`, which is how the driver recognises its own layout. A boot helper partition is
 *   added after the layout's partitions (so p1/p2 keep their numbers) but placed first on the
 *   disk: `sc-bios-grub` (2 MiB, bios_grub flag) for BIOS, `sc-esp` (512 MiB FAT32) for UEFI.
 * - Filesystems: ext4 with label `sc-<role>`; boot entries and /etc/fstab find roots by label.
 * - Mounts: `<mountRoot>/<device>`; the running OS's device is `/`.
 * - Boot loader: see linux-loader.ts (A's GRUB until the point of no return, then the stagecoach
 *   loader on disk 2 for BIOS; per-device EFI loaders on disk 2's ESP for UEFI).
 * - An installed tree is made bootable here (markInstalled): fstab by label, empty machine id.
 */
import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { scError } from '../../../shared/errors.js';
import type { NetFormat } from '../../../shared/manifest.js';
import { apply, capture, type Nic, render } from '../carry/index.js';
import { readInside, writeInside } from '../carry/rootfs.js';
import type { CarryConfig } from '../carry/types.js';
import { normalizeMac } from '../carry/types.js';
import {
  type BootConfig,
  DEVICE_RE,
  DISK_RE,
  type DiskInfo,
  type ExitAction,
  type InstalledOs,
  type InstallMark,
  type MachineDriver,
  type MachineInspect,
  type PartitionInfo,
  type PartitionRole,
  type PartitionSpec,
  processExit,
  type RunningOs,
  validateLayout,
} from './driver.js';
import { type BootMode, DEFAULT_KERNEL_ARGS, fsLabel, fstabFor } from './linux-boot.js';
import { LinuxBootLoader } from './linux-loader.js';
import {
  BOOT_HELPER,
  dryRunRunner,
  execRunner,
  type LsblkPart,
  parseLsblk,
  partitionPath,
  planMkfs,
  planMount,
  planPartition,
  planReboot,
  planUmount,
  planWipe,
  roleOf,
  type Runner,
} from './linux-plans.js';
import { identityAt, installedOsAt, readOsReleaseAt, writeMarker } from './os.js';

export * from './linux-boot.js';
export * from './linux-loader.js';
export * from './linux-plans.js';

/** Configuration of a LinuxMachine. */
export interface LinuxMachineConfig {
  hostId: string;
  /** Disk name → device path, e.g. {disk1: '/dev/sda', disk2: '/dev/sdb'}. */
  disks: Record<string, string>;
  bootMode: BootMode;
  /** Where partitions other than the running one are mounted (default /mnt/stagecoach). */
  mountRoot?: string;
  /** Print changes instead of making them (default false). */
  dryRun?: boolean;
  /** Overrides the runner (tests, or a remote executor). */
  runner?: Runner;
  /** How reboot() ends the agent (default process.exit). */
  exit?: ExitAction;
  /** Root of the running OS (default '/'). */
  sysRoot?: string;
  /** Where dry-run notes go (default stdout). */
  print?: (line: string) => void;
  /** Kernel arguments of the stagecoach boot entries besides `root=` (default DEFAULT_KERNEL_ARGS). */
  kernelArgs?: string;
}

/** The linux MachineDriver (see the decisions at the top of this file and of linux-boot.ts). */
export class LinuxMachine implements MachineDriver {
  readonly kind = 'linux' as const;
  readonly #c: Required<Omit<LinuxMachineConfig, 'runner' | 'exit' | 'print'>>;
  readonly runner: Runner;
  readonly #exit: ExitAction;
  readonly #print: (line: string) => void;
  readonly #loader: LinuxBootLoader;

  constructor(cfg: LinuxMachineConfig) {
    for (const [k, v] of Object.entries(cfg.disks ?? {})) {
      if (!DISK_RE.test(k) || !/^\/dev\/[A-Za-z0-9/_.:-]+$/.test(v)) throw scError('SC_ERR_BAD_CONFIG', `bad disk ${k}=${v}`);
    }
    if (!cfg.disks?.disk1 || !cfg.disks?.disk2) throw scError('SC_ERR_BAD_CONFIG', 'the linux driver needs disk1 and disk2 device paths');
    if (cfg.bootMode !== 'bios-grub' && cfg.bootMode !== 'uefi') throw scError('SC_ERR_BAD_CONFIG', `bad boot mode ${String(cfg.bootMode)}`);
    this.#print = cfg.print ?? ((l) => process.stdout.write(`${l}\n`));
    this.#c = { hostId: cfg.hostId, disks: { ...cfg.disks }, bootMode: cfg.bootMode, mountRoot: cfg.mountRoot ?? '/mnt/stagecoach', dryRun: cfg.dryRun ?? false, sysRoot: cfg.sysRoot ?? '/', kernelArgs: cfg.kernelArgs ?? DEFAULT_KERNEL_ARGS };
    this.runner = cfg.runner ?? (this.#c.dryRun ? dryRunRunner(this.#print) : execRunner());
    this.#exit = cfg.exit ?? processExit;
    const c = this.#c;
    this.#loader = new LinuxBootLoader({
      runner: this.runner,
      bootMode: c.bootMode,
      disks: c.disks,
      sysRoot: c.sysRoot,
      mountRoot: c.mountRoot,
      kernelArgs: c.kernelArgs,
      print: this.#print,
      diskPath: (d) => this.#diskPath(d),
      split: (d) => this.#split(d),
      parts: (d) => this.#parts(d),
      part: (d) => this.#part(d),
      mountPath: (d) => this.mountPath(d),
    });
  }

  #diskPath(disk: string): string {
    const p = this.#c.disks[disk];
    if (!p) throw scError('SC_ERR_NO_DEVICE', `this machine has no ${disk}`);
    return p;
  }

  #split(device: string): { disk: string; n: number; path: string } {
    const m = typeof device === 'string' ? DEVICE_RE.exec(device) : null;
    if (!m) throw scError('SC_ERR_NO_DEVICE', `bad device name ${JSON.stringify(String(device).slice(0, 40))}`);
    const n = Number(m[2]);
    return { disk: m[1], n, path: partitionPath(this.#diskPath(m[1]), n) };
  }

  async #parts(disk: string): Promise<LsblkPart[]> {
    const out = await this.runner.query(['lsblk', '--json', '--output', 'NAME,PATH,TYPE,PARTLABEL,FSTYPE,LABEL,MOUNTPOINT', this.#diskPath(disk)]);
    return out ? parseLsblk(out, this.#diskPath(disk)) : [];
  }

  async #part(device: string): Promise<LsblkPart & { disk: string; role: PartitionRole }> {
    const { disk, n, path } = this.#split(device);
    const p = (await this.#parts(disk)).find((x) => x.n === n);
    if (!p && !this.runner.dryRun) throw scError('SC_ERR_NO_DEVICE', `${device} (${path}) does not exist`);
    const q = p ?? { n, path, partlabel: null, fstype: null, label: null, mountpoint: null };
    return { ...q, disk, role: roleOf(q, disk) };
  }

  async hostId(): Promise<string> {
    return this.#c.hostId;
  }

  async #runningDevice(): Promise<string | null> {
    const src = (await this.runner.query(['findmnt', '--noheadings', '--output', 'SOURCE', '--target', '/']))?.trim();
    if (!src) return null;
    for (const [disk, path] of Object.entries(this.#c.disks)) {
      for (let n = 1; n <= 9; n++) if (partitionPath(path, n) === src) return `${disk}p${n}`;
    }
    return null;
  }

  async running(): Promise<RunningOs> {
    const device = await this.#runningDevice();
    const rel = await readOsReleaseAt(this.#c.sysRoot);
    if (!device || !rel) throw scError('SC_ERR_BOOT_FAILED', device ? 'the running OS has no os-release' : 'the root filesystem is on none of the configured disks');
    return { id: rel.ID, version: rel.VERSION_ID ?? '', device };
  }

  async disks(): Promise<DiskInfo[]> {
    const out: DiskInfo[] = [];
    for (const disk of Object.keys(this.#c.disks).sort()) {
      const parts: PartitionInfo[] = [];
      for (const p of await this.#parts(disk)) {
        // Boot helpers and ESPs (an OS's own, e.g. A's on disk 1) are not OS partitions.
        if (p.partlabel === BOOT_HELPER['bios-grub'].name || p.partlabel === BOOT_HELPER.uefi.name || p.fstype === 'vfat') continue;
        const device = `${disk}p${p.n}`;
        const os = p.fstype === 'ext4' && p.mountpoint ? await installedOsAt(p.mountpoint) : null;
        const empty = !p.fstype || (p.mountpoint ? (await fsp.readdir(p.mountpoint).catch(() => [])).filter((e) => e !== 'lost+found').length === 0 : false);
        parts.push({ device, name: `p${p.n}`, role: roleOf(p, disk), filesystem: p.fstype, empty, os: os ? { id: os.id, version: os.version } : null });
      }
      out.push({ name: disk, partitions: parts });
    }
    return out;
  }

  async #nics(): Promise<Nic[]> {
    const out: Nic[] = [];
    const base = join(this.#c.sysRoot, 'sys/class/net');
    for (const name of await fsp.readdir(base).catch(() => [] as string[])) {
      if (name === 'lo') continue;
      const mac = normalizeMac(await fsp.readFile(join(base, name, 'address'), 'utf8').catch(() => ''));
      if (mac) out.push({ name, mac });
    }
    return out;
  }

  async inspect(): Promise<MachineInspect> {
    const running = await this.running().catch(() => null);
    const boot = await this.bootConfig();
    const disks: MachineInspect['disks'] = {};
    for (const d of await this.disks()) disks[d.name] = { partitions: d.partitions };
    const nics = await this.#nics();
    const os = await installedOsAt(this.#c.sysRoot);
    const ident = os ? await identityAt(this.#c.sysRoot, os.netFormat, nics) : null;
    return {
      driver: 'linux',
      hostId: this.#c.hostId,
      hostname: ident?.hostname ?? null,
      state: running ? 'running' : 'down',
      bootDevice: boot.default,
      bootOnce: boot.once,
      rescueEntry: boot.rescue,
      running,
      netFormat: os?.netFormat ?? null,
      ip: ident?.ip ?? null,
      addresses: ident?.addresses ?? [],
      gateway: ident?.gateway ?? null,
      mac: ident?.mac ?? null,
      hostKeyFingerprint: ident?.hostKeyFingerprint ?? null,
      hostKeyFingerprints: ident?.hostKeyFingerprints ?? {},
      authorizedKeys: ident?.authorizedKeys ?? [],
      disks,
      reboots: 0,
      faults: {},
      lastBoot: null,
      nics,
      ...(ident?.errors.length ? { problems: ident.errors } : {}),
    };
  }

  async #unmountDisk(disk: string): Promise<void> {
    for (const p of await this.#parts(disk)) if (p.mountpoint?.startsWith(`${this.#c.mountRoot}/`)) await this.#runAll(planUmount(p.mountpoint));
  }

  async #runAll(plan: string[][]): Promise<void> {
    for (const argv of plan) await this.runner.run(argv);
  }

  async partition(disk: string, layout: PartitionSpec[]): Promise<{ changed: boolean }> {
    const diskPath = this.#diskPath(disk);
    const want = validateLayout(layout);
    const have = await this.#parts(disk);
    const helper = BOOT_HELPER[this.#c.bootMode];
    const same =
      have.length === want.length + 1 &&
      want.every((w, i) => have.find((h) => h.n === i + 1)?.partlabel === fsLabel(w.role)) &&
      have.find((h) => h.n === want.length + 1)?.partlabel === helper.name;
    if (same) return { changed: false };
    const run = await this.#runningDevice();
    if (run && this.#split(run).disk === disk) throw scError('SC_ERR_CONFLICT', `${disk} holds the running OS (${run})`);
    await this.#unmountDisk(disk);
    await this.#runAll(planPartition(diskPath, want, this.#c.bootMode));
    return { changed: true };
  }

  async #refuseRunning(device: string, what: string): Promise<void> {
    if ((await this.#runningDevice()) === device) throw scError('SC_ERR_CONFLICT', `cannot ${what} ${device}: the running OS lives there`);
  }

  async mkfs(device: string): Promise<void> {
    await this.#refuseRunning(device, 'format');
    const p = await this.#part(device);
    if (p.mountpoint) await this.#runAll(planUmount(p.mountpoint));
    await this.#runAll(planMkfs(p.path, fsLabel(p.role)));
  }

  async wipe(device: string): Promise<void> {
    await this.#refuseRunning(device, 'wipe');
    const p = await this.#part(device);
    if (!p.fstype && !this.runner.dryRun) return;
    if (p.mountpoint) await this.#runAll(planUmount(p.mountpoint));
    await this.#runAll(planWipe(p.path));
  }

  async mountPath(device: string): Promise<string> {
    if ((await this.#runningDevice()) === device) return this.#c.sysRoot;
    const p = await this.#part(device);
    if (!p.fstype && !this.runner.dryRun) throw scError('SC_ERR_CONFLICT', `${device} has no filesystem`);
    if (p.mountpoint) return p.mountpoint;
    const dir = `${this.#c.mountRoot}/${device}`;
    await this.#runAll(planMount(p.path, dir));
    return dir;
  }

  async isEmpty(device: string): Promise<boolean> {
    const p = await this.#part(device);
    if (!p.fstype) return true;
    const dir = await this.mountPath(device);
    const entries = await fsp.readdir(dir).catch(() => [] as string[]);
    return entries.filter((e) => e !== 'lost+found').length === 0;
  }

  /**
   * Records the OS on `device` as complete, after making its tree boot on this machine: /etc/fstab
   * with the root by label (fstabFor), and an empty machine id, so the OS makes its own at its
   * first boot instead of sharing the image's.
   */
  async markInstalled(device: string, os: InstallMark): Promise<void> {
    const root = await this.mountPath(device);
    const role = (await this.#part(device)).role;
    if (this.runner.dryRun) {
      this.#print(`+ write ${join(root, 'etc/fstab')} (root LABEL=${fsLabel(role)})`);
      this.#print(`+ write ${join(root, 'etc/stagecoach/installed.json')} (${os.id} ${os.version}, ${os.netFormat})`);
      return;
    }
    if (device !== (await this.#runningDevice())) {
      await writeInside(root, '/etc/fstab', fstabFor(role), 0o644);
      if ((await readInside(root, '/etc/machine-id').catch(() => null)) !== null) await writeInside(root, '/etc/machine-id', '', 0o444);
    }
    await writeMarker(root, os, new Date().toISOString());
  }

  async installedOs(device: string): Promise<InstalledOs | null> {
    const p = await this.#part(device);
    if (!p.fstype) return null;
    return installedOsAt(await this.mountPath(device));
  }

  setBootOnce(device: string): Promise<void> {
    return this.#loader.setBootOnce(device);
  }

  setDefault(device: string): Promise<void> {
    return this.#loader.setDefault(device);
  }

  setRescueEntry(device: string): Promise<void> {
    return this.#loader.setRescueEntry(device);
  }

  bootConfig(): Promise<BootConfig> {
    return this.#loader.bootConfig();
  }

  async reboot(): Promise<never> {
    await this.#runAll(planReboot());
    await this.#exit(1);
    throw scError('SC_ERR_INTERNAL', 'the reboot exit action returned');
  }

  async captureConfig(): Promise<CarryConfig> {
    const os = await installedOsAt(this.#c.sysRoot);
    if (!os) throw scError('SC_ERR_BOOT_FAILED', 'the running OS has no os-release');
    return capture(this.#c.sysRoot, os.netFormat, { nics: await this.#nics() });
  }

  async applyConfig(device: string, cfg: CarryConfig, netFormat: NetFormat): Promise<void> {
    const root = await this.mountPath(device);
    if (this.runner.dryRun) {
      for (const f of render(cfg, netFormat)) this.#print(`+ write ${join(root, f.path)} (mode ${f.mode.toString(8).padStart(4, '0')}, ${Buffer.byteLength(f.content)} bytes)`);
      return;
    }
    await apply(root, cfg, netFormat);
  }
}
