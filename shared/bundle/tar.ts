/**
 * Tar for root filesystems (node-tar 7): a deterministic packer and an extractor that can
 * never write outside its target.
 *
 * Packing: entries in sorted order (depth first, byte order of names), relative paths without
 * a leading `./`, modes (setuid/setgid/sticky included), numeric owners, mtimes, symlinks,
 * hardlinks and empty directories. Sockets, FIFOs and device nodes are not packed: a booted
 * system gets its device nodes from devtmpfs/udev.
 *
 * Extraction (`safeExtract`) refuses the whole archive with SC_ERR_UNSAFE_ARCHIVE, before
 * writing the offending entry, when an entry
 * - has an absolute path or a `..` segment, or is not a directory but names the target itself;
 * - has a parent path that goes through a symlink (one from this archive or one already on
 *   disk). Once a path has been a symlink in the archive, nothing may be extracted below it;
 * - is a hardlink whose target is absolute, uses `..`, or goes through a symlink;
 * - is a symlink whose target leaves the tree: relative targets are resolved against the
 *   link's directory; absolute targets are root-relative, as in a chroot, so they always stay
 *   inside (`/usr/bin/awk -> /etc/alternatives/awk` is fine and is kept verbatim).
 *
 * node-tar writes files and directories with its own path protections left on. It never sees
 * a symlink: those are created afterwards by safeExtract (node-tar would strip the `/` of
 * absolute targets), so no entry can ever be written through a link made by the archive.
 * Device nodes and FIFOs are skipped (node-tar does not create them) and counted.
 */
import type { Stats } from 'node:fs';
import { lstatSync } from 'node:fs';
import { chmod, lchown, link, lstat, lutimes, mkdir, readdir, rm, rmdir, symlink, unlink, utimes } from 'node:fs/promises';
import { dirname, join, posix, resolve } from 'node:path';
import { PassThrough, type Readable } from 'node:stream';
import * as tar from 'tar';
import { type ErrorCode, isScError, type ScError, scError } from '../errors.js';

/** What `safeExtract` did. */
export interface ExtractResult {
  /** Archive entries read (meta headers excluded), skipped ones included. */
  entries: number;
  /** Device nodes and FIFOs that were not created. */
  skipped: number;
}

const FILE_TYPES = new Set(['File', 'OldFile', 'ContiguousFile']);
const DIR_TYPES = new Set(['Directory', 'GNUDumpDir']);
const SKIPPED_TYPES = new Set(['CharacterDevice', 'BlockDevice', 'FIFO']);

async function* walk(root: string, rel: string): AsyncGenerator<string> {
  const dirents = await readdir(rel ? join(root, rel) : root, { withFileTypes: true });
  dirents.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  for (const d of dirents) {
    const p = rel ? `${rel}/${d.name}` : d.name;
    if (d.isDirectory()) {
      yield p;
      yield* walk(root, p);
    } else if (d.isFile() || d.isSymbolicLink()) {
      yield p;
    }
    // sockets, FIFOs and device nodes are not packed (see the module comment)
  }
}

/**
 * Streams a tar of the tree under `dir` (not including `dir` itself), in sorted order. The
 * stream fails with SC_ERR_BAD_REQUEST when `dir` is not a readable directory, or with the
 * file system error met while reading. Paths are queued as the walk finds them; file contents
 * are streamed, never held whole.
 */
