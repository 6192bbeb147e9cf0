/**
 * Writing extracted entries to disk, inside a target the guard (tar-guard.ts) has cleared:
 * files, directories, and the fixups applied once the stream has ended.
 *
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
 *
 * The system calls are made directly (the `*Sync` calls), not through libuv's thread pool: each
 * takes microseconds against the page cache, while a pool round trip costs a thread hop, and
 * more while the unpack worker keeps the other core busy. A root filesystem is tens of
 * thousands of entries, most of them small: on this machine's /usr (61k entries, 3.9k
 * directories) the pool round trips for directories alone kept the extractor waiting 1.5 s.
 * Only extended attributes (a native module's promises) and `mkfifo` stay asynchronous.
 */
import { execFile } from 'node:child_process';
import type { Stats } from 'node:fs';
import {
  chmodSync,
  closeSync,
  fchmodSync,
  fchownSync,
  constants as fsConstants,
  ftruncateSync,
  futimesSync,
  lchownSync,
  linkSync,
  lstatSync,
  lutimesSync,
  mkdirSync,
  openSync,
  rmdirSync,
  symlinkSync,
  unlinkSync,
  utimesSync,
  writeSync,
} from 'node:fs';
import { chmod, lchown, utimes } from 'node:fs/promises';
import { promisify } from 'node:util';
import { scError } from '../errors.js';
import type { EntryMeta } from './tar-entry.js';
import { type EntryGuard, LinkWalker } from './tar-guard.js';
import type { Breather } from './tar-io.js';
import { hasDefaultAcl, writeXattrs } from './xattr.js';

/** Work left for after the stream: the final state wanted at one path. */
export type Fixup =
  | { kind: 'dir'; mode: number; mtime: Date }
  | { kind: 'symlink'; target: string; mtime: Date; uid: number; gid: number; xattrs: [string, Buffer][] }
  | { kind: 'hardlink'; target: string }
  | { kind: 'fifo'; mode: number; mtime: Date; uid: number; gid: number; xattrs: [string, Buffer][] };

const ZERO_BLOCK = Buffer.alloc(4096);

function isZero(buf: Buffer, start: number, end: number): boolean {
  // Most blocks of data have a byte other than zero at one end: no compare for them.
  if (buf[start] !== 0 || buf[end - 1] !== 0) return false;
  return buf.subarray(start, end).equals(end - start === ZERO_BLOCK.length ? ZERO_BLOCK : ZERO_BLOCK.subarray(0, end - start));
}

/**
 * Writes `chunk` at `pos` into `fd`, leaving holes for 4 KiB-aligned blocks of zeros; returns
 * where the last byte written ends (`pos` when the chunk was all zeros).
 */
function writeSparse(fd: number, chunk: Buffer, pos: number): number {
  const n = chunk.length;
  const B = ZERO_BLOCK.length;
  let dataEnd = pos;
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
    while (off < j) off += writeSync(fd, chunk, off, j - off, pos + off);
    dataEnd = pos + j;
    i = j;
  }
  return dataEnd;
}

/**
 * `root/rel`, for a root from path.resolve and a path the guard has normalised (`a/b/c`, '' for
 * the root itself): no join needed.
 */
export function under(root: string, rel: string): string {
  if (rel === '') return root;
  return root.endsWith('/') ? root + rel : `${root}/${rel}`;
}

