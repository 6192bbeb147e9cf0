/**
 * The sim machine's on-disk state: the schema of machine.json and running.json, the action log,
 * atomic JSON writes, the machine's write lock, and device names to partitions in that state.
 *
 * Writes to machine.json and running.json are atomic (shared/fs-atomic.ts: temp file, fsync,
 * rename, fsync of DIR) and serialised by the lock (read-modify-write, across processes; the pid
 * lock of ../lock.ts), so a kill -9 at any moment leaves either the old or the new state, never
 * a torn file. The directory layout is described
 * in sim.ts.
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { join, resolve } from 'node:path';
import { z } from 'zod';
import { scError } from '../../../shared/errors.js';
import { tempOwner, writeFileAtomic } from '../../../shared/fs-atomic.js';
import { NAME_RE } from '../../../shared/names.js';
import { processAlive, withPidLock } from '../lock.js';
import { MAC_RE, NIC_NAME_RE } from '../carry/types.js';
import { DEVICE_RE, DISK_RE, PARTITION_ROLES } from './driver.js';

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

/** machine.json as parsed and as written (strict: unknown keys are rejected). */
export const simStateSchema = z.strictObject({
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

const LOCK_TIMEOUT_MS = 10_000;

/** The files of machine directory `dir` (see the layout in sim.ts). */
export const paths = (dir: string) => ({
  state: join(dir, 'machine.json'),
  running: join(dir, 'running.json'),
  actions: join(dir, 'actions.jsonl'),
  lock: join(dir, 'machine.lock'),
  part: (disk: string, p: string) => join(dir, 'disks', disk, p),
});

// ---------------------------------------------------------------------------------------------
// Atomic files and the write lock

/** Writes JSON to `path` atomically and durably (shared/fs-atomic.ts: temp file, fsync, rename, fsync of the directory). */
export async function writeJsonAtomic(path: string, value: unknown): Promise<void> {
  await writeFileAtomic(path, `${JSON.stringify(value, null, 2)}\n`);
}

/**
 * Runs `fn` holding the machine's write lock: in this process (callers queue) and across
 * processes (the pid lock `machine.lock` of ../lock.ts; a lock of a dead process is taken over,
 * a live holder is waited for up to LOCK_TIMEOUT_MS, then SC_ERR_TIMEOUT).
 */
export async function withLock<T>(machineDir: string, fn: () => Promise<T>): Promise<T> {
  return withPidLock(paths(resolve(machineDir)).lock, { waitMs: LOCK_TIMEOUT_MS }, fn);
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
export async function updateState<T>(dir: string, fn: (s: SimState) => Promise<[boolean, T]> | [boolean, T]): Promise<T> {
  return withLock(dir, async () => {
    const s = await readSimState(dir);
    const [changed, result] = await fn(s);
    if (changed) await writeJsonAtomic(paths(dir).state, simStateSchema.parse(s));
    return result;
  });
}

/** Appends one line to actions.jsonl. */
export async function logAction(dir: string, op: string, fields: Record<string, unknown> = {}): Promise<void> {
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

/** Removes a tree by renaming it to trash first, so a half-deleted tree is never found in place. */
export async function removeTree(dir: string, p: string): Promise<void> {
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
export async function cleanLeftovers(dir: string): Promise<void> {
  for (const e of await fsp.readdir(dir)) {
    const pid = tempOwner(e);
    if ((pid !== null && (pid === process.pid || !processAlive(pid))) || e.startsWith('.trash-')) await fsp.rm(join(dir, e), { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// Devices

/** `diskNpM` → {disk, part: `pM`}; SC_ERR_NO_DEVICE for a bad name. */
export function splitDevice(device: string): { disk: string; part: string } {
  const m = typeof device === 'string' ? DEVICE_RE.exec(device) : null;
  if (!m) throw scError('SC_ERR_NO_DEVICE', `bad device name ${JSON.stringify(String(device).slice(0, 40))}: expected diskNpM`);
  return { disk: m[1], part: `p${m[2]}` };
}

/** The partition `device` names in `s`; SC_ERR_NO_DEVICE when the disk or partition does not exist. */
export function partitionOf(s: SimState, device: string) {
  const { disk, part } = splitDevice(device);
  const d = s.disks[disk];
  if (!d) throw scError('SC_ERR_NO_DEVICE', `this machine has no ${disk}`);
  const p = d.partitions.find((x) => x.name === part);
  if (!p) throw scError('SC_ERR_NO_DEVICE', `${disk} has no partition ${part}${d.partitions.length ? '' : ' (it is not partitioned)'}`);
  return { disk, part, p };
}