export function packDirStream(dir: string): Readable {
  const root = resolve(dir);
  const out = new PassThrough({ highWaterMark: 1 << 20 });
  // jobs: 1. With several entries in flight, node-tar 7.5's packer defers a hardlinked file
  // whose inode it has not written yet, and when such a group ends the archive it writes the
  // EOF blocks and then the deferred entries: "write after end", thrown from a callback (the
  // process dies). One entry at a time, the first name of an inode is always written first.
  const pack = new tar.Pack({ cwd: root, noDirRecurse: true, strict: true, portable: false, jobs: 1 });
  const fail = (err: unknown) => {
    if (out.destroyed) return;
    const e = err as NodeJS.ErrnoException;
    out.destroy(isScError(err) ? err : scError('SC_ERR_INTERNAL', `packing ${root}: ${e.code ?? ''} ${e.message}`.trim(), undefined, err));
  };
  pack.on('error', fail);
  out.on('close', () => {
    if (!out.readableEnded) (pack as unknown as { destroy?: () => void }).destroy?.();
  });
  pack.pipe(out);
  (async () => {
    let st: Stats;
    try {
      st = await lstat(root);
    } catch (err) {
      throw scError('SC_ERR_BAD_REQUEST', `cannot read directory ${root}: ${(err as NodeJS.ErrnoException).code}`);
    }
    if (!st.isDirectory()) throw scError('SC_ERR_BAD_REQUEST', `not a directory: ${root}`);
    for await (const p of walk(root, '')) {
      if (out.destroyed) return;
      pack.write(p);
    }
    pack.end();
  })().catch(fail);
  return out;
}

/** Normalises an archive path to `a/b/c` ('' for the root); throws SC_ERR_UNSAFE_ARCHIVE. */
function archivePath(p: string, what: string): string {
  if (p.includes('\0')) throw unsafe(`${what} contains a NUL byte`, p);
  if (p.startsWith('/')) throw unsafe(`${what} is absolute`, p);
  const parts = p.split('/').filter((s) => s !== '' && s !== '.');
  if (parts.includes('..')) throw unsafe(`${what} contains '..'`, p);
  return parts.join('/');
}

function unsafe(why: string, path: string, extra?: Record<string, unknown>): ScError {
  return scError('SC_ERR_UNSAFE_ARCHIVE', `unsafe archive entry ${JSON.stringify(path.slice(0, 300))}: ${why}`, { path: path.slice(0, 300), ...extra });
}

/** Work left for after node-tar: the final state wanted at one path. */
type Fixup =
  | { kind: 'file' | 'dir'; mode: number; mtime?: Date }
  | { kind: 'symlink'; target: string; mtime?: Date; uid?: number; gid?: number }
  | { kind: 'hardlink'; target: string };

/**
 * Validates entries in archive order. It remembers the symlinks the archive created and the
 * parent directories already checked on disk, so each prefix is looked at once.
 */
class EntryGuard {
  readonly #root: string;
  readonly #symlinks = new Set<string>();
  readonly #checked = new Set<string>();

  constructor(root: string) {
    this.#root = root;
  }