/** Removes whatever is at `abs` (an empty directory too); missing is fine. */
export function clearPath(abs: string, rel: string, dirs?: DirCache): void {
  let st: Stats | undefined;
  try {
    st = lstatSync(abs, { throwIfNoEntry: false });
  } catch {
    return;
  }
  if (!st) return;
  try {
    if (st.isDirectory()) {
      dirs?.forget(abs);
      rmdirSync(abs);
    } else unlinkSync(abs);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTEMPTY' || code === 'EEXIST') throw scError('SC_ERR_BAD_ARCHIVE', `${rel} would replace a non-empty directory`, { path: rel });
    throw err;
  }
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
export async function applyFixups(root: string, fixups: Map<string, Fixup>, guard: EntryGuard, asRoot: boolean, dirs: DirCache, breath?: Breather): Promise<void> {
  const abs = (rel: string) => under(root, rel);
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
  for (const [rel, target] of finalLinks) {
    guard.checkLinkTarget(rel, target, rel, final);
    if (breath?.due()) await breath.breathe();
  }

  for (const [rel, f] of all) {
    if (f.kind !== 'symlink') continue;
    if (breath?.due()) await breath.breathe();
    const p = abs(rel);
    dirs.ensureParent(p);
    try {
      symlinkSync(f.target, p);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      clearPath(p, rel, dirs);
      symlinkSync(f.target, p);
    }
    if (asRoot) lchownSync(p, f.uid, f.gid);
    if (f.xattrs.length) await writeXattrs(p, f.xattrs, rel);
    lutimesSync(p, f.mtime, f.mtime);
  }
  for (const [rel, f] of all) {
    if (f.kind !== 'hardlink') continue;
    if (breath?.due()) await breath.breathe();
    clearPath(abs(rel), rel, dirs);
    linkSync(abs(f.target), abs(rel));
  }
  const fifos = all.filter(([, f]) => f.kind === 'fifo') as [string, Extract<Fixup, { kind: 'fifo' }>][];
  if (fifos.length) {
    for (const [rel] of fifos) {
      dirs.ensureParent(abs(rel));
      clearPath(abs(rel), rel, dirs);
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
  for (const [rel, f] of all) {
    if (f.kind !== 'dir') continue;
    if (breath?.due()) await breath.breathe();
    chmodSync(abs(rel), f.mode);
    utimesSync(abs(rel), f.mtime, f.mtime);
  }
}

/**
 * Writes one regular file's content into a fresh file (never through a link, never into an
 * existing inode), then its owner, mode and mtime (owner and mode only where they differ from
 * what a plain directory gave the file, see DirCache). Extended attributes come after chown (which
 * clears security.capability), from the finisher returned (null when there are none), which
 * may run while later entries are written.
 *
 * The file's own system calls (open, write, truncate, chown, chmod, utimes, close) are made
 * directly, not through the thread pool, as are those of directories, links and the fixups (see
 * the module doc). `written` hears the content bytes written so far after each chunk: no chunk
 * before that point is referenced any more.
 */
export async function writeFileContent(
  root: string,
  rel: string,
  meta: EntryMeta,
  content: AsyncIterable<Buffer>,
  asRoot: boolean,
  dirs: DirCache,
  written?: (bytes: number) => void,
): Promise<(() => Promise<void>) | null> {
  const p = under(root, rel);
  dirs.ensureParent(p);
  // In a plain directory the new file's owner and mode are known: no chown or chmod when they
  // are already the ones wanted (most files of a root filesystem: root's, 0644 or 0755).
  const plain = dirs.plain(p.slice(0, p.lastIndexOf('/')));
  const modeByOpen = plain !== null && (meta.mode & 0o7000) === 0 && (meta.mode & plain.umask) === 0;
  const ownerByOpen = plain !== null && meta.uid === plain.uid && meta.gid === plain.gid;
  const flags = fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW;
  const createMode = modeByOpen ? meta.mode : 0o600;
  let fd: number;
  try {
    fd = openSync(p, flags, createMode);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    clearPath(p, rel, dirs);
    fd = openSync(p, flags, createMode);
  }
  let pos = 0;
  /** Where the last byte written ends: short of `pos` when the file ends in a hole. */
  let dataEnd = 0;
  try {
    for await (const chunk of content) {
      dataEnd = Math.max(dataEnd, writeSparse(fd, chunk, pos));
      pos += chunk.length;
      written?.(pos);
    }
    if (pos !== meta.size) throw scError('SC_ERR_BAD_ARCHIVE', `${rel}: ${pos} bytes of content, ${meta.size} declared`, { path: rel });
  } catch (err) {
    closeSync(fd);
    throw err;
  }
  try {
    // Holes at the end: the size comes from truncate.
    if (dataEnd < pos) ftruncateSync(fd, pos);
    // chown first: it clears setuid/setgid and security.capability.
    if (asRoot && !ownerByOpen) fchownSync(fd, meta.uid, meta.gid);
    if (!modeByOpen) fchmodSync(fd, meta.mode);
    futimesSync(fd, meta.mtime, meta.mtime);
  } finally {
    closeSync(fd);
  }
  if (meta.xattrs.length === 0) return null;
  return () => writeXattrs(p, meta.xattrs, rel);
}

/** The owner a file gets from the process that creates it, and the bits its mode loses. */
export interface Creator {
  uid: number;
  gid: number;
  umask: number;
}

/** This process as the creator of files. */
export function thisCreator(): Creator {
  return { uid: process.geteuid?.() ?? 0, gid: process.getegid?.() ?? 0, umask: process.umask() };
}

/**
 * Directories known to exist under the root, so each parent is created (or checked) once; and
 * which of them are plain: a file created in a plain directory gets exactly the creator's uid
 * and gid and the mode it was opened with less the umask, so its writer may skip the chown and
 * chmod that would change nothing.
 *
 * A directory is plain when nothing in it changes what a new file gets: it is not setgid, its
 * group is the creator's (on a file system mounted `grpid`, files take their directory's group),
 * and it has no default ACL (which replaces the umask and adds an ACL to each new file). The
 * root is checked once (`checkRoot`). Below it, a directory is plain when this extraction made it
 * in a plain parent (mkdir gives it no setgid and no default ACL then), with the creator's group
 * and no default ACL among its attributes; one that was already there is plain only when it was
 * plain before, and anything made by `ensureParent` is not. Directory modes (setgid included)
 * are set in the fixups, after every file is written.
 */
export class DirCache {
  readonly #root: string;
  readonly #known = new Set<string>();
  readonly #plain = new Set<string>();
  readonly #creator: Creator;

  constructor(root: string, creator: Creator = thisCreator()) {
    this.#root = root;
    this.#creator = creator;
  }

  /** Marks the root plain when it is: a directory, not setgid, of the creator's group, without a default ACL. */
  async checkRoot(): Promise<void> {
    let st: Stats;
    try {
      st = lstatSync(this.#root);
    } catch {
      return;
    }
    if (!st.isDirectory() || st.mode & 0o2000 || st.gid !== this.#creator.gid) return;
    if ((await hasDefaultAcl(this.#root)) === false) this.#plain.add(this.#root);
  }

  /** The creator, when `dir` is plain (see the class doc); null otherwise. */
  plain(dir: string): Creator | null {
    return this.#plain.has(dir) ? this.#creator : null;
  }

  /** Ensures the parent directory of `abs` exists (the guard has checked it has no symlink). */
  ensureParent(abs: string): void {
    const parent = abs.slice(0, abs.lastIndexOf('/'));
    if (parent.length <= this.#root.length || this.#known.has(parent)) return;
    mkdirSync(parent, { recursive: true, mode: 0o755 });
    this.#known.add(parent);
  }

  /**
   * Records that the directory `abs` exists, now owned by group `gid` (undefined: left as it was
   * made), with or without a default ACL; `made`: this extraction has just created it.
   */
  add(abs: string, made: boolean, gid: number | undefined, defaultAcl: boolean): void {
    this.#known.add(abs);
    const from = made ? abs.slice(0, abs.lastIndexOf('/')) : abs;
    if (this.#plain.has(from) && !defaultAcl && (gid === undefined || gid === this.#creator.gid)) this.#plain.add(abs);
    else this.#plain.delete(abs);
  }

  /** Forgets `abs` (and what is below it): it is about to be replaced. */
  forget(abs: string): void {
    for (const d of this.#known) if (d === abs || d.startsWith(`${abs}/`)) this.#known.delete(d);
    for (const d of this.#plain) if (d === abs || d.startsWith(`${abs}/`)) this.#plain.delete(d);
  }
}

/** Creates (or keeps) a directory; owner and xattrs now, mode and mtime in the fixups. */
export async function makeDirEntry(root: string, rel: string, meta: EntryMeta, asRoot: boolean, dirs: DirCache): Promise<void> {
  const p = under(root, rel);
  let made = false;
  if (rel) {
    dirs.ensureParent(p);
    try {
      mkdirSync(p, { mode: 0o700 });
      made = true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      if (!lstatSync(p).isDirectory()) {
        clearPath(p, rel, dirs);
        mkdirSync(p, { mode: 0o700 });
        made = true;
      }
    }
  }
  if (asRoot) lchownSync(p, meta.uid, meta.gid);
  if (meta.xattrs.length) await writeXattrs(p, meta.xattrs, rel || '.');
  dirs.add(p, made, asRoot ? meta.gid : undefined, meta.xattrs.some(([name]) => name === 'system.posix_acl_default'));
}
