/**
 * The machine driver: everything the install steps do to a host's disks, boot loader and OS
 * configuration, behind one interface. Two implementations: `sim` (a machine modelled in a
 * directory; tests, demo, fleet benchmark) and `linux` (real commands, with a dry run).
 *
 * Names. Disks are `disk1` (the OS being replaced, then the target OS) and `disk2` (the base /
 * rescue OS and the kept bundles). Partitions ("devices") are `<disk>p<n>`: `disk1p1`,
 * `disk2p1`, `disk2p2`.
 *
 * Error contract (every implementation throws ScError with these codes, and nothing else that
 * a caller must handle):
 * - SC_ERR_NO_DEVICE: a disk or device name that is malformed or not on this machine, or a
 *   partition that the current partition table does not have.
 * - SC_ERR_CONFLICT: an operation the machine's state forbids: repartitioning, formatting or
 *   wiping the disk the running OS lives on; `mountPath` of a partition without a filesystem.
 * - SC_ERR_BOOT_FAILED: the machine is not running an OS the driver can identify.
 * - SC_ERR_BAD_CONFIG: invalid driver configuration or an invalid carried configuration.
 * - SC_ERR_COMMAND_FAILED: (linux) a system command exited non-zero; details carry argv, exit
 *   code and the end of stderr.
 * Every method is idempotent unless documented otherwise, so a step that is run again after a
 * crash or reboot finds its effect and does no harm.
 */
import { scError } from '../../../shared/errors.js';
import type { NetFormat } from '../../../shared/manifest.js';
import type { CarryConfig } from '../carry/types.js';

/** `disk1`, `disk2`, …  */
export const DISK_RE = /^disk[1-9]$/;
/** `disk1p1`, `disk2p2`, … */
export const DEVICE_RE = /^(disk[1-9])p([1-9])$/;

/** What a partition is for. `os-root` is the replaceable OS on disk 1. */
export type PartitionRole = 'os-root' | 'rescue-root' | 'bundle-store';
/** Every partition role. */
export const PARTITION_ROLES: readonly PartitionRole[] = ['os-root', 'rescue-root', 'bundle-store'];

/** One partition of a layout: `p1`, `p2`… with a role; `sizeMiB` omitted means "the rest of the disk". */
export interface PartitionSpec {
  name: string;
  role: PartitionRole;
  sizeMiB?: number;
}

/** The OS that is running now, and the device it booted from. */
export interface RunningOs {
  id: string;
  version: string;
  device: string;
}

/** An OS found on a device. `complete` is true once markInstalled recorded it (a finished unpack). */
export interface InstalledOs {
  id: string;
  version: string;
  netFormat: NetFormat;
  complete: boolean;
}

/** Boot loader state: default entry, one-shot entry for the next boot, rescue entry (devices or null). */
export interface BootConfig {
  default: string | null;
  once: string | null;
  rescue: string | null;
}

/** A partition as the driver sees it. `filesystem` is null when there is none (new or wiped). */
export interface PartitionInfo {
  device: string;
  name: string;
  role: PartitionRole;
  filesystem: string | null;
  empty: boolean;
  os: { id: string; version: string } | null;
}

/** A disk and its partitions (empty when unpartitioned). */
export interface DiskInfo {
  name: string;
  partitions: PartitionInfo[];
}

/**
 * The inspection document (contract: `stagecoach machine inspect --json`). `ip`,
 * `addresses` and `hostKeyFingerprint` are read from the running OS's own files in its own
 * format, so an OS swap that loses them shows it (null / empty).
 */
export interface MachineInspect {
  driver: 'sim' | 'linux';
  hostId: string;
  hostname: string | null;
  state: 'running' | 'rebooting' | 'down';
  bootDevice: string | null;
  bootOnce: string | null;
  rescueEntry: string | null;
  running: RunningOs | null;
  netFormat: NetFormat | null;
  ip: string | null;
  addresses: string[];
  gateway: string | null;
  mac: string | null;
  hostKeyFingerprint: string | null;
  hostKeyFingerprints: Record<string, string>;
  authorizedKeys: string[];
  disks: Record<string, { partitions: PartitionInfo[] }>;
  reboots: number;
  faults: Record<string, unknown>;
  /** The last boot as the firmware saw it (sim: which entries were tried and why they failed). */
  lastBoot: { boot: number; at: string; tried: { device: string; ok: boolean; reason?: string }[]; booted: string | null } | null;
  /** The machine's NICs. */
  nics: { name: string; mac: string }[];
  /** What could not be read from the running OS (absent when everything could). */
  problems?: string[];
}

/** What an OS marker records. */
export interface InstallMark {
  id: string;
  version: string;
  netFormat: NetFormat;
}

/**
 * Thrown by an injected exit action (tests) when the driver reboots the machine: the agent
 * process "ends" there. Nothing after `reboot()` runs.
 */
