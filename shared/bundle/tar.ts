/**
 * Tar for root filesystems: a deterministic packer and an extractor that can never write
 * outside its target. Packing encodes header blocks with node-tar 7's `Header`; extraction
 * parses with tar-stream 3; PAX records are ours in both directions (pax.ts: binary-safe, for
 * extended attributes); extended attributes are read and set through xattr.ts. Every entry is
 * written by this module (no library writes to the file system).
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
 *
 * Extraction (`safeExtract`) refuses the whole archive with SC_ERR_UNSAFE_ARCHIVE, before
 * writing the offending entry, when an entry
 * - has an absolute path or a `..` segment, or is not a directory but names the target itself;
 * - has a parent path that goes through a symlink (one from this archive or one already on
 *   disk). Once a path has been a symlink in the archive, nothing may be extracted below it;
 * - is a hardlink whose target is absolute, uses `..`, goes through a symlink, or is a symlink
 *   already on disk;
 * - is a symlink (or a hardlink to one) whose target, resolved against the links already
 *   created, leaves the target. Resolution walks the target one component at a time as the
 *   kernel would on this host, following every symlink met (the archive's own and those on
 *   disk), with `..` going up from wherever the walk is: `l1 -> .` then `l2 -> l1/..` is
 *   refused. Absolute targets are walked from the target root (`/usr/bin/awk ->
 *   /etc/alternatives/awk` is fine and kept verbatim), and refused when they climb out of it
 *   (`/../etc`). More than 40 links in one walk is refused (the kernel's ELOOP). Symlinks are
 *   created last, and every one is checked again then, against the final set of links, so a
 *   later entry cannot turn an earlier, checked link into an escape.
 * Nothing is ever written through a link: files are created with O_EXCL|O_NOFOLLOW after
 * whatever was at their path is removed, so an existing hardlink to a file elsewhere is never
 * written into either.
 *
 * What is created: files (with holes where the content has 4 KiB blocks of zeros, so sparse
 * files stay sparse), directories, symlinks, hardlinks and FIFOs (`mkfifo`, batched), with
 * exact modes whatever the umask, owners by number (as root), mtimes and extended attributes
 * (set last, after chown, which would clear `security.capability`). Character and block
 * devices are skipped and counted: a booted system gets /dev from devtmpfs, and a device
 * node in the target would give raw access to this host's devices to whoever may open it
 * there. GNU sparse entries (`tar -S`) are refused with SC_ERR_BAD_ARCHIVE.
 */
import { execFile } from 'node:child_process';
import type { Stats } from 'node:fs';
import { constants as fsConstants, createReadStream, lstatSync, readlinkSync } from 'node:fs';
import { chmod, type FileHandle, lchown, link, lstat, lutimes, mkdir, open, readdir, readlink, rmdir, symlink, unlink, utimes } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { PassThrough, type Readable } from 'node:stream';
import { promisify } from 'node:util';
import * as tar from 'tar';
import { type ErrorCode, isScError, type ScError, scError } from '../errors.js';
import { createTarExtract, encodePax, type PaxRecords, type TarHeader, XATTR_KEY } from './pax.js';
import { readXattrs, writeXattrs, xattrAllowed } from './xattr.js';

/** What `safeExtract` did. */
export interface ExtractResult {
  /** Archive entries read (PAX and GNU long-name headers excluded), skipped ones included. */
  entries: number;
  /** Character and block devices that were not created. */
  skipped: number;
}

/** Options for `safeExtract`. */
export interface ExtractOptions {
  /** Most plaintext tar bytes to read; one more fails with SC_ERR_BUNDLE_TOO_LARGE. */
  maxBytes?: number;
}

const FILE_TYPES = new Set(['file', 'contiguous-file']);
const DEVICE_TYPES = new Set(['character-device', 'block-device']);
/** Files whose finishing may run while later entries are written. */
const MAX_PENDING_FILES = 16;
/** Most symlinks followed in one path walk (Linux MAXSYMLINKS). */
const MAX_LINK_FOLLOWS = 40;
/** Largest numbers a ustar header holds in octal; above, PAX records (and base-256 in the header). */
const MAX_USTAR_ID = 0o7777777;
const MAX_USTAR_SIZE = 0o77777777777;
const MAX_USTAR_TIME = 0o77777777777;