  /** Throws SC_ERR_UNSAFE_ARCHIVE unless no proper prefix of `rel` is a symlink. */
  #checkParents(rel: string, raw: string, what: string): void {
    const parts = rel.split('/');
    let prefix = '';
    for (let i = 0; i < parts.length - 1; i++) {
      prefix = prefix ? `${prefix}/${parts[i]}` : parts[i];
      if (this.#symlinks.has(prefix)) throw unsafe(`${what} goes through the symlink ${prefix}`, raw);
      if (this.#checked.has(prefix)) continue;
      let st: Stats | undefined;
      try {
        st = lstatSync(join(this.#root, prefix));
      } catch {
        st = undefined; // missing: node-tar creates it as a directory
      }
      if (st?.isSymbolicLink()) throw unsafe(`${what} goes through the existing symlink ${prefix}`, raw);
      this.#checked.add(prefix);
    }
  }

  /** Validates one entry; returns its normalised path. Throws SC_ERR_UNSAFE_ARCHIVE. */
  check(entry: tar.ReadEntry): string {
    const raw = String(entry.path);
    const rel = archivePath(raw, 'path');
    const type = entry.type;
    if (rel === '' && !DIR_TYPES.has(type)) throw unsafe(`a ${type} entry would replace the extraction root`, raw);
    if (rel !== '') this.#checkParents(rel, raw, 'path');
    if (type === 'SymbolicLink') {
      const target = String(entry.linkpath ?? '');
      if (!target || target.includes('\0')) throw unsafe('symlink has an empty or invalid target', raw);
      if (!target.startsWith('/')) {
        const resolved = posix.normalize(posix.join(posix.dirname(rel), target));
        if (resolved === '..' || resolved.startsWith('../')) throw unsafe(`symlink target ${JSON.stringify(target)} leaves the target`, raw, { linkpath: target });
      }
      this.#symlinks.add(rel);
      this.#checked.delete(rel);
    } else if (type === 'Link') {
      const target = archivePath(String(entry.linkpath ?? ''), 'hardlink target');
      if (!target) throw unsafe('hardlink target is the extraction root or empty', raw);
      this.#checkParents(target, raw, 'hardlink target');
    }
    return rel;
  }
}

function tarFailure(err: unknown, fallback: ErrorCode): ScError {
  if (isScError(err)) return err;
  const e = err as Error & { code?: string; tarCode?: string; path?: string };
  if (e?.code === 'TAR_SYMLINK_ERROR') return scError('SC_ERR_UNSAFE_ARCHIVE', `unsafe archive: ${e.message}`, { path: e.path });
  if (e?.tarCode === 'TAR_BAD_ARCHIVE' || e?.tarCode === 'TAR_ENTRY_INVALID') {
    return scError('SC_ERR_BAD_ARCHIVE', `tar: ${e.message}`, undefined, err);
  }
  const errno = typeof e?.code === 'string' && /^E[A-Z]+$/.test(e.code) ? e.code : undefined;
  return scError(fallback, `tar extraction failed: ${e?.message ?? String(err)}`, errno ? { errno, path: e.path } : undefined, err);
}

/** Creates (or replaces a file or empty directory with) a symlink; parents are already checked. */
async function placeSymlink(abs: string, target: string, rel: string): Promise<void> {
  await mkdir(dirname(abs), { recursive: true });
  try {
    await symlink(target, abs);
    return;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  }
  const st = await lstat(abs);
  try {
    await (st.isDirectory() ? rmdir(abs) : unlink(abs));
  } catch (err) {
    throw scError('SC_ERR_BAD_ARCHIVE', `symlink ${rel} would replace a non-empty directory`, { path: rel }, err);
  }
  await symlink(target, abs);
}

/**
 * Applies what node-tar was not asked to do, after it has written everything: symlinks (and
 * hardlinks to them) first, then exact file modes, then directory modes and mtimes (last, since
 * creating entries changes a directory's mtime).
 */
async function applyFixups(root: string, fixups: Map<string, Fixup>, asRoot: boolean): Promise<void> {
  const uid = process.getuid?.();
  const gid = process.getgid?.();
  const abs = (rel: string) => (rel ? join(root, rel) : root);
  const batch = async <T>(items: T[], fn: (x: T) => Promise<void>) => {
    for (let i = 0; i < items.length; i += 32) await Promise.all(items.slice(i, i + 32).map(fn));
  };
  const all = [...fixups];
  await batch(all, async ([rel, f]) => {
    if (f.kind !== 'symlink') return;
    const p = abs(rel);
    await placeSymlink(p, f.target, rel);
    if (asRoot && typeof f.uid === 'number' && typeof f.gid === 'number' && (f.uid !== uid || f.gid !== gid)) await lchown(p, f.uid, f.gid);
    if (f.mtime) await lutimes(p, f.mtime, f.mtime);
  });
  for (const [rel, f] of all) {
    if (f.kind !== 'hardlink') continue;
    await rm(abs(rel), { force: true });
    await link(abs(f.target), abs(rel));
  }
  const setMode = async ([rel, f]: [string, Fixup], kind: 'file' | 'dir') => {
    if (f.kind !== kind) return;
    let st: Stats;
    try {
      st = await lstat(abs(rel));
    } catch {
      return;
    }
    if (kind === 'file' ? !st.isFile() : !st.isDirectory()) return;
    if ((st.mode & 0o7777) !== f.mode) await chmod(abs(rel), f.mode);
    if (kind === 'dir' && f.mtime) await utimes(abs(rel), f.mtime, f.mtime);
  };
  await batch(all, (x) => setMode(x, 'file'));
  await batch(all, (x) => setMode(x, 'dir'));
}

/**
 * Extracts the tar stream `src` into `targetDir` (created if missing), refusing anything that
 * could escape it (see the module comment). Modes are kept exactly (setuid, setgid, sticky,
 * regardless of the process umask), and owners too when running as root; directory and
 * symlink mtimes are restored after their contents are written.
 *
 * Rejects with SC_ERR_UNSAFE_ARCHIVE for an unsafe entry (nothing of that entry is written),
 * SC_ERR_BAD_ARCHIVE for a corrupt or truncated archive or an unsupported entry type, the
 * error `src` failed with, or SC_ERR_INTERNAL for a file system error (details.errno). On
 * failure `src` is destroyed and entries before the failing one may already be written
 * (inside the target): callers clean the target up.
 */
export async function safeExtract(src: Readable, targetDir: string): Promise<ExtractResult> {
  const root = resolve(targetDir);
  // Listen before the first await: an upstream stage may fail while the target is created.
  let early: unknown;
  const onEarly = (err: unknown) => {
    early ??= err;
  };
  src.on('error', onEarly);
  try {
    await mkdir(root, { recursive: true });
  } catch (err) {
    src.destroy();
    throw scError('SC_ERR_INTERNAL', `cannot create ${root}: ${(err as NodeJS.ErrnoException).code}`, { errno: (err as NodeJS.ErrnoException).code });
  }
  const asRoot = process.getuid?.() === 0;
  // process.umask() without an argument reads the mask without changing it.
  const umask = process.umask();
  const guard = new EntryGuard(root);
  const fixups = new Map<string, Fixup>();
  let entries = 0;
  let skipped = 0;

  return new Promise<ExtractResult>((resolvePromise, reject) => {
    let failed: ScError | undefined;
    let unpack: tar.Unpack;
    const fail = (err: unknown, fallback: ErrorCode = 'SC_ERR_INTERNAL') => {
      if (failed) return;
      failed = tarFailure(err, fallback);
      src.unpipe(unpack);
      src.destroy();
      reject(failed);
    };

    const filter = (_path: string, e: Stats | tar.ReadEntry): boolean => {
      if (failed) return false;
      const entry = e as tar.ReadEntry;
      entries++;
      let rel: string;
      try {
        rel = guard.check(entry);
      } catch (err) {
        fail(err);
        unpack.abort(new Error('unsafe archive entry'));
        return false;
      }
      // The last entry for a path decides what is there: forget earlier plans for it.
      fixups.delete(rel);
      const mode = (entry.mode ?? 0) & 0o7777;
      if (DIR_TYPES.has(entry.type)) {
        fixups.set(rel, { kind: 'dir', mode, mtime: entry.mtime });
      } else if (FILE_TYPES.has(entry.type)) {
        if (mode & 0o7000 || mode & umask) fixups.set(rel, { kind: 'file', mode });
      } else if (entry.type === 'SymbolicLink') {
        // node-tar would strip the leading '/' of absolute targets; symlinks are made afterwards.
        fixups.set(rel, { kind: 'symlink', target: String(entry.linkpath), mtime: entry.mtime, uid: entry.uid, gid: entry.gid });
        return false;
      } else if (entry.type === 'Link') {
        const target = archivePath(String(entry.linkpath), 'hardlink target');
        const k = fixups.get(target)?.kind;
        if (k === 'symlink' || k === 'hardlink') {
          fixups.set(rel, { kind: 'hardlink', target });
          return false;
        }
      }
      return true;
    };

    unpack = tar.x({
      cwd: root,
      strict: false,
      preservePaths: false,
      preserveOwner: asRoot,
      unlink: false,
      chmod: true,
      processUmask: umask,
      maxDepth: 1024,
      zstd: false,
      brotli: false,
      filter,
      onwarn: (code, message, data) => {
        if (code === 'TAR_ENTRY_INFO') return;
        const type = (data.entry as tar.ReadEntry | undefined)?.type;
        if (code === 'TAR_ENTRY_UNSUPPORTED' && type && SKIPPED_TYPES.has(type)) {
          skipped++;
          return;
        }
        if (code === 'TAR_ENTRY_UNSUPPORTED') {
          fail(scError('SC_ERR_BAD_ARCHIVE', `unsupported tar entry type ${type}`, { path: String((data.entry as tar.ReadEntry | undefined)?.path ?? '') }));
          return;
        }
        const err = data instanceof Error ? data : Object.assign(new Error(message), data);
        fail(err, code === 'TAR_ENTRY_INVALID' ? 'SC_ERR_BAD_ARCHIVE' : 'SC_ERR_INTERNAL');
      },
    });
    unpack.on('error', (err: Error) => fail(err));
    unpack.on('close', () => {
      if (failed) return;
      applyFixups(root, fixups, asRoot).then(
        () => (failed ? undefined : resolvePromise({ entries, skipped })),
        (err) => fail(err),
      );
    });
    src.on('error', (err) => fail(err));
    src.off('error', onEarly);
    if (early !== undefined) return fail(early);
    src.pipe(unpack);
  });
}

/**
 * Reads a tar stream until `wanted` has collected what it needs. `wanted(path)` is called with
 * each entry's normalised path ('etc/os-release'); entries it returns true for are passed,
 * with their content (regular files, at most `maxBytes`) or link target, to `onEntry`, which
 * returns true to stop early. The source is destroyed when the scan stops early. Rejects with
 * SC_ERR_BAD_ARCHIVE on a corrupt archive.
 */
export function scanTar(
  src: Readable,
  wanted: (path: string) => boolean,
  onEntry: (e: { path: string; type: string; data?: Buffer; linkpath?: string }) => boolean,
  maxBytes = 1 << 20,
): Promise<void> {
  return new Promise<void>((resolvePromise, reject) => {
    let done = false;
    const finish = (err?: unknown) => {
      if (done) return;
      done = true;
      src.unpipe(parser);
      if (err) {
        src.destroy();
        reject(tarFailure(err, 'SC_ERR_BAD_ARCHIVE'));
      } else {
        if (!src.readableEnded) src.destroy();
        resolvePromise();
      }
    };
    const parser = new tar.Parser({
      strict: true,
      zstd: false,
      brotli: false,
      onReadEntry: (entry) => {
        let rel: string | undefined;
        try {
          rel = archivePath(String(entry.path), 'path');
        } catch {
          rel = undefined;
        }
        if (done || rel === undefined || !wanted(rel)) {
          entry.resume();
          return;
        }
        const path = rel;
        if (FILE_TYPES.has(entry.type)) {
          const parts: Buffer[] = [];
          let size = 0;
          entry.on('data', (c: Buffer) => {
            size += c.length;
            if (size <= maxBytes) parts.push(c);
          });
          entry.on('end', () => {
            if (!done && onEntry({ path, type: entry.type, data: Buffer.concat(parts) })) finish();
          });
        } else {
          entry.resume();
          if (onEntry({ path, type: entry.type, linkpath: entry.linkpath })) finish();
        }
      },
    });
    parser.on('error', (err: Error) => finish(err));
    parser.on('end', () => finish());
    src.on('error', (err) => finish(err));
    src.pipe(parser);
  });
}
