/**
 * The agent's one pid-lock module: a lock file that names its holder's process, and whose holder
 * is known to be gone the moment that process no longer exists. Two locks use it:
 * - the machine lock (`acquireMachineLock`): one agent per machine, held for the agent's life.
 *   Two agents on one machine would both hold the host's stable lock token and could run the same
 *   step at once. It is the sim machine's `agent.lock`, or the pid file on Linux.
 * - the sim machine's short write lock (`machine.lock`, machine/sim-state.ts, `withPidLock`), which
 *   serialises read-modify-writes of its state files across processes.
 *
 * ## Algorithm
 * The lock file is created with its whole content in one step: written to a temp file, then
 * link(2)ed to its name (EEXIST: someone holds it). So a holder killed at any moment leaves no
 * lock, or one that names it; never an empty file that a contender would take for stale while
 * its creator is still writing. Content: `<pid>\n<boot id>\n<process start time>\n` (the first
 * line alone is a classic pid file). A held lock is stale, and is taken over, when:
 * - its boot id is not this boot's (the machine rebooted since: a pid file kept on disk);
 * - its pid is ours (a leftover of this process: live holds in this process are tracked in
 *   memory and never get that far);
 * - no process has its pid (kill -9, crash), or the process that has it started at another time
 *   than the holder did (the pid was reused);
 * - it names no pid (its content was lost in a power cut) and is older than 5 s.
 * The take-over renames the stale file away and checks that it moved the very file it judged
 * (same inode and content), so two contenders cannot both remove one stale lock and then each
 * other's fresh one.
 * Within one process a path is held at most once: a second acquire waits for the first release
 * (with `waitMs`) or is refused.
 *
 * ## Why not proper-lockfile
 * proper-lockfile (4.1.2) takes a `<file>.lock` directory with mkdir(2) and judges staleness by
 * its mtime, which the holder must refresh on a timer (every 5 s, stale after 10 s by default).
 * That fits a lock on a network filesystem, where pids mean nothing. Here it does not: a dead
 * holder is seen only after the stale period (an agent restarted by systemd after a crash would
 * be refused for 10 s, and the sim firmware would wait 10 s at every takeover, where the pid says
 * at once that the holder is gone), and a live holder whose event loop stops for longer than the
 * stale period (the crash-point hooks freeze the whole process for up to a minute; a busy
 * 2-core host) loses its lock to a second agent: the failure this lock exists to prevent.
 * Everything lives on the local disk of one machine, where the kernel knows exactly which
 * processes are alive.
 */
import { readFileSync } from 'node:fs';
import { link, open, readFile, rename, rm, stat } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { scError } from '../../shared/errors.js';
import { describeErrno } from '../../shared/files.js';
import { tempPathIn } from '../../shared/fs-atomic.js';

/** A lock without a pid younger than this is a holder's being created, not a damaged one (ms). */
const DAMAGED_AFTER_MS = 5000;

/** A held lock. */
export interface PidLock {
  /** The lock file (absolute). */
  readonly path: string;
  /** Deletes the lock file if it still names this process. Idempotent. */
  release(): Promise<void>;
}

/** Options of acquirePidLock. */
export interface PidLockOptions {
  /**
   * How long to wait for another process's lock, ms. 0 (the default): refuse at once with
   * SC_ERR_CONFLICT, also when this process holds it. Otherwise a holder in this process is
   * waited for without limit, then one in another process for up to `waitMs` (SC_ERR_TIMEOUT).
   */
  waitMs?: number;
  /** Poll interval while waiting for another process, ms. Default 5. */
  pollMs?: number;
}

/** True when a process with this pid exists (it may belong to another user). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** The kernel's id of this boot (Linux), or '' where there is none. */
const bootId: string = (() => {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return '';
  }
})();

/** When process `pid` started, in clock ticks since boot (Linux /proc), or '' when unknown. */
function startTime(pid: number | 'self'): string {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may hold spaces and parentheses): state is field 3, starttime field 22.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? '';
  } catch {
    return '';
  }
}

const ownStart = startTime('self');

/** Paths held by this process, each with the promise of its release. */
const heldHere = new Map<string, Promise<void>>();

/** What a lock file says about its holder. */
interface Holder {
  pid: number;
  boot: string;
  start: string;
}

function parseHolder(text: string): Holder | null {
  const [pid, boot = '', start = ''] = text.split('\n');
  const n = Number(pid);
  return /^\d+$/.test(pid) && Number.isSafeInteger(n) && n > 0 ? { pid: n, boot, start } : null;
}

/** Whether the lock whose file says `text` (last changed at `mtimeMs`) is stale (see the top of this file). */
function isStale(text: string, mtimeMs: number): boolean {
  const h = parseHolder(text);
  if (!h) return Date.now() - mtimeMs > DAMAGED_AFTER_MS;
  if (h.boot && bootId && h.boot !== bootId) return true;
  if (h.pid === process.pid) return true;
  if (!processAlive(h.pid)) return true;
  if (h.start) {
    const now = startTime(h.pid);
    if (now && now !== h.start) return true;
  }
  return false;
}