// ---------------------------------------------------------------------------------- packing

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

/** A ustar-safe stand-in for a name carried in PAX (readers use the PAX one). */
function ustarStandIn(name: string, max: number): string {
  const s = name.replace(/[^\x20-\x7e]/g, '_');
  return s.length <= max ? s : s.slice(s.length - max);
}

/** True when `name` fits a ustar header as is: ASCII, ≤100 bytes after a ≤155-byte prefix split at a '/'. */
function fitsUstar(name: string): boolean {
  if (!/^[\x20-\x7e]*$/.test(name)) return false;
  if (name.length <= 100) return true;
  // The prefix takes everything before some '/', the name field the rest.
  for (let i = name.indexOf('/'); i !== -1; i = name.indexOf('/', i + 1)) {
    if (i <= 155 && name.length - i - 1 <= 100 && name.length - i - 1 > 0) return true;
  }
  return false;
}

function deviceNumbers(rdev: number): { devmaj: number; devmin: number } {
  return {
    devmaj: (Math.floor(rdev / 256) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff),
    devmin: (rdev & 0xff) | (Math.floor(rdev / 4096) & ~0xff),
  };
}

/**
 * Resolves when a writable wants more, or is closed (destroyed). A writable already destroyed
 * (or being destroyed: streamx's `destroying`) resolves at once: its 'close' may have fired
 * before this was called, and waiting for it would hang the writer for ever.
 */
function drained(w: { once(ev: string, fn: () => void): unknown; off(ev: string, fn: () => void): unknown; destroyed?: boolean; destroying?: boolean }): Promise<void> {
  if (w.destroyed || w.destroying) return Promise.resolve();
  return new Promise<void>((res) => {
    const done = () => {
      w.off('drain', done);
      w.off('close', done);
      res();
    };
    w.once('drain', done);
    w.once('close', done);
  });
}

const ZEROS_512 = Buffer.alloc(512);

/** One entry's fields, as packed. */
interface PackEntry {
  path: string;
  type: 'File' | 'Link' | 'SymbolicLink' | 'Directory' | 'FIFO' | 'CharacterDevice' | 'BlockDevice';
  mode: number;
  uid: number;
  gid: number;
  size: number;
  /** Whole seconds. */
  mtime: number;
  linkpath: string;
  devmaj: number;
  devmin: number;
  xattrs: [string, Buffer][];
}

/**
 * The header blocks of one entry: a PAX `x` header with its records when something does not
 * fit ustar (path, link target, big numbers) or there are extended attributes, then the ustar
 * header (node-tar's Header encodes the blocks).
 */
