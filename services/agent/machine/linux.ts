/**
 * The `linux` machine driver: real commands for a two-disk machine. Every change is a plan (a
 * list of argv arrays, built by the pure `plan*` functions below) handed to a Runner; the
 * default runner executes them, the dry-run runner prints them (`+ parted --script …`) and runs
 * only read-only queries (lsblk, findmnt, efibootmgr, grub-editenv list). Nothing is run
 * through a shell.
 *
 * Decisions (see README, "Machine drivers"):
 * - Partitioning: GPT with `parted --script` (argv only, no stdin script). Partition names
 *   (GPT PARTLABEL) are `sc-<role>`, which is how the driver recognises its own layout. A boot
 *   helper partition is added after the layout's partitions (so p1/p2 keep their numbers) but
 *   placed first on the disk: `sc-bios-grub` (2 MiB, bios_grub flag) for BIOS, `sc-esp`
 *   (512 MiB FAT32, esp flag) for UEFI.
 * - Filesystems: ext4 with label `sc-<role>` (`sc-os-root`, `sc-rescue-root`,
 *   `sc-bundle-store`); a bundle's boot config finds its root by that label.
 * - Mounts: `<mountRoot>/<device>`; the running OS's device is `/`.
 * - bios-grub: the running OS's GRUB is the boot loader. /etc/grub.d/45_stagecoach adds one
 *   menu entry per managed root partition (`--id stagecoach-<device>`: search by label, then
 *   `configfile /boot/grub/grub.cfg` of that OS) and a rescue entry (`stagecoach-rescue`).
 *   One-shot: `grub-reboot`; default: `grub-set-default` (GRUB_DEFAULT=saved is set) and
 *   `grub-install` of the running OS's GRUB onto both disks, so either disk boots it.
 * - uefi: one NVRAM entry per device (`stagecoach <device>`) whose loader is a GRUB installed
 *   on disk 2's ESP with that OS's /boot; one-shot `efibootmgr --bootnext`, default
 *   `efibootmgr --bootorder` (that entry first), rescue an entry labelled `stagecoach rescue <device>`.
 */
import { execFile } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { scError } from '../../../shared/errors.js';
import type { Compression, NetFormat } from '../../../shared/manifest.js';
import { apply, capture, type Nic, render } from '../carry/index.js';
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
import { identityAt, installedOsAt, readOsReleaseAt, writeMarker } from './os.js';

/** Boot loader flavour. */
export type BootMode = 'bios-grub' | 'uefi';

/** Runs commands. `run` changes the machine; `query` only reads (a dry run still executes it). */
export interface Runner {
  /** Runs argv; resolves stdout. Throws SC_ERR_COMMAND_FAILED on a non-zero exit. */
  run(argv: string[]): Promise<string>;
  /** Runs a read-only command; resolves stdout, or null when it fails or is missing. */
  query(argv: string[]): Promise<string | null>;
  /** Writes a file (mode exact). */
  writeFile(path: string, content: string, mode: number): Promise<void>;
  /** True when nothing is changed for real. */
  readonly dryRun: boolean;
}

/** Quotes argv for display the way a POSIX shell would read it back. */
export function shellQuote(argv: string[]): string {
  return argv.map((a) => (/^[A-Za-z0-9_@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
}

function exec(argv: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(argv[0], argv.slice(1), { maxBuffer: 16 << 20, env: { ...process.env, LC_ALL: 'C' } }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as NodeJS.ErrnoException).code === 'number' ? Number((err as NodeJS.ErrnoException).code) : 127) : 0;
      resolve({ code, stdout: String(stdout), stderr: String(stderr) || (err && !stderr ? err.message : '') });
    });
  });
}

/** The runner that executes commands (execFile, no shell, LC_ALL=C). */
export function execRunner(): Runner {
  return {
    dryRun: false,
    async run(argv) {
      const r = await exec(argv);
      if (r.code !== 0) {
        throw scError('SC_ERR_COMMAND_FAILED', `${shellQuote(argv).slice(0, 200)} exited ${r.code}`, { argv, code: r.code, stderr: r.stderr.slice(-2000) });
      }
      return r.stdout;
    },
    async query(argv) {
      const r = await exec(argv);
      return r.code === 0 ? r.stdout : null;
    },
    async writeFile(path, content, mode) {
      const tmp = `${path}.sc-tmp`;
      await fsp.writeFile(tmp, content, { mode });
      await fsp.chmod(tmp, mode);
      await fsp.rename(tmp, path);
    },
  };
}

