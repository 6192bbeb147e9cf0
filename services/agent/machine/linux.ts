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
 * - Boot loader: see linux-boot.ts (A's GRUB until the point of no return, then the stagecoach
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
  PARTITION_ROLES,
  type PartitionSpec,
  processExit,
  type RunningOs,
  validateLayout,
} from './driver.js';
import {
  type BootMode,
  type BootRoot,
  bootRoot,
  DEFAULT_KERNEL_ARGS,
  efiLoaderConfig,
  efiLoaderPath,
  fsLabel,
  fstabFor,
  GRUB_ENTRIES_FILE,
  grubEntriesScript,
  grubEntryId,
  LOADER_BOOT_DIR,
  loaderConfig,
  planBootNext,
  planBootOrder,
  planEditEnv,
  planEfiEntry,
  planEfiLoader,
  planLoaderInstall,
  planOsGrubOnce,
} from './linux-boot.js';
import {
  BOOT_HELPER,
  dryRunRunner,
  type EfiBootState,
  execRunner,
  type LsblkPart,
  parseEfibootmgr,
  parseLsblk,
  partitionPath,
  planMkfs,
  planMount,
  planPartition,
  planReboot,
  planUmount,
  planWipe,
  type Runner,
} from './linux-plans.js';
import { identityAt, installedOsAt, readOsReleaseAt, writeMarker } from './os.js';