function headerBlocks(e: PackEntry): Buffer[] {
  const pax: [string, string | Buffer][] = [];
  let path = e.path;
  let linkpath = e.linkpath;
  if (!fitsUstar(path)) {
    pax.push(['path', path]);
    path = ustarStandIn(path, 100);
  }
  if (linkpath && (linkpath.length > 100 || !/^[\x20-\x7e]*$/.test(linkpath))) {
    pax.push(['linkpath', linkpath]);
    linkpath = ustarStandIn(linkpath, 100);
  }
  const fields = { uid: e.uid, gid: e.gid };
  for (const k of ['uid', 'gid'] as const) {
    if (e[k] > MAX_USTAR_ID) {
      pax.push([k, String(e[k])]);
      fields[k] = 0;
    }
  }
  if (e.size > MAX_USTAR_SIZE) pax.push(['size', String(e.size)]);
  let mtime = e.mtime;
  if (mtime < 0 || mtime > MAX_USTAR_TIME) {
    pax.push(['mtime', String(mtime)]);
    mtime = 0;
  }
  for (const [name, value] of e.xattrs) pax.push([`${XATTR_KEY}${name}`, value]);
  const blocks: Buffer[] = [];
  if (pax.length) {
    const body = encodePax(pax);
    const h = new tar.Header({
      path: `PaxHeader/${ustarStandIn(basename(e.path), 80)}`,
      type: 'ExtendedHeader',
      mode: 0o644,
      uid: 0,
      gid: 0,
      size: body.length,
      mtime: new Date(mtime * 1000),
    });
    h.encode();
    blocks.push(h.block as Buffer, body, ZEROS_512.subarray(0, (512 - (body.length % 512)) % 512));
  }
  const h = new tar.Header({
    path,
    type: e.type,
    mode: e.mode,
    uid: fields.uid,
    gid: fields.gid,
    size: e.size,
    mtime: new Date(mtime * 1000),
    linkpath: linkpath || undefined,
    uname: '',
    gname: '',
    devmaj: e.devmaj,
    devmin: e.devmin,
  });
  h.encode();
  blocks.push(h.block as Buffer);
  return blocks;
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

// ------------------------------------------------------------------------------- extraction

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

/** A file system error as an ScError: SC_ERR_NO_SPACE for ENOSPC/EDQUOT, else `fallback`. */
function fsFailure(err: unknown, what: string, path?: string, fallback: ErrorCode = 'SC_ERR_INTERNAL'): ScError {
  if (isScError(err)) return err;
  const e = err as NodeJS.ErrnoException;
  const errno = typeof e?.code === 'string' && /^E[A-Z0-9]+$/.test(e.code) ? e.code : undefined;
  const code: ErrorCode = errno === 'ENOSPC' || errno === 'EDQUOT' ? 'SC_ERR_NO_SPACE' : fallback;
  return scError(code, `${what}: ${errno ?? ''} ${e?.message ?? String(err)}`.trim(), { ...(errno ? { errno } : {}), ...(path ? { path } : {}) }, err);
}

/** Outcome of walking a symlink target: where it lands (path parts), or why it cannot be used. */
type Walk = string[] | 'escape' | 'loop';

/**
 * Resolves symlink targets inside the extraction root the way the kernel walks a path on this
 * host: component by component, following every symlink met, `..` going up from the current
 * place. `linkAt(rel)` says what is at a path: a symlink target, or undefined.
 */
class LinkWalker {
  readonly #linkAt: (rel: string) => string | undefined;

  constructor(linkAt: (rel: string) => string | undefined) {
    this.#linkAt = linkAt;
  }

  /** Where `target`, read from a link in directory `dirParts`, leads. */
  walk(dirParts: string[], target: string): Walk {
    return this.#walk(dirParts, target, { budget: MAX_LINK_FOLLOWS });
  }

  #walk(dirParts: string[], target: string, state: { budget: number }): Walk {
    let cur = target.startsWith('/') ? [] : dirParts.slice();
    for (const comp of target.split('/')) {
      if (comp === '' || comp === '.') continue;
      if (comp === '..') {
        if (cur.length === 0) return 'escape';
        cur.pop();
        continue;
      }
      cur.push(comp);
      const next = this.#linkAt(cur.join('/'));
      if (next === undefined) continue;
      if (--state.budget < 0) return 'loop';
      cur.pop();
      const r = this.#walk(cur, next, state);
      if (typeof r === 'string') return r;
      cur = r;
    }
    return cur;
  }
}

/**
 * Validates entries in archive order. It remembers the symlinks the archive created and the
 * parent directories already checked on disk, so each prefix is looked at once.
 */
class EntryGuard {
  readonly #root: string;
  /** Every path that has been a symlink in this archive, with its (last) target. */
  readonly #symlinks = new Map<string, string>();
  readonly #checked = new Set<string>();
  /** lstat of paths on disk that were not written by this archive: symlink target or null. */
  readonly #disk = new Map<string, string | null>();

  constructor(root: string) {
    this.#root = root;
  }

