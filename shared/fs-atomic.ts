/**
 * Durable, atomic file replacement: the one implementation of "temp file, fsync, rename, fsync
 * of the directory" in this project (the origin's metadata and tombstones, the agent's journal and
 * kept store, the sim machine's state, files written into a target OS root).
 *
 * Promise: after `writeFileAtomic(path, …)` resolves, a crash or power cut at any later moment
 * leaves the new content at `path`; a crash before that leaves the old content or the new one,
 * never a torn or empty file. A failed write removes its temp file.
 *
 * Temp files are hidden siblings named `.tmp-<pid>-<hex>` (or live in `tempDir`, which must be
 * on the same filesystem). Only a kill -9 or a power cut mid-write leaves one behind; its owner's
 * pid is in its name (`tempOwner`), so a cleaner can tell a dead writer's leftover from a live
 * writer's file.
 *
 * Why not the npm package `write-file-atomic` (7.0.1 is the newest for Node 20; 8.x needs Node
 * 22): it fsyncs the file but not the directory, so a power cut can lose a completed rename; it
 * resolves a symlink at the target with realpath() and writes where it points, which for a file
 * inside a target OS root (services/agent/carry/rootfs.ts) means outside that root; and its temp
 * file is `<name>.<number>`: visible, not telling its owner, and, when a power cut leaves one in
 * `/etc/network/interfaces.d/` or NetworkManager's connection directory, read by the target OS
 * as configuration. Wrapping it would still leave us the fsync code below plus a rename of our
 * own, so the whole job lives here instead, in one place.
 */
import { randomBytes } from 'node:crypto';
import type { WriteStream } from 'node:fs';
import { mkdir, open, rename, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';

/** Options of writeFileAtomic. */
export interface AtomicWriteOptions {
  /** The file's mode, exactly (set with fchmod, whatever the umask). Default 0o644. */
  mode?: number;
  /** Creates missing parent directories first. Default false. */
  mkdirs?: boolean;
  /** Directory for the temp file instead of the target's own (same filesystem: rename(2) must work). */
  tempDir?: string;
}

/** errno codes of a filesystem that cannot fsync this kind of file (a directory on some): not a failure. */
const FSYNC_UNSUPPORTED = new Set(['EINVAL', 'ENOTSUP', 'EOPNOTSUPP']);

/**
 * fsync(2) of a file or directory: of a file, so its bytes survive a crash; of a directory, so a
 * rename, link or unlink in it does. A filesystem that does not support it for this kind of file
 * is no error; any other failure (EIO, ENOENT …) is thrown.
 */
export async function fsyncPath(path: string): Promise<void> {
  const fh = await open(path, 'r');
  try {
    await fh.sync();
  } catch (err) {
    if (!FSYNC_UNSUPPORTED.has((err as NodeJS.ErrnoException).code ?? '')) throw err;
  } finally {
    await fh.close();
  }
}

/**
 * A write stream on `path`, which exists (opened with `flags`, default 'w') when this resolves.
 * fs.createWriteStream opens its file in the background instead: a pipeline whose source fails
 * first settles before that open is done, and a cleanup that then removes the file can run before
 * the open creates it (seen when the filesystem's journal is busy), leaving the file behind. The
 * stream closes the file when it finishes or is destroyed.
 */
export async function openWriteStream(path: string, o: { flags?: string; mode?: number; highWaterMark?: number } = {}): Promise<WriteStream> {
  const fh = await open(path, o.flags ?? 'w', o.mode ?? 0o666);
  return fh.createWriteStream({ highWaterMark: o.highWaterMark });
}

/** A fresh temp file path for a write to a file in `dir` (see the naming above). */
export function tempPathIn(dir: string): string {
  return join(dir, `.tmp-${process.pid}-${randomBytes(6).toString('hex')}`);
}

/**
 * The pid of the process that made temp file `name` (a base name), or null when `name` is no
 * temp file of this module. Also knows the `.tmp-lock-<pid>-…` names of earlier versions.
 */
export function tempOwner(name: string): number | null {
  const m = /^\.tmp-(?:lock-)?(\d+)-[0-9a-f]+$/.exec(name);
  return m ? Number(m[1]) : null;
}

/**
 * Puts an already written file `tmp` at `path` durably: fsync of `tmp`, rename(2) over `path`
 * (a file or symlink there is replaced, never followed), fsync of `path`'s directory. `tmp` must
 * be on the same filesystem. On failure `tmp` is left to the caller.
 */
export async function commitFile(tmp: string, path: string): Promise<void> {
  await fsyncPath(tmp);
  await renameDurably(tmp, path);
}

/** rename(2) of `from` over `to`, then fsync of `to`'s directory. */
async function renameDurably(from: string, to: string): Promise<void> {
  await rename(from, to);
  await fsyncPath(dirname(to));
}

/**
 * Replaces `path` with `data` atomically and durably (see the top of this file). A symlink at
 * `path` is replaced, never followed. Throws the filesystem's error (ENOENT for a missing parent
 * without `mkdirs`, ENOSPC …) with no temp file left behind.
 */
export async function writeFileAtomic(path: string, data: string | Uint8Array, opts: AtomicWriteOptions = {}): Promise<void> {
  const mode = opts.mode ?? 0o644;
  if (opts.mkdirs) await mkdir(dirname(path), { recursive: true });
  const tmp = tempPathIn(opts.tempDir ?? dirname(path));
  try {
    const fh = await open(tmp, 'wx', mode);
    try {
      await fh.writeFile(data);
      await fh.chmod(mode);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await renameDurably(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true }).catch(() => {});
    throw err;
  }
}
