/**
 * The `sim` machine driver: a whole two-disk machine modelled in a directory, for tests, the
 * demo and the fleet benchmark. The install steps run the same code against it as against a
 * real host; only the disks, the firmware and the power button are simulated.
 *
 * Layout of a machine directory DIR (contract for tests and the demo):
 *
 *   DIR/machine.json      hardware + firmware + partition tables (SimState below): host id, NICs
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
 *   DIR/machine.lock      short-lived write lock (holder's pid); stale locks of dead pids are taken over.
 *   DIR/.tmp-*, .trash-*  temp files of atomic writes and partitions being deleted; removed at boot.
 *
 * Writes to machine.json and running.json are atomic (temp file, fsync, rename, fsync of DIR)
 * and serialised by the lock (read-modify-write, across processes), so a kill -9 at any moment
 * leaves either the old or the new state, never a torn file.
 *
 * Boot semantics (simBoot, the firmware): the candidates are the one-shot entry (consumed
 * whether or not it boots), then the default entry, then the rescue entry. A candidate fails
 * when a fail-boot fault is set for it or when it has no bootable OS (no filesystem, or no
 * etc/os-release with an ID); the next one is tried. None bootable: the machine is `down`.
 * `reboot()` only records the reboot (counter, pending flag, running = rebooting) and ends the
 * agent through the exit action; whoever (re)starts the agent calls `simBoot(dir)` first.
 */
import { createHash, randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { isIPv4 } from 'node:net';
import { join, resolve } from 'node:path';
import { z } from 'zod';
import { scError } from '../../../shared/errors.js';
import { NET_FORMATS, type NetFormat } from '../../../shared/manifest.js';
import { NAME_RE } from '../../../shared/names.js';
import { apply, capture, generateEd25519, type Nic } from '../carry/index.js';
import { type CarryConfig, isCidr, MAC_RE, NIC_NAME_RE, normalizeMac, parseCarryConfig } from '../carry/types.js';
import { writeInside } from '../carry/rootfs.js';
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
  PARTITION_ROLES,
  type PartitionInfo,
  type PartitionSpec,
  processExit,
  type RunningOs,
  validateLayout,
} from './driver.js';
import { nativeFiles, osReleaseText, parseFlavour } from './flavours.js';
import { identityAt, installedOsAt, readOsReleaseAt, writeMarker } from './os.js';

const partitionSchema = z.strictObject({
  name: z.string().regex(/^p[1-9]$/),
  role: z.enum(PARTITION_ROLES as [string, ...string[]]),
  sizeMiB: z.number().int().positive().optional(),
  filesystem: z.enum(['ext4']).nullable(),
});

const bootRecordSchema = z.strictObject({
  boot: z.number().int(),
  at: z.string(),
  tried: z.array(z.strictObject({ device: z.string(), ok: z.boolean(), reason: z.string().optional() })),
  booted: z.string().nullable(),
});

const simStateSchema = z.strictObject({
  schema: z.literal(1),
  hostId: z.string().regex(NAME_RE),
  nics: z.array(z.strictObject({ name: z.string().regex(NIC_NAME_RE), mac: z.string().regex(MAC_RE) })).min(1),
  boot: z.strictObject({ default: z.string().nullable(), once: z.string().nullable(), rescue: z.string().nullable() }),
  disks: z.record(z.string().regex(DISK_RE), z.strictObject({ sizeMiB: z.number().int().positive(), partitions: z.array(partitionSchema) })),
  faults: z.strictObject({ failBoot: z.record(z.string().regex(DEVICE_RE), z.enum(['once', 'always'])) }),
  reboots: z.number().int().nonnegative(),
  boots: z.number().int().nonnegative(),
  pendingReboot: z.boolean(),
  bootLog: z.array(bootRecordSchema),
});

/** machine.json. */
export type SimState = z.infer<typeof simStateSchema>;
/** One firmware boot as recorded in the boot log. */
export type BootRecord = z.infer<typeof bootRecordSchema>;

/** running.json. */
export type SimRunning =
  | { state: 'running'; id: string; version: string; device: string; boot: number; at: string }
  | { state: 'rebooting'; at: string; reboots: number }
  | { state: 'down'; at: string; reason: string };

/** One line of actions.jsonl. */
export interface SimAction {
  at: string;
  pid: number;
  op: string;
  [k: string]: unknown;
}

const BOOT_LOG_MAX = 50;
const LOCK_TIMEOUT_MS = 10_000;