  /**
   * The target of a symlink that was at `rel` on disk before extraction (cached), or undefined.
   * Paths this archive has written are forgotten (`wrote`).
   */
  diskLink(rel: string): string | undefined {
    if (!this.#disk.has(rel)) {
      let t: string | null = null;
      try {
        const p = join(this.#root, rel);
        if (lstatSync(p).isSymbolicLink()) t = readlinkSync(p);
      } catch {
        t = null;
      }
      this.#disk.set(rel, t);
    }
    return this.#disk.get(rel) ?? undefined;
  }

  /** Records that the archive has put something at `rel`: what was on disk there is gone. */
  wrote(rel: string): void {
    this.#disk.set(rel, null);
  }

  /** Throws SC_ERR_UNSAFE_ARCHIVE unless no proper prefix of `rel` is a symlink. */
  #checkParents(rel: string, raw: string, what: string): void {
    const parts = rel.split('/');
    let prefix = '';
    for (let i = 0; i < parts.length - 1; i++) {
      prefix = prefix ? `${prefix}/${parts[i]}` : parts[i];
      if (this.#symlinks.has(prefix)) throw unsafe(`${what} goes through the symlink ${prefix}`, raw);
      if (this.#checked.has(prefix)) continue;
      if (this.diskLink(prefix) !== undefined) throw unsafe(`${what} goes through the existing symlink ${prefix}`, raw);
      this.#checked.add(prefix);
    }
  }

  /** Throws SC_ERR_UNSAFE_ARCHIVE when the symlink at `rel` with `target` leaves the root. */
  checkLinkTarget(rel: string, target: string, raw: string, walker: LinkWalker): void {
    const r = walker.walk(rel.split('/').slice(0, -1), target);
    if (r === 'escape') throw unsafe(`symlink target ${JSON.stringify(target)} leaves the target`, raw, { linkpath: target });
    if (r === 'loop') throw unsafe(`symlink target ${JSON.stringify(target)} follows more than ${MAX_LINK_FOLLOWS} links`, raw, { linkpath: target });
  }

  /** The walker over links seen so far (the archive's, then what was on disk). */
  readonly soFar = new LinkWalker((p) => this.#symlinks.get(p) ?? this.diskLink(p));

  /** Validates one entry; returns its normalised path. Throws SC_ERR_UNSAFE_ARCHIVE. */
  check(raw: string, type: string, linkname: string): string {
    const rel = archivePath(raw, 'path');
    if (rel === '' && type !== 'directory') throw unsafe(`a ${type} entry would replace the extraction root`, raw);
    if (rel !== '') this.#checkParents(rel, raw, 'path');
    if (type === 'symlink') {
      if (!linkname || linkname.includes('\0')) throw unsafe('symlink has an empty or invalid target', raw);
      this.checkLinkTarget(rel, linkname, raw, this.soFar);
      this.#symlinks.set(rel, linkname);
      this.#checked.delete(rel);
    } else if (type === 'link') {
      const target = archivePath(linkname, 'hardlink target');
      if (!target) throw unsafe('hardlink target is the extraction root or empty', raw);
      this.#checkParents(target, raw, 'hardlink target');
      const asLink = this.#symlinks.get(target);
      if (asLink === undefined && this.diskLink(target) !== undefined) throw unsafe(`hardlink target ${target} is a symlink that was already on disk`, raw);
      if (asLink !== undefined) {
        // A second name for a symlink is a symlink with the same target, somewhere else.
        this.checkLinkTarget(rel, asLink, raw, this.soFar);
        this.#symlinks.set(rel, asLink);
        this.#checked.delete(rel);
      }
    }
    return rel;
  }
}

/** Work left for after the stream: the final state wanted at one path. */
type Fixup =
  | { kind: 'dir'; mode: number; mtime: Date }
  | { kind: 'symlink'; target: string; mtime: Date; uid: number; gid: number; xattrs: [string, Buffer][] }
  | { kind: 'hardlink'; target: string }
  | { kind: 'fifo'; mode: number; mtime: Date; uid: number; gid: number; xattrs: [string, Buffer][] };

const ZERO_BLOCK = Buffer.alloc(4096);

function isZero(buf: Buffer, start: number, end: number): boolean {
  return buf.subarray(start, end).equals(end - start === ZERO_BLOCK.length ? ZERO_BLOCK : ZERO_BLOCK.subarray(0, end - start));
}

/** Writes `chunk` at `pos`, leaving holes for 4 KiB-aligned blocks of zeros. */
async function writeSparse(fh: FileHandle, chunk: Buffer, pos: number): Promise<void> {
  const n = chunk.length;
  const B = ZERO_BLOCK.length;
  let i = 0;
  while (i < n) {
    const end = Math.min(n, i + (B - ((pos + i) % B)));
    if (isZero(chunk, i, end)) {
      i = end;
      continue;
    }
    let j = end;
    while (j < n) {
      const e = Math.min(n, j + B);
      if (isZero(chunk, j, e)) break;
      j = e;
    }
    let off = i;
    while (off < j) {
      const { bytesWritten } = await fh.write(chunk, off, j - off, pos + off);
      off += bytesWritten;
    }
    i = j;
  }
}

/** Removes whatever is at `abs` (an empty directory too); missing is fine. */
async function clearPath(abs: string, rel: string, dirs?: DirCache): Promise<void> {
  let st: Stats;
  try {
    st = await lstat(abs);
  } catch {
    return;
  }
  try {
    if (st.isDirectory()) {
      dirs?.forget(abs);
      await rmdir(abs);
    } else await unlink(abs);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTEMPTY' || code === 'EEXIST') throw scError('SC_ERR_BAD_ARCHIVE', `${rel} would replace a non-empty directory`, { path: rel });
    throw err;
  }
}


/** The pieces of one entry's header that extraction uses, PAX overrides applied. */
interface EntryMeta {
  path: string;
  type: string;
  linkname: string;
  mode: number;
  uid: number;
  gid: number;
  mtime: Date;
  size: number;
  xattrs: [string, Buffer][];
}

function entryMeta(h: TarHeader): EntryMeta {
  const pax: PaxRecords = h.pax ?? Object.create(null);
  const path = String(h.name ?? '');
  const xattrs: [string, Buffer][] = [];
  for (const key of Object.keys(pax).sort()) {
    if (key.startsWith('GNU.sparse.')) throw scError('SC_ERR_BAD_ARCHIVE', `${path}: GNU sparse entries (tar --sparse) are not supported; re-create the tarball without --sparse`, { path });
    if (!key.startsWith(XATTR_KEY)) continue;
    const name = key.slice(XATTR_KEY.length);
    if (!xattrAllowed(name)) {
      throw scError('SC_ERR_UNSUPPORTED_XATTR', `${path}: extended attribute ${name} is not carried (only security.*, trusted.*, user.* and POSIX ACLs)`, { path, name });
    }
    const v = pax[key];
    xattrs.push([name, Buffer.isBuffer(v) ? v : Buffer.from(v, 'utf8')]);
  }
  const num = (k: string, fallback: number) => {
    const v = pax[k];
    if (v === undefined) return fallback;
    const n = Number(String(v));
    if (!Number.isFinite(n) || n < 0) throw scError('SC_ERR_BAD_ARCHIVE', `${path}: bad PAX ${k} ${JSON.stringify(String(v).slice(0, 40))}`, { path });
    return n;
  };
  const mtimeSec = pax.mtime !== undefined ? Number(String(pax.mtime)) : undefined;
  return {
    path,
    type: h.type ?? 'unknown',
    linkname: String(h.linkname ?? ''),
    mode: (h.mode ?? 0) & 0o7777,
    uid: num('uid', h.uid ?? 0),
    gid: num('gid', h.gid ?? 0),
    mtime: mtimeSec !== undefined && Number.isFinite(mtimeSec) ? new Date(Math.floor(mtimeSec * 1000)) : h.mtime,
    size: h.size ?? 0,
    xattrs,
  };
}

const execFileP = promisify(execFile);

/** Creates FIFOs with `mkfifo` (Node has no mkfifo), many per process, argv only. */
async function makeFifos(paths: string[]): Promise<void> {
  for (let i = 0; i < paths.length; i += 256) {
    try {
      await execFileP('mkfifo', ['--', ...paths.slice(i, i + 256)]);
    } catch (err) {
      const e = err as { stderr?: string; message: string };
      throw scError('SC_ERR_INTERNAL', `mkfifo failed: ${(e.stderr || e.message).trim().slice(0, 300)}`, undefined, err);
    }
  }
}

/**
 * Applies what waits for the end of the stream: symlinks (checked once more against the final
 * set of links), hardlinks to them, FIFOs, then directory modes and mtimes (last, since creating
 * entries changes a directory's mtime and a 0555 directory must stay writable until then).
 */
async function applyFixups(root: string, fixups: Map<string, Fixup>, guard: EntryGuard, asRoot: boolean, dirs: DirCache): Promise<void> {
  const abs = (rel: string) => (rel ? join(root, rel) : root);
  const batch = async <T>(items: T[], fn: (x: T) => Promise<void>) => {
    for (let i = 0; i < items.length; i += 32) await Promise.all(items.slice(i, i + 32).map(fn));
  };
  const all = [...fixups];
  // The final links: what the tree will hold once they are made.
  const finalLinks = new Map<string, string>();
  for (const [rel, f] of all) if (f.kind === 'symlink') finalLinks.set(rel, f.target);
  for (const [rel, f] of all) {
    if (f.kind !== 'hardlink') continue;
    const t = finalLinks.get(f.target);
    if (t !== undefined) finalLinks.set(rel, t);
  }
  const final = new LinkWalker((p) => (fixups.has(p) ? finalLinks.get(p) : guard.diskLink(p)));
  for (const [rel, target] of finalLinks) guard.checkLinkTarget(rel, target, rel, final);

  await batch(all, async ([rel, f]) => {
    if (f.kind !== 'symlink') return;
    const p = abs(rel);
    await dirs.ensureParent(p);
    await clearPath(p, rel, dirs);
    await symlink(f.target, p);
    if (asRoot) await lchown(p, f.uid, f.gid);
    await writeXattrs(p, f.xattrs, rel);
    await lutimes(p, f.mtime, f.mtime);
  });
  for (const [rel, f] of all) {
    if (f.kind !== 'hardlink') continue;
    await clearPath(abs(rel), rel, dirs);
    await link(abs(f.target), abs(rel));
  }
  const fifos = all.filter(([, f]) => f.kind === 'fifo') as [string, Extract<Fixup, { kind: 'fifo' }>][];
  if (fifos.length) {
    for (const [rel] of fifos) {
      await dirs.ensureParent(abs(rel));
      await clearPath(abs(rel), rel, dirs);
    }
    await makeFifos(fifos.map(([rel]) => abs(rel)));
    await batch(fifos, async ([rel, f]) => {
      const p = abs(rel);
      if (asRoot) await lchown(p, f.uid, f.gid);
      await chmod(p, f.mode);
      await writeXattrs(p, f.xattrs, rel);
      await utimes(p, f.mtime, f.mtime);
    });
  }
  await batch(all, async ([rel, f]) => {
    if (f.kind !== 'dir') return;
    await chmod(abs(rel), f.mode);
    await utimes(abs(rel), f.mtime, f.mtime);
  });
}

/**
 * Writes one regular file's content into a fresh file (never through a link, never into an
 * existing inode) and returns its finisher: owner, mode, mtime, then extended attributes (after
 * chown, which clears security.capability). The finisher may run while later entries are
 * written.
 */
async function writeFileContent(root: string, rel: string, meta: EntryMeta, content: AsyncIterable<Buffer>, asRoot: boolean, dirs: DirCache): Promise<() => Promise<void>> {
  const p = join(root, rel);
  await dirs.ensureParent(p);
  const flags = fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW;
  let fh: FileHandle;
  try {
    fh = await open(p, flags, 0o600);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    await clearPath(p, rel, dirs);
    fh = await open(p, flags, 0o600);
  }
  let pos = 0;
  try {
    for await (const chunk of content) {
      await writeSparse(fh, chunk, pos);
      pos += chunk.length;
    }
    if (pos !== meta.size) throw scError('SC_ERR_BAD_ARCHIVE', `${rel}: ${pos} bytes of content, ${meta.size} declared`, { path: rel });
  } catch (err) {
    await fh.close();
    throw err;
  }
  return async () => {
    try {
      // Holes at the end: the size comes from truncate.
      await fh.truncate(pos);
      // chown first: it clears setuid/setgid and security.capability.
      if (asRoot) await fh.chown(meta.uid, meta.gid);
      await fh.chmod(meta.mode);
      await fh.utimes(meta.mtime, meta.mtime);
    } finally {
      await fh.close();
    }
    await writeXattrs(p, meta.xattrs, rel);
  };
}

/** Directories known to exist under the root, so each parent is created (or checked) once. */
class DirCache {
  readonly #root: string;
  readonly #known = new Set<string>();

  constructor(root: string) {
    this.#root = root;
  }

  /** Ensures the parent directory of `abs` exists (the guard has checked it has no symlink). */
  async ensureParent(abs: string): Promise<void> {
    const parent = dirname(abs);
    if (parent.length <= this.#root.length || this.#known.has(parent)) return;
    await mkdir(parent, { recursive: true, mode: 0o755 });
    this.#known.add(parent);
  }

  /** Records that the directory `abs` exists. */
  add(abs: string): void {
    this.#known.add(abs);
  }

  /** Forgets `abs` (and what is below it): it is about to be replaced. */
  forget(abs: string): void {
    for (const d of this.#known) if (d === abs || d.startsWith(`${abs}/`)) this.#known.delete(d);
  }
}

/** Creates (or keeps) a directory; owner and xattrs now, mode and mtime in the fixups. */
async function makeDir(root: string, rel: string, meta: EntryMeta, asRoot: boolean, dirs: DirCache): Promise<void> {
  const p = rel ? join(root, rel) : root;
  if (rel) {
    await dirs.ensureParent(p);
    try {
      await mkdir(p, { mode: 0o700 });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      if (!(await lstat(p)).isDirectory()) {
        await clearPath(p, rel, dirs);
        await mkdir(p, { mode: 0o700 });
      }
    }
    dirs.add(p);
  }
  if (asRoot) await lchown(p, meta.uid, meta.gid);
  await writeXattrs(p, meta.xattrs, rel || '.');
}

/**
 * Extracts the tar stream `src` into `targetDir` (created if missing), refusing anything that
 * could escape it (see the module comment). Modes are kept exactly (setuid, setgid, sticky,
 * regardless of the process umask), owners by number when running as root, extended
 * attributes, hardlinks (one inode), mtimes.
 *
 * Rejects with SC_ERR_UNSAFE_ARCHIVE for an unsafe entry (nothing of that entry is written),
 * SC_ERR_BAD_ARCHIVE for a corrupt or truncated archive or an unsupported entry type,
 * SC_ERR_UNSUPPORTED_XATTR, SC_ERR_BUNDLE_TOO_LARGE past `opts.maxBytes`, SC_ERR_NO_SPACE when
 * the target file system is full, the error `src` failed with, or SC_ERR_INTERNAL for another
 * file system error (details.errno, details.path). On failure `src` is destroyed and entries
 * before the failing one may already be written (inside the target): callers clean it up.
 */
export async function safeExtract(src: Readable, targetDir: string, opts: ExtractOptions = {}): Promise<ExtractResult> {
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
    throw fsFailure(err, `cannot create ${root}`, root);
  }
  const asRoot = process.getuid?.() === 0;
  const guard = new EntryGuard(root);
  const fixups = new Map<string, Fixup>();
  const maxBytes = opts.maxBytes ?? Number.POSITIVE_INFINITY;
  let entries = 0;
  let skipped = 0;
  const ex = createTarExtract();
  const dirs = new DirCache(root);
  /** Files whose finishing (owner, mode, mtime, xattrs) still runs, by path. */
  const pending = new Map<string, Promise<void>>();
  const settle = async (rel: string) => {
    await pending.get(rel);
  };

  // Feeds the extractor, counting plaintext bytes; keeps the last 1 KiB to check the end marker.
  const feed = async () => {
    let bytes = 0;
    let tail: Buffer = Buffer.alloc(0);
    src.off('error', onEarly);
    if (early !== undefined) throw early;
    for await (const c of src) {
      const chunk = c as Buffer;
      bytes += chunk.length;
      if (bytes > maxBytes) {
        throw scError('SC_ERR_BUNDLE_TOO_LARGE', `the unpacked tar exceeds ${maxBytes} bytes`, { maxBytes });
      }
      tail = chunk.length >= 1024 ? chunk.subarray(chunk.length - 1024) : Buffer.concat([tail, chunk]).subarray(-1024);
      // The consumer may have failed (and destroyed the extractor) while this chunk was read.
      if (ex.destroying) return;
      if (!ex.write(chunk)) await drained(ex);
      if (ex.destroying) return;
    }
    if (bytes > 0 && (tail.length < 1024 || !tail.equals(Buffer.alloc(1024)))) {
      throw scError('SC_ERR_BAD_ARCHIVE', 'tar archive truncated (no end-of-archive blocks)');
    }
    ex.end(undefined);
  };

  const consume = async () => {
    for await (const entry of ex) {
      const meta = entryMeta(entry.header);
      entries++;
      const rel = guard.check(meta.path, meta.type, meta.linkname);
      guard.wrote(rel);
      // The last entry for a path decides what is there: forget earlier plans for it.
      fixups.delete(rel);
      if (FILE_TYPES.has(meta.type)) {
        await settle(rel);
        const finish = await writeFileContent(root, rel, meta, entry, asRoot, dirs);
        const done: Promise<void> = finish().finally(() => {
          if (pending.get(rel) === done) pending.delete(rel);
        });
        done.catch(() => {});
        pending.set(rel, done);
        if (pending.size >= MAX_PENDING_FILES) await Promise.race(pending.values());
        continue;
      }
      // Entries without content: drain whatever the header declared.
      for await (const _ of entry) {
        /* nothing: only files have content */
      }
      await settle(rel);
      if (meta.type === 'directory') {
        await makeDir(root, rel, meta, asRoot, dirs);
        fixups.set(rel, { kind: 'dir', mode: meta.mode, mtime: meta.mtime });
      } else if (meta.type === 'symlink') {
        fixups.set(rel, { kind: 'symlink', target: meta.linkname, mtime: meta.mtime, uid: meta.uid, gid: meta.gid, xattrs: meta.xattrs });
      } else if (meta.type === 'link') {
        const target = archivePath(meta.linkname, 'hardlink target');
        const k = fixups.get(target)?.kind;
        if (k === 'symlink' || k === 'hardlink') {
          fixups.set(rel, { kind: 'hardlink', target });
        } else {
          const p = join(root, rel);
          await settle(target);
          await dirs.ensureParent(p);
          await clearPath(p, rel, dirs);
          try {
            await link(join(root, target), p);
          } catch (err) {
            if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw scError('SC_ERR_BAD_ARCHIVE', `hardlink ${rel}: its target ${target} is not in the archive before it`, { path: rel });
            throw err;
          }
        }
      } else if (meta.type === 'fifo') {
        fixups.set(rel, { kind: 'fifo', mode: meta.mode, mtime: meta.mtime, uid: meta.uid, gid: meta.gid, xattrs: meta.xattrs });
      } else if (DEVICE_TYPES.has(meta.type)) {
        skipped++;
      } else {
        throw scError('SC_ERR_BAD_ARCHIVE', `unsupported tar entry type ${meta.type} at ${rel}`, { path: rel });
      }
    }
    await Promise.all(pending.values());
    if (entries === 0) throw scError('SC_ERR_BAD_ARCHIVE', 'the tar archive has no entries');
    await applyFixups(root, fixups, guard, asRoot, dirs);
  };

  const failures: unknown[] = [];
  const stop = (err: unknown) => {
    failures.push(err);
    src.destroy();
    ex.destroy(isScError(err) ? err : new Error(String((err as Error)?.message ?? err)));
  };
  await Promise.all([feed().catch(stop), consume().catch(stop)]);
  // Nothing of this extraction may still be running once it has settled.
  await Promise.allSettled(pending.values());
  if (failures.length) {
    // The first ScError is the cause; a library's error only when there is nothing better.
    const err = failures.find((e) => isScError(e)) ?? failures[0];
    throw toExtractError(err);
  }
  return { entries, skipped };
}

/** Maps a failure met while extracting to an ScError. */
function toExtractError(err: unknown): ScError {
  if (isScError(err)) return err;
  const e = err as NodeJS.ErrnoException;
  if (typeof e?.code === 'string' && /^E[A-Z0-9]+$/.test(e.code)) return fsFailure(err, 'tar extraction failed', e.path ? String(e.path) : undefined);
  if (e?.code) return scError('SC_ERR_INTERNAL', `tar extraction failed: ${e.message}`, undefined, err);
  // tar-stream's own errors: corrupt headers, short data, oversized or malformed PAX.
  const msg = String(e?.message ?? err);
  const why = /Invalid tar header/.test(msg)
    ? msg.includes('unknown format')
      ? 'a header is in no tar format we read (not ustar, pax or GNU)'
      : 'a header checksum does not match (corrupt, or not a plain tar)'
    : /Unexpected end of data/.test(msg)
      ? 'the archive is truncated'
      : /Header exceeds max size/.test(msg)
        ? 'a pax or long-name header is too large'
        : msg;
  return scError('SC_ERR_BAD_ARCHIVE', `tar archive unreadable: ${why}`, undefined, err);
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
        reject(isScError(err) ? err : scError('SC_ERR_BAD_ARCHIVE', `tar: ${(err as Error)?.message ?? String(err)}`, undefined, err));
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
        if (entry.type === 'File' || entry.type === 'OldFile' || entry.type === 'ContiguousFile') {
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
