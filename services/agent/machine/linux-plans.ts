/**
 * The linux driver's command plans and parsers: the runners (execute, or print for a dry run),
 * pure builders of the argv plans for partitioning, formatting, mounting and rebooting, and the
 * parsers of lsblk and efibootmgr output. Nothing here decides; linux.ts does.
 */
import { execFile } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import { scError } from '../../../shared/errors.js';
import type { Compression } from '../../../shared/manifest.js';
import { PARTITION_ROLES, type PartitionRole, type PartitionSpec, validateLayout } from './driver.js';
import { type BootMode, fsLabel } from './linux-boot.js';
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
  /** `partuuid`: the GPT partition (lowercase) the entry's loader is on, when its device path names one. */
  entries: { num: string; label: string; active: boolean; partuuid?: string }[];
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
    if (m) {
      const part = /HD\(\d+,GPT,([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})/.exec(m[3]);
      st.entries.push({
        num: m[1].toUpperCase(),
        active: m[2] === '*',
        label: m[3].split('\t')[0].replace(/\s+(HD|PciRoot|VenHw|BBS)\(.*$/, '').trim(),
        ...(part ? { partuuid: part[1].toLowerCase() } : {}),
      });
    }
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

/** Roles of the standard two-disk layout, for partitions without a `sc-<role>` GPT name. */
export const STANDARD_ROLES: Record<string, PartitionRole> = { disk1p1: 'os-root', disk2p1: 'rescue-root', disk2p2: 'bundle-store' };

/** Role of a partition from its GPT name (`sc-<role>`), else from the standard layout (`bundle-store` for others). */
export function roleOf(p: { partlabel: string | null; n: number }, disk: string): PartitionRole {
  const r = p.partlabel?.startsWith('sc-') ? p.partlabel.slice(3) : null;
  if (r && (PARTITION_ROLES as readonly string[]).includes(r)) return r as PartitionRole;
  return STANDARD_ROLES[`${disk}p${p.n}`] ?? (disk === 'disk1' ? 'os-root' : 'bundle-store');
}