/**
 * Takes the lock file at `path` (see the top of this file). Throws SC_ERR_CONFLICT when it is
 * held (by a live process, or already in this process) and `waitMs` is 0, SC_ERR_TIMEOUT when it
 * is still held by another process after `waitMs`, SC_ERR_FILE_ACCESS when the file cannot be
 * created (no such directory, read-only …).
 */
export async function acquirePidLock(path: string, opts: PidLockOptions = {}): Promise<PidLock> {
  const file = resolve(path);
  const waitMs = opts.waitMs ?? 0;
  for (let h = heldHere.get(file); h; h = heldHere.get(file)) {
    if (waitMs <= 0) throw scError('SC_ERR_CONFLICT', `lock ${file} is already held in this process (pid ${process.pid})`, { path: file, pid: process.pid });
    await h;
  }
  let released!: () => void;
  heldHere.set(file, new Promise<void>((r) => (released = r)));
  const forget = () => {
    heldHere.delete(file);
    released();
  };
  try {
    await takeFile(file, waitMs, opts.pollMs ?? 5);
  } catch (err) {
    forget();
    throw err;
  }
  let done = false;
  return {
    path: file,
    release: async () => {
      if (done) return;
      done = true;
      try {
        const h = parseHolder(await readFile(file, 'utf8').catch(() => ''));
        if (h?.pid === process.pid) await rm(file, { force: true });
      } finally {
        forget();
      }
    },
  };
}

/** Runs `fn` holding the lock at `path` (acquirePidLock with `opts`), released however `fn` ends. */
export async function withPidLock<T>(path: string, opts: PidLockOptions, fn: () => Promise<T>): Promise<T> {
  const lock = await acquirePidLock(path, opts);
  try {
    return await fn();
  } finally {
    await lock.release();
  }
}

async function takeFile(file: string, waitMs: number, pollMs: number): Promise<void> {
  const deadline = Date.now() + waitMs;
  const tmp = tempPathIn(dirname(file));
  const content = `${process.pid}\n${bootId}\n${ownStart}\n`;
  try {
    await writeNew(tmp, content);
    for (;;) {
      try {
        await link(tmp, file);
        return;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        // A cleaner of temp files of this process (sim-state.ts cleanLeftovers) took ours: again.
        if (code === 'ENOENT') {
          await writeNew(tmp, content);
          continue;
        }
        if (code !== 'EEXIST') throw accessError(file, err);
      }
      const text = await readFile(file, 'utf8').catch(() => null);
      const st = await stat(file).catch(() => null);
      if (text === null || !st) continue; // released meanwhile: try again at once
      if (isStale(text, st.mtimeMs)) {
        await removeStale(file, st.ino, text);
        continue;
      }
      const who = parseHolder(text)?.pid ?? '?';
      if (waitMs <= 0) throw scError('SC_ERR_CONFLICT', `lock ${file} is held by pid ${who}`, { path: file, pid: who });
      if (Date.now() > deadline) throw scError('SC_ERR_TIMEOUT', `lock ${file} still held by pid ${who} after ${waitMs} ms`, { path: file, pid: who });
      await new Promise((r) => setTimeout(r, pollMs));
    }
  } finally {
    await rm(tmp, { force: true });
  }
}

/** Creates `path` (which must not exist) with `text`; SC_ERR_FILE_ACCESS when it cannot. */
async function writeNew(path: string, text: string): Promise<void> {
  let fh: Awaited<ReturnType<typeof open>>;
  try {
    fh = await open(path, 'wx', 0o644);
  } catch (err) {
    throw accessError(path, err);
  }
  try {
    await fh.writeFile(text);
  } finally {
    await fh.close();
  }
}

/**
 * Removes the stale lock `file` if it is still the one judged (inode `ino`, content `text`): it
 * is renamed away first (only one contender can move it), and put back when it turns out to be
 * a fresh lock that replaced the stale one meanwhile.
 */
async function removeStale(file: string, ino: number, text: string): Promise<void> {
  const aside = tempPathIn(dirname(file));
  try {
    await rename(file, aside);
  } catch {
    return; // someone else moved it: look again
  }
  try {
    const judged = await stat(aside)
      .then(async (st) => st.ino === ino && (await readFile(aside, 'utf8')) === text)
      .catch(() => true); // gone already: nothing to put back
    if (!judged) await link(aside, file).catch(() => {});
  } finally {
    await rm(aside, { force: true });
  }
}

function accessError(path: string, err: unknown) {
  return scError('SC_ERR_FILE_ACCESS', `cannot create lock file ${path}: ${describeErrno(err)}`, { path });
}

/** A held machine lock (`acquireMachineLock`). */
export type MachineLock = PidLock;

/**
 * Takes the machine lock at `path` without waiting. Throws SC_ERR_CONFLICT when another live
 * process (or another agent in this process) runs this machine; SC_ERR_FILE_ACCESS when the
 * file cannot be created.
 */
export async function acquireMachineLock(path: string): Promise<MachineLock> {
  try {
    return await acquirePidLock(path);
  } catch (err) {
    if ((err as { code?: string }).code !== 'SC_ERR_CONFLICT') throw err;
    throw scError('SC_ERR_CONFLICT', `another agent already runs this machine (${(err as Error).message})`, { path: resolve(path) });
  }
}