const paths = (dir: string) => ({
  state: join(dir, 'machine.json'),
  running: join(dir, 'running.json'),
  actions: join(dir, 'actions.jsonl'),
  lock: join(dir, 'machine.lock'),
  part: (disk: string, p: string) => join(dir, 'disks', disk, p),
});

// ---------------------------------------------------------------------------------------------
// Atomic files and the write lock

async function fsyncDir(dir: string): Promise<void> {
  const fh = await fsp.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Writes JSON to `path` atomically: temp file in the same directory, fsync, rename, fsync dir. */
export async function writeJsonAtomic(path: string, value: unknown): Promise<void> {
  const dir = join(path, '..');
  const tmp = join(dir, `.tmp-${process.pid}-${randomBytes(6).toString('hex')}`);
  const fh = await fsp.open(tmp, 'wx', 0o644);
  try {
    await fh.writeFile(`${JSON.stringify(value, null, 2)}\n`);
    await fh.sync();
  } finally {
    await fh.close();
  }
  try {
    await fsp.rename(tmp, path);
  } catch (err) {
    await fsp.rm(tmp, { force: true });
    throw err;
  }
  await fsyncDir(dir);
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

const held = new Map<string, Promise<void>>();

async function acquireFileLock(path: string): Promise<() => Promise<void>> {
  const deadline = Date.now() + LOCK_TIMEOUT_MS;
  // The lock is created with its content in one step (a temp file hard-linked into place), so
  // a holder killed at any moment leaves either no lock or one that names its dead pid.
  const tmp = join(path, '..', `.tmp-lock-${process.pid}-${randomBytes(6).toString('hex')}`);
  await fsp.writeFile(tmp, String(process.pid));
  try {
    for (;;) {
      try {
        await fsp.link(tmp, path);
        return () => fsp.rm(path, { force: true });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
      const text = (await fsp.readFile(path, 'utf8').catch(() => '')).trim();
      const owner = Number(text);
      // Our own pid cannot hold it (this process serialises its users in `held`): a leftover.
      // A lock without a pid is only ever a damaged one: stale once it is a few seconds old.
      const stale = owner > 0 ? owner === process.pid || !alive(owner) : Date.now() - ((await fsp.stat(path).catch(() => null))?.mtimeMs ?? 0) > 5000;
      if (stale) {
        if ((await fsp.readFile(path, 'utf8').catch(() => '')).trim() === text) await fsp.rm(path, { force: true });
        continue;
      }
      if (Date.now() > deadline) throw scError('SC_ERR_TIMEOUT', `machine lock ${path} held by pid ${owner || '?'}`);
      await new Promise((r) => setTimeout(r, 5));
    }
  } finally {
    await fsp.rm(tmp, { force: true });
  }
}

/** Runs `fn` holding the machine's write lock (in this process and across processes). */
async function withLock<T>(machineDir: string, fn: () => Promise<T>): Promise<T> {
  const dir = resolve(machineDir);
  const prev = held.get(dir) ?? Promise.resolve();
  let done!: () => void;
  const gate = new Promise<void>((r) => (done = r));
  const mine = prev.then(() => gate);
  held.set(dir, mine);
  await prev;
  try {
    const release = await acquireFileLock(paths(dir).lock);
    try {
      return await fn();
    } finally {
      await release();
    }
  } finally {
    done();
    if (held.get(dir) === mine) held.delete(dir);
  }
}

/** Reads machine.json. SC_ERR_NOT_FOUND when DIR is no sim machine; SC_ERR_BAD_CONFIG when it is corrupt. */
export async function readSimState(dir: string): Promise<SimState> {
  let text: string;
  try {
    text = await fsp.readFile(paths(dir).state, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw scError('SC_ERR_NOT_FOUND', `${dir} is not a sim machine (no machine.json); run stagecoach machine init`);
    throw err;
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    throw scError('SC_ERR_BAD_CONFIG', `${paths(dir).state} is not valid JSON`);
  }
  const r = simStateSchema.safeParse(raw);
  if (!r.success) throw scError('SC_ERR_BAD_CONFIG', `${paths(dir).state}: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  return r.data;
}

/** Reads running.json; a missing file reads as `down`. */
export async function readSimRunning(dir: string): Promise<SimRunning> {
  try {
    return JSON.parse(await fsp.readFile(paths(dir).running, 'utf8')) as SimRunning;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { state: 'down', at: new Date(0).toISOString(), reason: 'never booted' };
    throw err;
  }
}

/** Read-modify-write of machine.json under the lock. `fn` mutates the state; it is written when fn returns true. */
async function updateState<T>(dir: string, fn: (s: SimState) => Promise<[boolean, T]> | [boolean, T]): Promise<T> {
  return withLock(dir, async () => {
    const s = await readSimState(dir);
    const [changed, result] = await fn(s);
    if (changed) await writeJsonAtomic(paths(dir).state, simStateSchema.parse(s));
    return result;
  });
}

async function logAction(dir: string, op: string, fields: Record<string, unknown> = {}): Promise<void> {
  const line: SimAction = { at: new Date().toISOString(), pid: process.pid, op, ...fields };
  await fsp.appendFile(paths(dir).actions, `${JSON.stringify(line)}\n`);
}

/** The action log (actions.jsonl), oldest first; a torn last line is skipped. */
export async function readActionLog(dir: string): Promise<SimAction[]> {
  const text = await fsp.readFile(paths(dir).actions, 'utf8').catch(() => '');
  const out: SimAction[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    try {
      out.push(JSON.parse(line) as SimAction);
    } catch {
      // torn line from a kill -9
    }
  }
  return out;
}

async function removeTree(dir: string, p: string): Promise<void> {
  const trash = join(dir, `.trash-${randomBytes(6).toString('hex')}`);
  try {
    await fsp.rename(p, trash);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  await fsp.rm(trash, { recursive: true, force: true });
}

/**
 * Removes temp files and trash left by killed processes. Runs under the lock, so temp files of
 * this process are leftovers too; those of another live process (waiting for the lock) are not.
 */
async function cleanLeftovers(dir: string): Promise<void> {
  for (const e of await fsp.readdir(dir)) {
    const m = /^\.tmp-(?:lock-)?(\d+)-/.exec(e);
    const pid = m ? Number(m[1]) : 0;
    if ((m && (pid === process.pid || !alive(pid))) || e.startsWith('.trash-')) await fsp.rm(join(dir, e), { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// Devices

function splitDevice(device: string): { disk: string; part: string } {
  const m = typeof device === 'string' ? DEVICE_RE.exec(device) : null;
  if (!m) throw scError('SC_ERR_NO_DEVICE', `bad device name ${JSON.stringify(String(device).slice(0, 40))}: expected diskNpM`);
  return { disk: m[1], part: `p${m[2]}` };
}

function partitionOf(s: SimState, device: string) {
  const { disk, part } = splitDevice(device);
  const d = s.disks[disk];
  if (!d) throw scError('SC_ERR_NO_DEVICE', `this machine has no ${disk}`);
  const p = d.partitions.find((x) => x.name === part);
  if (!p) throw scError('SC_ERR_NO_DEVICE', `${disk} has no partition ${part}${d.partitions.length ? '' : ' (it is not partitioned)'}`);
  return { disk, part, p };
}

async function bootableOs(dir: string, s: SimState, device: string): Promise<{ ok: true; id: string; version: string } | { ok: false; reason: string }> {
  let where: { disk: string; part: string; p: { filesystem: string | null } };
  try {
    where = partitionOf(s, device);
  } catch {
    return { ok: false, reason: 'no such partition' };
  }
  if (!where.p.filesystem) return { ok: false, reason: 'no filesystem' };
  const rel = await readOsReleaseAt(paths(dir).part(where.disk, where.part));
  if (!rel) return { ok: false, reason: 'no bootable OS (no etc/os-release)' };
  return { ok: true, id: rel.ID, version: rel.VERSION_ID ?? '' };
}

// ---------------------------------------------------------------------------------------------
// The firmware

/** What one run of the firmware did. `booted` is false when nothing was pending (no-op). */
export interface SimBootResult {
  booted: boolean;
  running: RunningOs | null;
  fellBack: boolean;
  record: BootRecord | null;
}

/**
 * The sim firmware: boots the machine if a reboot is pending or it is not running (or always
 * with `force`, a power cycle), and writes running.json. One-shot entry first (consumed), then
 * default, then rescue; a candidate with a fail-boot fault or without an OS is skipped (a
 * `once` fault is consumed when it fails a boot). Returns {booted: false} when the machine was
 * already running and nothing was pending, so a supervisor can call it on every (re)start.
 */
export async function simBoot(dir: string, opts: { force?: boolean } = {}): Promise<SimBootResult> {
  return withLock(dir, async () => {
    await cleanLeftovers(dir);
    const s = await readSimState(dir);
    const cur = await readSimRunning(dir);
    if (!opts.force && !s.pendingReboot && cur.state === 'running') {
      return { booted: false, running: { id: cur.id, version: cur.version, device: cur.device }, fellBack: false, record: null };
    }
    const candidates = [...new Set([s.boot.once, s.boot.default, s.boot.rescue].filter((d): d is string => d !== null))];
    const tried: BootRecord['tried'] = [];
    let running: RunningOs | null = null;
    for (const device of candidates) {
      const fault = s.faults.failBoot[device];
      if (fault) {
        tried.push({ device, ok: false, reason: `fail-boot fault (${fault})` });
        if (fault === 'once') delete s.faults.failBoot[device];
        continue;
      }
      const b = await bootableOs(dir, s, device);
      if (!b.ok) {
        tried.push({ device, ok: false, reason: b.reason });
        continue;
      }
      tried.push({ device, ok: true });
      running = { id: b.id, version: b.version, device };
      break;
    }
    const at = new Date().toISOString();
    s.boots += 1;
    s.boot.once = null;
    s.pendingReboot = false;
    const record: BootRecord = { boot: s.boots, at, tried, booted: running?.device ?? null };
    s.bootLog = [...s.bootLog, record].slice(-BOOT_LOG_MAX);
    await writeJsonAtomic(paths(dir).state, simStateSchema.parse(s));
    const r: SimRunning = running
      ? { state: 'running', ...running, boot: s.boots, at }
      : { state: 'down', at, reason: tried.length ? tried.map((t) => `${t.device}: ${t.reason}`).join('; ') : 'no boot entry' };
    await writeJsonAtomic(paths(dir).running, r);
    await logAction(dir, 'boot', { boot: s.boots, booted: record.booted, tried });
    return { booted: true, running, fellBack: running !== null && running.device !== candidates[0], record };
  });
}

/** True when the machine has been told to reboot and the firmware has not run since. */
export async function simRebootPending(dir: string): Promise<boolean> {
  return (await readSimState(dir)).pendingReboot;
}

/**
 * Sets a fault: `fail-boot` makes boots from `device` fail (the firmware falls back to the
 * next entry) until cleared, or only the next such boot with `mode: 'once'`.
 */
export async function simFault(dir: string, fault: 'fail-boot', device: string, mode: 'always' | 'once' = 'always'): Promise<void> {
  if (fault !== 'fail-boot') throw scError('SC_ERR_BAD_REQUEST', `unknown fault ${JSON.stringify(String(fault).slice(0, 40))}`);
  splitDevice(device);
  await updateState(dir, (s) => {
    s.faults.failBoot[device] = mode;
    return [true, undefined];
  });
  await logAction(dir, 'fault', { fault, device, mode });
}

/** Clears every fault. */
export async function simClearFaults(dir: string): Promise<void> {
  await updateState(dir, (s) => {
    const had = Object.keys(s.faults.failBoot).length > 0;
    s.faults.failBoot = {};
    return [had, undefined];
  });
  await logAction(dir, 'clear-faults');
}

// ---------------------------------------------------------------------------------------------
// init

/** Options of `initSimMachine` (`stagecoach machine init`). */
export interface SimInitOptions {
  hostId: string;
  /** OS A's address with prefix, e.g. `10.0.0.5/24`. */
  ip: string;
  gateway: string;
  /** `<id>-<version>`; default `debian-11`. */
  os?: string;
  /** Default: derived from the host id (52:54:00:…). */
  mac?: string;
  /** Default `ens3`. */
  nic?: string;
  /** Default: the gateway. */
  dns?: string[];
  search?: string[];
  /** Default: the host id. */
  hostname?: string;
  /** authorized_keys content; default: one generated operator key. */
  authorizedKeys?: string;
  /** Nominal disk sizes in MiB (default 100 GiB each). */
  disk1SizeMiB?: number;
  disk2SizeMiB?: number;
}

/**
 * Creates a sim machine in `dir` (created if missing; it must be empty): OS A on disk1p1 with
 * os-release, native network config, an ed25519 host key, authorized_keys, hosts.allow/deny,
 * resolv.conf and the install marker; disk2 empty and unpartitioned. Then it boots A.
 * Throws SC_ERR_FILE_EXISTS for a non-empty dir, SC_ERR_BAD_CONFIG for bad options.
 */
export async function initSimMachine(dir: string, o: SimInitOptions): Promise<SimBootResult> {
  if (!NAME_RE.test(o.hostId ?? '')) throw scError('SC_ERR_BAD_CONFIG', `bad host id ${JSON.stringify(String(o.hostId).slice(0, 80))}`);
  if (!isCidr(o.ip ?? '') || !isIPv4(o.ip.split('/')[0])) throw scError('SC_ERR_BAD_CONFIG', `--ip must be an IPv4 address with a prefix, e.g. 10.0.0.5/24`);
  if (!isIPv4(o.gateway ?? '')) throw scError('SC_ERR_BAD_CONFIG', '--gateway must be an IPv4 address');
  const flavour = parseFlavour(o.os ?? 'debian-11');
  const mac = o.mac ? normalizeMac(o.mac) : `52:54:00:${createHash('sha256').update(o.hostId).digest('hex').slice(0, 6).match(/../g)!.join(':')}`;
  if (!mac) throw scError('SC_ERR_BAD_CONFIG', `bad MAC ${o.mac}`);
  const nic = o.nic ?? 'ens3';
  const hostKey = generateEd25519(`root@${o.hostname ?? o.hostId}`);
  const operator = generateEd25519('operator@stagecoach');
  const [addr, prefix] = o.ip.split('/');
  const net = addr
    .split('.')
    .map(Number)
    .reduce((a, b) => (a << 8) | b, 0);
  const mask = Number(prefix) === 0 ? 0 : (0xffffffff << (32 - Number(prefix))) >>> 0;
  const netAddr = [24, 16, 8, 0].map((sh) => ((net & mask) >>> sh) & 255).join('.');
  const cfg: CarryConfig = parseCarryConfig({
    hostname: o.hostname ?? o.hostId,
    interfaces: [{ name: nic, mac, addresses: [o.ip], gateway: o.gateway, dns: o.dns ?? [o.gateway], searchDomains: o.search ?? [] }],
    hostKeys: [{ path: '/etc/ssh/ssh_host_ed25519_key', type: 'ed25519', private: hostKey.private, public: hostKey.public }],
    authorizedKeys: o.authorizedKeys ?? `${operator.public}\n`,
    acl: [
      { path: '/etc/hosts.allow', content: `# /etc/hosts.allow: sshd only from the management network\nsshd: ${netAddr}/${prefix} 127.0.0.1\n` },
      { path: '/etc/hosts.deny', content: '# /etc/hosts.deny\nsshd: ALL\n' },
    ],
  });

  await fsp.mkdir(dir, { recursive: true });
  if ((await fsp.readdir(dir)).length) throw scError('SC_ERR_FILE_EXISTS', `${dir} is not empty`);
  const root = paths(dir).part('disk1', 'p1');
  await fsp.mkdir(join(dir, 'disks', 'disk2'), { recursive: true });
  await fsp.mkdir(root, { recursive: true });
  for (const d of ['bin', 'usr/bin', 'usr/lib', 'var/lib', 'var/log', 'tmp', 'root']) await fsp.mkdir(join(root, d), { recursive: true });
  await fsp.chmod(join(root, 'root'), 0o700);
  await fsp.chmod(join(root, 'tmp'), 0o1777);
  await writeInside(root, '/etc/os-release', osReleaseText(flavour), 0o644);
  await writeInside(root, '/etc/hosts', `127.0.0.1\tlocalhost\n${addr}\t${cfg.hostname}\n`, 0o644);
  for (const f of nativeFiles(flavour, cfg)) await writeInside(root, f.path, f.content, f.mode);
  await writeMarker(root, { id: flavour.id, version: flavour.version, netFormat: flavour.netFormat }, new Date().toISOString());

  const state: SimState = {
    schema: 1,
    hostId: o.hostId,
    nics: [{ name: nic, mac }],
    boot: { default: 'disk1p1', once: null, rescue: null },
    disks: {
      disk1: { sizeMiB: o.disk1SizeMiB ?? 102400, partitions: [{ name: 'p1', role: 'os-root', filesystem: 'ext4' }] },
      disk2: { sizeMiB: o.disk2SizeMiB ?? 102400, partitions: [] },
    },
    faults: { failBoot: {} },
    reboots: 0,
    boots: 0,
    pendingReboot: false,
    bootLog: [],
  };
  await writeJsonAtomic(paths(dir).state, simStateSchema.parse(state));
  await logAction(dir, 'init', { hostId: o.hostId, os: `${flavour.id}-${flavour.version}`, ip: o.ip });
  return simBoot(dir, { force: true });
}

// ---------------------------------------------------------------------------------------------
// The driver

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