/** The dry-run runner: prints every change as `+ argv` (or `+ write PATH (mode, N bytes)`) and runs only queries. */
export function dryRunRunner(print: (line: string) => void = (l) => process.stdout.write(`${l}\n`)): Runner {
  const real = execRunner();
  return {
    dryRun: true,
    async run(argv) {
      print(`+ ${shellQuote(argv)}`);
      return '';
    },
    query: (argv) => real.query(argv),
    async writeFile(path, content, mode) {
      print(`+ write ${path} (mode ${mode.toString(8).padStart(4, '0')}, ${Buffer.byteLength(content)} bytes)`);
      for (const line of content.replace(/\n$/, '').split('\n')) print(`|   ${line}`);
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Pure plan builders

/** Partition n of a disk path: /dev/sda → /dev/sda1, /dev/nvme0n1 → /dev/nvme0n1p1, by-id links → -partN. */
export function partitionPath(diskPath: string, n: number): string {
  if (/^\/dev\/disk\/by-/.test(diskPath)) return `${diskPath}-part${n}`;
  return /\d$/.test(diskPath) ? `${diskPath}p${n}` : `${diskPath}${n}`;
}

/** ext4 label (and GPT partition name) of a role. */
export function fsLabel(role: PartitionRole): string {
  return `sc-${role}`;
}

/** Boot helper partition per boot mode: its GPT name, size, flag and filesystem. */
export const BOOT_HELPER = {
  'bios-grub': { name: 'sc-bios-grub', sizeMiB: 2, flag: 'bios_grub', fs: null },
  uefi: { name: 'sc-esp', sizeMiB: 512, flag: 'esp', fs: 'fat32' },
} as const;

/**
 * Partitions `diskPath` as `layout` (GPT), plus the boot helper partition numbered after the
 * layout and placed at 1 MiB. Sizes in MiB; the last partition without a size takes the rest.
 */
export function planPartition(diskPath: string, layout: PartitionSpec[], bootMode: BootMode): string[][] {
  const parts = validateLayout(layout);
  const helper = BOOT_HELPER[bootMode];
  const helperN = parts.length + 1;
  const script: string[] = ['mklabel', 'gpt'];
  let start = 1 + helper.sizeMiB;
  for (const p of parts) {
    const end = p.sizeMiB === undefined ? '100%' : `${start + p.sizeMiB}MiB`;
    script.push('mkpart', fsLabel(p.role), 'ext4', `${start}MiB`, end);
    if (p.sizeMiB !== undefined) start += p.sizeMiB;
  }
  script.push('mkpart', helper.name, ...(helper.fs ? [helper.fs] : []), '1MiB', `${1 + helper.sizeMiB}MiB`, 'set', String(helperN), helper.flag, 'on');
  const plan = [['wipefs', '--all', diskPath], ['parted', '--script', '--align', 'optimal', diskPath, '--', ...script], ['partprobe', diskPath], ['udevadm', 'settle']];
  if (bootMode === 'uefi') plan.push(['mkfs.vfat', '-F', '32', '-n', 'SC-ESP', partitionPath(diskPath, helperN)]);
  return plan;
}

/** An empty ext4 filesystem labelled `label` on `partPath`. */
export function planMkfs(partPath: string, label: string): string[][] {
  return [
    ['wipefs', '--all', partPath],
    ['mkfs.ext4', '-F', '-q', '-L', label, partPath],
  ];
}

/** Removes every filesystem signature from `partPath` (the partition then has no filesystem). */
export function planWipe(partPath: string): string[][] {
  return [['wipefs', '--all', partPath]];
}

/** Mounts `partPath` on `dir`. */
export function planMount(partPath: string, dir: string): string[][] {
  return [
    ['mkdir', '-p', dir],
    ['mount', partPath, dir],
  ];
}

/** Unmounts `dir`. */
export function planUmount(dir: string): string[][] {
  return [['umount', dir]];
}

/**
 * The tar command equivalent to what the agent's codec does in-process for an unencrypted
 * bundle file (for operators unpacking by hand; the agent itself never shells out to tar).
 */
export function planUnpack(bundleFile: string, dir: string, compression: Compression): string[][] {
  const z = compression === 'zstd' ? ['--zstd'] : compression === 'gzip' ? ['--gzip'] : [];
  return [['tar', '--extract', ...z, '--file', bundleFile, '--directory', dir, '--numeric-owner', '--preserve-permissions', '--xattrs', '--acls']];
}

/** GRUB menu entry id of a device. */
export function grubEntryId(device: string): string {
  return `stagecoach-${device}`;
}

/** Where the stagecoach GRUB entries live in the running OS. */
export const GRUB_ENTRIES_FILE = '/etc/grub.d/45_stagecoach';

/**
 * The /etc/grub.d/45_stagecoach script: one entry per managed root partition (found by its
 * filesystem label, then that OS's own grub.cfg), plus `stagecoach-rescue` when set.
 */
export function grubEntriesScript(entries: { device: string; label: string }[], rescue: { device: string; label: string } | null): string {
  const body = entries.map(
    (e) => `menuentry 'stagecoach ${e.device}' --id ${grubEntryId(e.device)} {\n\tsearch --no-floppy --label --set=root ${e.label}\n\tconfigfile /boot/grub/grub.cfg\n}\n`,
  );
  if (rescue) {
    body.push(`menuentry 'stagecoach rescue (${rescue.device})' --id stagecoach-rescue {\n\tsearch --no-floppy --label --set=root ${rescue.label}\n\tconfigfile /boot/grub/grub.cfg\n}\n`);
  }
  const head = ['#!/bin/sh', '# Written by stagecoach: boot entries for the partitions it manages (grub-mkconfig runs this).', `# rescue: ${rescue?.device ?? 'none'}`];
  return `${head.join('\n')}\nexec tail -n +${head.length + 2} "$0"\n${body.join('')}`;
}

/** Regenerates grub.cfg with the stagecoach entries (GRUB_DEFAULT=saved so saved/next entries work). */
export function planGrubConfig(): string[][] {
  return [
    ['sed', '-i', '-E', 's/^#?GRUB_DEFAULT=.*/GRUB_DEFAULT=saved/', '/etc/default/grub'],
    ['grub-mkconfig', '-o', '/boot/grub/grub.cfg'],
  ];
}

/** Context of the boot plans: mode, and for UEFI the NVRAM boot number of the device's entry and the current order. */
export interface BootPlanContext {
  bootMode: BootMode;
  /** uefi: `Boot####` number of the device's entry (4 hex digits). */
  bootNum?: string;
  /** uefi: the current BootOrder. */
  bootOrder?: string[];
  /** bios-grub: every disk the running GRUB is installed on by setDefault. */
  diskPaths?: string[];
}

function needNum(ctx: BootPlanContext): string {
  if (!ctx.bootNum || !/^[0-9A-Fa-f]{4}$/.test(ctx.bootNum)) throw scError('SC_ERR_BAD_CONFIG', 'uefi boot plans need the 4-hex-digit boot number of the entry');
  return ctx.bootNum.toUpperCase();
}

/** Next boot (only) from `device`. bios-grub: regenerate entries + grub-reboot; uefi: efibootmgr --bootnext. */
export function planBootOnce(device: string, ctx: BootPlanContext): string[][] {
  if (ctx.bootMode === 'uefi') return [['efibootmgr', '--bootnext', needNum(ctx)]];
  return [...planGrubConfig(), ['grub-reboot', grubEntryId(device)]];
}

/** Default boot from `device`. bios-grub: grub-set-default + GRUB on every disk; uefi: that entry first in BootOrder. */
export function planSetDefault(device: string, ctx: BootPlanContext): string[][] {
  if (ctx.bootMode === 'uefi') {
    const n = needNum(ctx);
    return [['efibootmgr', '--bootorder', [n, ...(ctx.bootOrder ?? []).map((x) => x.toUpperCase()).filter((x) => x !== n)].join(',')]];
  }
  return [...planGrubConfig(), ['grub-set-default', grubEntryId(device)], ...(ctx.diskPaths ?? []).map((d) => ['grub-install', '--target=i386-pc', d])];
}

/**
 * A UEFI loader and NVRAM entry for `device`: GRUB for that OS's /boot (`bootDir`) on the ESP
 * mounted at `espDir`, registered as `label` on partition `espPart` of `espDisk`.
 */
export function planEfiEntry(device: string, o: { espDir: string; bootDir: string; espDisk: string; espPart: number; label: string }): string[][] {
  return [
    ['grub-install', '--target=x86_64-efi', `--efi-directory=${o.espDir}`, `--boot-directory=${o.bootDir}`, `--bootloader-id=${grubEntryId(device)}`, '--no-nvram'],
    ['efibootmgr', '--create', '--disk', o.espDisk, '--part', String(o.espPart), '--label', o.label, '--loader', `\\EFI\\${grubEntryId(device)}\\grubx64.efi`],
  ];
}

/** Restart the machine. */
export function planReboot(): string[][] {
  return [['systemctl', 'reboot']];
}

// ---------------------------------------------------------------------------------------------
// Parsers of command output

/** `efibootmgr` output: BootCurrent, BootNext, BootOrder and the entries (number, label, active). */
export interface EfiBootState {
  current: string | null;
  next: string | null;
  order: string[];
  entries: { num: string; label: string; active: boolean }[];
}

/** Parses `efibootmgr` (no arguments) output. */
export function parseEfibootmgr(text: string): EfiBootState {
  const st: EfiBootState = { current: null, next: null, order: [], entries: [] };
  for (const line of text.split('\n')) {
    let m = /^BootCurrent:\s*([0-9A-Fa-f]{4})/.exec(line);
    if (m) st.current = m[1].toUpperCase();
    m = /^BootNext:\s*([0-9A-Fa-f]{4})/.exec(line);
    if (m) st.next = m[1].toUpperCase();
    m = /^BootOrder:\s*([0-9A-Fa-f,]*)/.exec(line);
    if (m) st.order = m[1].split(',').filter(Boolean).map((x) => x.toUpperCase());
    m = /^Boot([0-9A-Fa-f]{4})(\*?)\s+(.*)$/.exec(line);
    if (m) st.entries.push({ num: m[1].toUpperCase(), active: m[2] === '*', label: m[3].split('\t')[0].replace(/\s+(HD|PciRoot|VenHw|BBS)\(.*$/, '').trim() });
  }
  return st;
}

/** A partition as lsblk reports it. */
export interface LsblkPart {
  n: number;
  path: string;
  partlabel: string | null;
  fstype: string | null;
  label: string | null;
  mountpoint: string | null;
}

/** Parses `lsblk --json --output NAME,PATH,TYPE,PARTLABEL,FSTYPE,LABEL,MOUNTPOINT DISK` into the disk's partitions. */
export function parseLsblk(json: string, diskPath: string): LsblkPart[] {
  let doc: { blockdevices?: { path?: string; type?: string; partlabel?: string | null; fstype?: string | null; label?: string | null; mountpoint?: string | null; children?: unknown[] }[] };
  try {
    doc = JSON.parse(json);
  } catch {
    return [];
  }
  const out: LsblkPart[] = [];
  const visit = (nodes: unknown[] | undefined) => {
    for (const raw of nodes ?? []) {
      const d = raw as NonNullable<typeof doc.blockdevices>[number];
      if (d.type === 'part' && d.path) {
        const m = /(\d+)$/.exec(d.path);
        if (m && partitionPath(diskPath, Number(m[1])) === d.path) {
          out.push({ n: Number(m[1]), path: d.path, partlabel: d.partlabel ?? null, fstype: d.fstype ?? null, label: d.label ?? null, mountpoint: d.mountpoint ?? null });
        }
      }
      visit(d.children);
    }
  };
  visit(doc.blockdevices);
  return out.sort((a, b) => a.n - b.n);
}

// ---------------------------------------------------------------------------------------------
// The driver

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
}

/** The linux MachineDriver (see the decisions at the top of this file). */
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
    this.#c = { hostId: cfg.hostId, disks: { ...cfg.disks }, bootMode: cfg.bootMode, mountRoot: cfg.mountRoot ?? '/mnt/stagecoach', dryRun: cfg.dryRun ?? false, sysRoot: cfg.sysRoot ?? '/' };
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
        if (p.partlabel === BOOT_HELPER['bios-grub'].name || p.partlabel === BOOT_HELPER.uefi.name) continue;
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

  async markInstalled(device: string, os: InstallMark): Promise<void> {
    const root = await this.mountPath(device);
    if (this.runner.dryRun) {
      this.#print(`+ write ${join(root, 'etc/stagecoach/installed.json')} (${os.id} ${os.version}, ${os.netFormat})`);
      return;
    }
    await writeMarker(root, os, new Date().toISOString());
  }

  async installedOs(device: string): Promise<InstalledOs | null> {
    const p = await this.#part(device);
    if (!p.fstype) return null;
    return installedOsAt(await this.mountPath(device));
  }

  /** Managed root partitions (os-root / rescue-root) on every disk, for the GRUB entries. */
  async #rootEntries(): Promise<{ device: string; label: string }[]> {
    const out: { device: string; label: string }[] = [];
    for (const disk of Object.keys(this.#c.disks).sort()) {
      let parts: { n: number; partlabel: string | null }[] = await this.#parts(disk);
      // A dry run on a machine without these disks plans for the standard layout.
      if (parts.length === 0 && this.runner.dryRun) parts = disk === 'disk1' ? [{ n: 1, partlabel: null }] : disk === 'disk2' ? [{ n: 1, partlabel: null }, { n: 2, partlabel: null }] : [];
      for (const p of parts) {
        const role = roleOf(p, disk);
        if (role !== 'bundle-store' && p.partlabel !== BOOT_HELPER['bios-grub'].name && p.partlabel !== BOOT_HELPER.uefi.name) {
          out.push({ device: `${disk}p${p.n}`, label: fsLabel(role) });
        }
      }
    }
    return out;
  }

  async #grubRescue(): Promise<string | null> {
    const text = await fsp.readFile(join(this.#c.sysRoot, GRUB_ENTRIES_FILE), 'utf8').catch(() => '');
    const m = /^# rescue: (disk[1-9]p[1-9])$/m.exec(text);
    return m ? m[1] : null;
  }

  async #writeGrubEntries(rescue: string | null): Promise<void> {
    const entries = await this.#rootEntries();
    const r = rescue ? { device: rescue, label: fsLabel((await this.#part(rescue)).role) } : null;
    await this.runner.writeFile(GRUB_ENTRIES_FILE, grubEntriesScript(entries, r), 0o755);
  }

  async #efi(): Promise<EfiBootState> {
    return parseEfibootmgr((await this.runner.query(['efibootmgr'])) ?? '');
  }

  /** The NVRAM entry labelled `label`, created (loader on disk 2's ESP) when missing. */
  async #efiEntry(device: string, label: string): Promise<string> {
    const found = (await this.#efi()).entries.find((e) => e.label === label);
    if (found) return found.num;
    const espN = (await this.#parts('disk2')).find((p) => p.partlabel === BOOT_HELPER.uefi.name)?.n ?? 3;
    const espDisk = this.#diskPath('disk2');
    const espDir = `${this.#c.mountRoot}/esp`;
    const espMounted = (await this.#parts('disk2')).find((p) => p.n === espN)?.mountpoint;
    if (!espMounted) await this.#runAll(planMount(partitionPath(espDisk, espN), espDir));
    const bootDir = `${(await this.mountPath(device)).replace(/\/$/, '')}/boot`;
    await this.#runAll(planEfiEntry(device, { espDir: espMounted ?? espDir, bootDir, espDisk, espPart: espN, label }));
    const created = (await this.#efi()).entries.find((e) => e.label === label);
    if (!created && this.runner.dryRun) this.#print(`# dry run: the new entry '${label}' has no boot number yet; shown as FFFF`);
    return created?.num ?? 'FFFF';
  }

  async setBootOnce(device: string): Promise<void> {
    this.#split(device);
    if (this.#c.bootMode === 'uefi') {
      const bootNum = await this.#efiEntry(device, `stagecoach ${device}`);
      await this.#runAll(planBootOnce(device, { bootMode: 'uefi', bootNum }));
      return;
    }
    await this.#writeGrubEntries(await this.#grubRescue());
    await this.#runAll(planBootOnce(device, { bootMode: 'bios-grub' }));
  }

  async setDefault(device: string): Promise<void> {
    this.#split(device);
    if (this.#c.bootMode === 'uefi') {
      const bootNum = await this.#efiEntry(device, `stagecoach ${device}`);
      await this.#runAll(planSetDefault(device, { bootMode: 'uefi', bootNum, bootOrder: (await this.#efi()).order }));
      return;
    }
    await this.#writeGrubEntries(await this.#grubRescue());
    await this.#runAll(planSetDefault(device, { bootMode: 'bios-grub', diskPaths: Object.keys(this.#c.disks).sort().map((d) => this.#diskPath(d)) }));
  }

  async setRescueEntry(device: string): Promise<void> {
    this.#split(device);
    if (this.#c.bootMode === 'uefi') {
      await this.#efiEntry(device, `stagecoach rescue ${device}`);
      return;
    }
    await this.#writeGrubEntries(device);
    await this.#runAll(planGrubConfig());
  }

  async bootConfig(): Promise<BootConfig> {
    const dev = (s: string | undefined | null) => (s ? (/^stagecoach[- ](disk[1-9]p[1-9])$/.exec(s)?.[1] ?? null) : null);
    if (this.#c.bootMode === 'uefi') {
      const st = await this.#efi();
      const label = (num: string | null | undefined) => st.entries.find((e) => e.num === num)?.label ?? null;
      const rescue = st.entries.map((e) => /^stagecoach rescue (disk[1-9]p[1-9])$/.exec(e.label)?.[1]).find(Boolean) ?? null;
      return { default: dev(label(st.order[0])), once: dev(label(st.next)), rescue };
    }
    const env = (await this.runner.query(['grub-editenv', '/boot/grub/grubenv', 'list'])) ?? '';
    const get = (k: string) => new RegExp(`^${k}=(.*)$`, 'm').exec(env)?.[1]?.trim();
    return { default: dev(get('saved_entry')), once: dev(get('next_entry')), rescue: await this.#grubRescue() };
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