export * from './linux-boot.js';
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

  /** The roots stagecoach boots: os-root and rescue-root partitions (by GPT name, else the standard layout), with their kernels. */
  async #bootRoots(): Promise<BootRoot[]> {
    const out: BootRoot[] = [];
    for (const disk of Object.keys(this.#c.disks).sort()) {
      let parts: Pick<LsblkPart, 'n' | 'partlabel' | 'fstype'>[] = await this.#parts(disk);
      // A dry run on a machine without these disks plans for the standard layout.
      if (parts.length === 0 && this.runner.dryRun) parts = disk === 'disk1' ? [{ n: 1, partlabel: null, fstype: null }] : disk === 'disk2' ? [{ n: 1, partlabel: null, fstype: null }] : [];
      for (const p of parts) {
        const device = `${disk}p${p.n}`;
        const named = p.partlabel?.startsWith('sc-') ?? false;
        const role = roleOf(p, disk);
        if (role === 'bundle-store' || (!named && !STANDARD_ROLES[device])) continue;
        const root = p.fstype === 'ext4' ? await this.mountPath(device).catch(() => null) : null;
        out.push(bootRoot(device, fsLabel(role), root ? await kernelAt(root) : null));
      }
    }
    return out;
  }

  async #bootRoot(device: string): Promise<BootRoot> {
    const found = (await this.#bootRoots()).find((r) => r.device === device);
    return found ?? bootRoot(device, fsLabel((await this.#part(device)).role));
  }

  /** The stagecoach loader's place on disk2p1 (BIOS), or null while disk2p1 has no filesystem. */
  async #loader(): Promise<{ bootDir: string; grubDir: string; env: string } | null> {
    const p = await this.#part('disk2p1').catch(() => null);
    if (!p || (!p.fstype && !this.runner.dryRun)) return null;
    const root = await this.mountPath('disk2p1').catch(() => null);
    if (!root) return null;
    const bootDir = join(root, LOADER_BOOT_DIR);
    return { bootDir, grubDir: join(bootDir, 'grub'), env: join(bootDir, 'grub/grubenv') };
  }

  async #env(file: string): Promise<Record<string, string>> {
    const text = (await this.runner.query(['grub-editenv', file, 'list'])) ?? '';
    return Object.fromEntries(text.split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1).trim()]));
  }

  async #writeLoaderConfig(l: { grubDir: string }, rescue: string | null): Promise<void> {
    await this.#runAll([['mkdir', '-p', l.grubDir]]);
    const r = rescue ? await this.#bootRoot(rescue) : null;
    await this.runner.writeFile(join(l.grubDir, 'grub.cfg'), loaderConfig(await this.#bootRoots(), r, this.#c.kernelArgs), 0o644);
  }

  async #needLoader(): Promise<{ bootDir: string; grubDir: string; env: string }> {
    const l = await this.#loader();
    if (!l) throw scError('SC_ERR_CONFLICT', 'disk2p1 has no filesystem: there is no rescue OS to hold the boot loader');
    return l;
  }

  async #grubRescue(): Promise<string | null> {
    const text = await fsp.readFile(join(this.#c.sysRoot, GRUB_ENTRIES_FILE), 'utf8').catch(() => '');
    return /^# rescue: (disk[1-9]p[1-9])$/m.exec(text)?.[1] ?? null;
  }

  async #efi(): Promise<EfiBootState> {
    return parseEfibootmgr((await this.runner.query(['efibootmgr'])) ?? '');
  }

  /** Disk 2's ESP, mounted. */
  async #esp(): Promise<{ dir: string; disk: string; part: number }> {
    const parts = await this.#parts('disk2');
    const p = parts.find((x) => x.partlabel === BOOT_HELPER.uefi.name);
    if (!p && !this.runner.dryRun) throw scError('SC_ERR_CONFLICT', 'disk 2 has no ESP (sc-esp): partition it first');
    const n = p?.n ?? 3;
    if (p?.mountpoint) return { dir: p.mountpoint, disk: this.#diskPath('disk2'), part: n };
    const dir = `${this.#c.mountRoot}/esp`;
    await this.#runAll(planMount(partitionPath(this.#diskPath('disk2'), n), dir));
    return { dir, disk: this.#diskPath('disk2'), part: n };
  }

  /** (Re)writes `device`'s UEFI loader on disk 2's ESP and returns the number of its NVRAM entry `label` (created when missing). */
  async #efiEntry(device: string, label: string): Promise<string> {
    const esp = await this.#esp();
    const cfg = join(esp.dir, `EFI/stagecoach/${device}.cfg`);
    await this.#runAll([['mkdir', '-p', join(esp.dir, 'EFI/stagecoach')]]);
    await this.runner.writeFile(cfg, efiLoaderConfig(await this.#bootRoot(device), this.#c.kernelArgs), 0o644);
    await this.#runAll(planEfiLoader(join(esp.dir, efiLoaderPath(device)), cfg));
    const found = (await this.#efi()).entries.find((e) => e.label === label);
    if (found) return found.num;
    await this.#runAll(planEfiEntry({ espDisk: esp.disk, espPart: esp.part, label, loader: efiLoaderPath(device) }));
    const created = (await this.#efi()).entries.find((e) => e.label === label);
    if (!created && this.runner.dryRun) this.#print(`# dry run: the new entry '${label}' has no boot number yet; shown as FFFF`);
    if (!created && !this.runner.dryRun) throw scError('SC_ERR_COMMAND_FAILED', `efibootmgr did not create the entry '${label}'`);
    return created?.num ?? 'FFFF';
  }

  async setBootOnce(device: string): Promise<void> {
    this.#split(device);
    if (this.#c.bootMode === 'uefi') {
      await this.#runAll(planBootNext(await this.#efiEntry(device, `stagecoach ${device}`)));
      return;
    }
    const l = await this.#loader();
    const env = l ? await this.#env(l.env) : {};
    if (l && env.stagecoach_loader === '1') {
      await this.#writeLoaderConfig(l, env.stagecoach_rescue ?? null);
      await this.#runAll(planEditEnv(l.env, { next_entry: grubEntryId(device) }, false));
      return;
    }
    // Before the point of no return: the running OS's own GRUB boots the entry once.
    const rescue = env.stagecoach_rescue ?? (await this.#grubRescue());
    await this.runner.writeFile(GRUB_ENTRIES_FILE, grubEntriesScript(await this.#bootRoots(), rescue ? await this.#bootRoot(rescue) : null, this.#c.kernelArgs), 0o755);
    await this.#runAll(planOsGrubOnce(device));
  }

  async setDefault(device: string): Promise<void> {
    this.#split(device);
    if (this.#c.bootMode === 'uefi') {
      const num = await this.#efiEntry(device, `stagecoach ${device}`);
      await this.#runAll(planBootOrder(num, (await this.#efi()).order));
      return;
    }
    const l = await this.#needLoader();
    const env = await this.#env(l.env);
    await this.#writeLoaderConfig(l, env.stagecoach_rescue ?? null);
    await this.#runAll(planLoaderInstall(l.bootDir, Object.keys(this.#c.disks).sort().map((d) => this.#diskPath(d))));
    const exists = !!(await fsp.stat(l.env).catch(() => null));
    await this.#runAll(planEditEnv(l.env, { saved_entry: grubEntryId(device), stagecoach_loader: '1' }, !exists && !this.runner.dryRun));
  }

  async setRescueEntry(device: string): Promise<void> {
    this.#split(device);
    if (this.#c.bootMode === 'uefi') {
      const num = await this.#efiEntry(device, `stagecoach rescue ${device}`);
      const order = (await this.#efi()).order.filter((x) => x !== num);
      await this.#runAll([['efibootmgr', '--bootorder', [...order.slice(0, 1), num, ...order.slice(1)].join(',')]]);
      return;
    }
    const l = await this.#needLoader();
    const exists = !!(await fsp.stat(l.env).catch(() => null));
    await this.#writeLoaderConfig(l, device);
    await this.#runAll(planEditEnv(l.env, { stagecoach_rescue: device }, !exists && !this.runner.dryRun));
  }

  async bootConfig(): Promise<BootConfig> {
    const dev = (s: string | undefined | null) => (s ? (/^stagecoach[- ](disk[1-9]p[1-9])$/.exec(s)?.[1] ?? null) : null);
    if (this.#c.bootMode === 'uefi') {
      const st = await this.#efi();
      const label = (num: string | null | undefined) => st.entries.find((e) => e.num === num)?.label ?? null;
      const rescue = st.entries.map((e) => /^stagecoach rescue (disk[1-9]p[1-9])$/.exec(e.label)?.[1]).find(Boolean) ?? null;
      return { default: dev(label(st.order[0])), once: dev(label(st.next)), rescue };
    }
    const l = await this.#loader();
    const env = l ? await this.#env(l.env) : {};
    if (env.stagecoach_loader === '1') return { default: dev(env.saved_entry), once: dev(env.next_entry), rescue: env.stagecoach_rescue ?? null };
    const os = await this.#env(join(this.#c.sysRoot, 'boot/grub/grubenv'));
    return { default: dev(os.saved_entry), once: dev(os.next_entry), rescue: env.stagecoach_rescue ?? (await this.#grubRescue()) };
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

/** Roles of the standard two-disk layout, for partitions without a `sc-<role>` GPT name. */
export const STANDARD_ROLES: Record<string, PartitionRole> = { disk1p1: 'os-root', disk2p1: 'rescue-root', disk2p2: 'bundle-store' };

/** Role of a partition from its GPT name (`sc-<role>`), else from the standard layout (`bundle-store` for others). */
function roleOf(p: { partlabel: string | null; n: number }, disk: string): PartitionRole {
  const r = p.partlabel?.startsWith('sc-') ? p.partlabel.slice(3) : null;
  if (r && (PARTITION_ROLES as readonly string[]).includes(r)) return r as PartitionRole;
  return STANDARD_ROLES[`${disk}p${p.n}`] ?? (disk === 'disk1' ? 'os-root' : 'bundle-store');
}

/**
 * The kernel and initramfs of the OS at `root`, as paths inside it: Debian's `/vmlinuz` and
 * `/initrd.img` links when present, else the newest `/boot/vmlinuz-<version>` with its
 * `initrd.img-<version>` or `initramfs-<version>.img`; null when there is no kernel.
 */
export async function kernelAt(root: string): Promise<{ kernel: string; initrd: string } | null> {
  const has = async (p: string) => !!(await fsp.stat(join(root, p)).catch(() => null));
  if ((await has('vmlinuz')) && (await has('initrd.img'))) return { kernel: '/vmlinuz', initrd: '/initrd.img' };
  const names = await fsp.readdir(join(root, 'boot')).catch(() => [] as string[]);
  const versions = names.filter((n) => n.startsWith('vmlinuz-')).map((n) => n.slice(8)).sort(compareVersions).reverse();
  for (const v of versions) {
    for (const i of [`initrd.img-${v}`, `initramfs-${v}.img`]) if (names.includes(i)) return { kernel: `/boot/vmlinuz-${v}`, initrd: `/boot/${i}` };
  }
  return null;
}

function compareVersions(a: string, b: string): number {
  return a.localeCompare(b, 'en', { numeric: true });
}