export class RebootSignal extends Error {
  /** The reboot counter value after this reboot. */
  readonly reboots: number;
  constructor(reboots: number) {
    super(`machine rebooting (reboot #${reboots})`);
    this.name = 'RebootSignal';
    this.reboots = reboots;
  }
}

/**
 * How `reboot()` ends the agent process once the machine state is written. Default:
 * `process.exit(0)`. The worker passes its own shutdown (close Redis,
 * then exit); tests pass `() => { throw new RebootSignal(n) }`. It must not return normally.
 */
export type ExitAction = (reboots: number) => never | Promise<never>;

/** The default exit action: `process.exit(0)`, ending the process like a power cycle would, without cleanup. */
export const processExit: ExitAction = () => process.exit(0);

/** Everything the install steps need from a machine. All methods are async. */
export interface MachineDriver {
  readonly kind: 'sim' | 'linux';
  /** The host id this machine registers under. */
  hostId(): Promise<string>;
  /** The OS running now and its device. Throws SC_ERR_BOOT_FAILED when it cannot be told. */
  running(): Promise<RunningOs>;
  /** The inspection document. Never throws for state that is merely broken (it reports it). */
  inspect(): Promise<MachineInspect>;
  /** Disks and their partitions. */
  disks(): Promise<DiskInfo[]>;
  /**
   * Lays out `disk` as `layout`. When the disk already has exactly this layout it does
   * nothing and returns `{changed: false}`; otherwise every partition is recreated without a
   * filesystem (data on the disk is lost). SC_ERR_CONFLICT for the running OS's disk.
   */
  partition(disk: string, layout: PartitionSpec[]): Promise<{ changed: boolean }>;
  /** Creates an empty filesystem on `device` (destroys its contents). SC_ERR_CONFLICT for the running device. */
  mkfs(device: string): Promise<void>;
  /** Destroys the filesystem on `device`: afterwards it has none. SC_ERR_CONFLICT for the running device. */
  wipe(device: string): Promise<void>;
  /** A directory where `device`'s filesystem is visible (mounted on demand). SC_ERR_CONFLICT without a filesystem. */
  mountPath(device: string): Promise<string>;
  /** True when `device` has no filesystem or an empty one (lost+found does not count). */
  isEmpty(device: string): Promise<boolean>;
  /** Records that the OS unpacked on `device` is complete (read back by installedOs). */
  markInstalled(device: string, os: InstallMark): Promise<void>;
  /** The OS on `device` from its etc/os-release and marker; null without a filesystem or os-release. */
  installedOs(device: string): Promise<InstalledOs | null>;
  /** Makes the next boot (only) start `device`. */
  setBootOnce(device: string): Promise<void>;
  /** Makes `device` the default boot entry. */
  setDefault(device: string): Promise<void>;
  /** Makes `device` the rescue entry, kept in the boot menu. */
  setRescueEntry(device: string): Promise<void>;
  /** The boot loader's entries. */
  bootConfig(): Promise<BootConfig>;
  /** Reboots: the state is written, then the agent process ends through the exit action. */
  reboot(): Promise<never>;
  /** The carried configuration of the running OS. SC_ERR_BAD_CONFIG if it cannot be read. */
  captureConfig(): Promise<CarryConfig>;
  /** Writes `cfg` into the OS on `device` in `netFormat` (idempotent). */
  applyConfig(device: string, cfg: CarryConfig, netFormat: NetFormat): Promise<void>;
}

/** Size a partition gets when its spec has none and it is not the last one, by role (MiB). */
export const DEFAULT_SIZE_MIB: Record<PartitionRole, number> = { 'os-root': 32768, 'rescue-root': 8192, 'bundle-store': 65536 };

/**
 * Checks and normalises a layout: names p1…pN in order, known roles, positive integer sizes.
 * A partition without a size takes the rest of the disk if it is the last one, else its role's
 * DEFAULT_SIZE_MIB. Throws SC_ERR_BAD_CONFIG.
 */
export function validateLayout(layout: PartitionSpec[]): PartitionSpec[] {
  if (!Array.isArray(layout) || layout.length === 0 || layout.length > 8) throw scError('SC_ERR_BAD_CONFIG', 'a layout has 1 to 8 partitions');
  return layout.map((p, i) => {
    if (!p || p.name !== `p${i + 1}`) throw scError('SC_ERR_BAD_CONFIG', `partition ${i + 1} must be named p${i + 1}`);
    if (!PARTITION_ROLES.includes(p.role)) throw scError('SC_ERR_BAD_CONFIG', `unknown partition role ${JSON.stringify(String(p.role))}`);
    if (p.sizeMiB !== undefined && !(Number.isInteger(p.sizeMiB) && p.sizeMiB > 0)) throw scError('SC_ERR_BAD_CONFIG', `bad size for ${p.name}`);
    const size = p.sizeMiB ?? (i === layout.length - 1 ? undefined : DEFAULT_SIZE_MIB[p.role]);
    return { name: p.name, role: p.role, ...(size !== undefined ? { sizeMiB: size } : {}) };
  });
}
