/**
 * The packer: a deterministic tar stream of a directory tree (header blocks from tar-entry.ts).
 *
 * Packing (`packDirStream`) writes POSIX ustar + PAX, as GNU tar `--xattrs --numeric-owner`
 * does: entries in sorted order (depth first, byte order of names), relative paths without a
 * leading `./`, modes (setuid/setgid/sticky included), numeric owners, mtimes (whole seconds;
 * no atime, so the same tree gives the same bytes), symlinks, FIFOs, character and block
 * devices, empty directories. A file with several names is packed once: later names are
 * hardlink entries to the first one in archive order. Extended attributes (security.*,
 * trusted.*, user.*, POSIX ACLs) go in `SCHILY.xattr.<name>` PAX records; paths and link targets that do
 * not fit a ustar header (long, or not ASCII) go in PAX `path`/`linkpath`, owners above the
 * ustar range in PAX `uid`/`gid`. Sockets are not packed (tar has no type for them). Sparse
 * files are read through, holes as zeros: streamed, never held in memory.
 */
import type { Stats } from 'node:fs';
import { createReadStream } from 'node:fs';
import { lstat, readdir, readlink } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { PassThrough, type Readable } from 'node:stream';
import { fsFailure, scError } from '../errors.js';
import { deviceNumbers, headerBlocks, type PackEntry, ZEROS_512 } from './tar-entry.js';
import { drained } from './tar-io.js';
import { readXattrs } from './xattr.js';

/** Every packable path under root, sorted, parents before children. Sockets are left out. */
async function* walk(root: string, rel: string): AsyncGenerator<string> {
  const dirents = await readdir(rel ? join(root, rel) : root, { withFileTypes: true });
  dirents.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  for (const d of dirents) {
    const p = rel ? `${rel}/${d.name}` : d.name;
    if (d.isDirectory()) {
      yield p;
      yield* walk(root, p);
    } else if (!d.isSocket()) {
      yield p;
    }
  }
}

/**
 * Streams a tar of the tree under `dir` (not including `dir` itself), in sorted order (see the
 * module comment for what is carried). The stream fails with SC_ERR_BAD_REQUEST when `dir` is
 * not a readable directory or a file changes size while packed, SC_ERR_UNSUPPORTED_XATTR for
 * an extended attribute outside security.*, trusted.*, user.* and POSIX ACLs, SC_ERR_INTERNAL with the
 * file system error met otherwise. Paths are walked as the stream is read; file contents are
 * streamed, never held whole.
 */
export function packDirStream(dir: string): Readable {
  const root = resolve(dir);
  const out = new PassThrough({ highWaterMark: 1 << 20 });
  const put = async (buf: Buffer) => {
    if (buf.length && !out.write(buf)) await drained(out);
  };
  const fail = (err: unknown) => {
    if (out.destroyed) return;
    const e = err as NodeJS.ErrnoException;
    out.destroy(fsFailure(err, `packing ${root}`, e?.path ? String(e.path) : undefined));
  };
  (async () => {
    let st: Stats;
    try {
      st = await lstat(root);
    } catch (err) {
      throw scError('SC_ERR_BAD_REQUEST', `cannot read directory ${root}: ${(err as NodeJS.ErrnoException).code}`);
    }
    if (!st.isDirectory()) throw scError('SC_ERR_BAD_REQUEST', `not a directory: ${root}`);
    /** dev:ino → the first name packed for a file with several names. */
    const inodes = new Map<string, string>();
    for await (const rel of walk(root, '')) {
      if (out.destroyed) return;
      const abs = join(root, rel);
      const s = await lstat(abs);
      const e: PackEntry = {
        path: s.isDirectory() ? `${rel}/` : rel,
        type: 'File',
        mode: s.mode & 0o7777,
        uid: s.uid,
        gid: s.gid,
        size: 0,
        mtime: Math.floor(s.mtimeMs / 1000),
        linkpath: '',
        devmaj: 0,
        devmin: 0,
        xattrs: [],
      };
      const key = `${s.dev}:${s.ino}`;
      const firstName = !s.isDirectory() && s.nlink > 1 ? inodes.get(key) : undefined;
      if (firstName !== undefined) {
        e.type = 'Link';
        e.linkpath = firstName;
      } else {
        if (!s.isDirectory() && s.nlink > 1) inodes.set(key, rel);
        if (s.isDirectory()) e.type = 'Directory';
        else if (s.isSymbolicLink()) {
          e.type = 'SymbolicLink';
          e.linkpath = await readlink(abs);
        } else if (s.isFIFO()) e.type = 'FIFO';
        else if (s.isCharacterDevice() || s.isBlockDevice()) {
          e.type = s.isCharacterDevice() ? 'CharacterDevice' : 'BlockDevice';
          Object.assign(e, deviceNumbers(s.rdev));
        } else e.size = s.size;
        e.xattrs = await readXattrs(abs, rel);
      }
      for (const b of headerBlocks(e)) await put(b);
      if (e.type !== 'File' || e.size === 0) continue;
      let sent = 0;
      for await (const chunk of createReadStream(abs, { highWaterMark: 1 << 20, end: e.size - 1 })) {
        sent += (chunk as Buffer).length;
        await put(chunk as Buffer);
        if (out.destroyed) return;
      }
      if (sent !== e.size) {
        throw scError('SC_ERR_BAD_REQUEST', `${rel} changed while it was packed (${sent} bytes read, ${e.size} expected)`, { path: rel });
      }
      await put(ZEROS_512.subarray(0, (512 - (e.size % 512)) % 512));
    }
    // End of archive: two zero blocks.
    await put(Buffer.alloc(1024));
    out.end();
  })().catch(fail);
  return out;
}
