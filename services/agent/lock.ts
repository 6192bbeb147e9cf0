/**
 * One agent per machine. Two agents on one machine would both hold the host's stable lock token
 * and could run the same step at once, so an agent first takes an exclusive lock file: in the
 * sim machine's directory, or a pid file on Linux. The file holds the owner's pid; a file left by
 * a process that no longer exists (kill -9, reboot) is stale and taken over. Within one process
 * (the in-process fleet), a path is held at most once.
 */
import { open, readFile, unlink } from 'node:fs/promises';
import { scError } from '../../shared/errors.js';

const heldHere = new Set<string>();

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** A held machine lock. */
export interface MachineLock {
  path: string;
  /** Deletes the lock file if it is still ours. Idempotent. */
  release(): Promise<void>;
}

/**
 * Takes the lock file at `path`. Throws SC_ERR_CONFLICT when another live process (or another
 * agent in this process) holds it.
 */
export async function acquireMachineLock(path: string): Promise<MachineLock> {
  if (heldHere.has(path)) throw scError('SC_ERR_CONFLICT', `another agent in this process already runs this machine (${path})`);
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const fh = await open(path, 'wx', 0o644);
      await fh.writeFile(`${process.pid}\n`);
      await fh.sync();
      await fh.close();
      heldHere.add(path);
      let released = false;
      return {
        path,
        release: async () => {
          if (released) return;
          released = true;
          heldHere.delete(path);
          const owner = await readFile(path, 'utf8').catch(() => '');
          if (Number(owner.trim()) === process.pid) await unlink(path).catch(() => {});
        },
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
        throw scError('SC_ERR_BAD_CONFIG', `cannot create lock file ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
      }
    }
    const owner = Number((await readFile(path, 'utf8').catch(() => '')).trim());
    if (Number.isInteger(owner) && owner > 0 && owner !== process.pid && alive(owner)) {
      throw scError('SC_ERR_CONFLICT', `another agent (pid ${owner}) already runs this machine (${path})`);
    }
    // Stale: its owner is gone (or it is a leftover of this very process). Take it over.
    await unlink(path).catch(() => {});
  }
  throw scError('SC_ERR_CONFLICT', `could not take the lock file ${path}`);
}
