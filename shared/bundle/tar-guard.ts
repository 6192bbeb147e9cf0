/**
 * The safe extraction guard: archive path normalisation and symlink resolution, so that no
 * entry can ever be written outside the extraction target. Checks only; it writes nothing.
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
 */
import { lstatSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { type ScError, scError } from '../errors.js';

/** Most symlinks followed in one path walk (Linux MAXSYMLINKS). */
const MAX_LINK_FOLLOWS = 40;

/**
 * A path that is already normal (`a/b/c` or `a/b/`): no empty, `.` or `..` segment, not
 * absolute, no NUL. Most archive paths are, and skip the split and join.
 */
const NORMAL_PATH = /^(?!\.\.?(?:\/|$))(?:[^/\0]+\/(?!\.\.?(?:\/|$)))*[^/\0]+\/?$/;

/** Normalises an archive path to `a/b/c` ('' for the root); throws SC_ERR_UNSAFE_ARCHIVE. */
export function archivePath(p: string, what: string): string {
  if (NORMAL_PATH.test(p)) return p.endsWith('/') ? p.slice(0, -1) : p;
  if (p.includes('\0')) throw unsafe(`${what} contains a NUL byte`, p);
  if (p.startsWith('/')) throw unsafe(`${what} is absolute`, p);
  const parts = p.split('/').filter((s) => s !== '' && s !== '.');
  if (parts.includes('..')) throw unsafe(`${what} contains '..'`, p);
  return parts.join('/');
}

function unsafe(why: string, path: string, extra?: Record<string, unknown>): ScError {
  return scError('SC_ERR_UNSAFE_ARCHIVE', `unsafe archive entry ${JSON.stringify(path.slice(0, 300))}: ${why}`, { path: path.slice(0, 300), ...extra });
}

/** Outcome of walking a symlink target: where it lands (path parts), or why it cannot be used. */
type Walk = string[] | 'escape' | 'loop';

/**
 * Resolves symlink targets inside the extraction root the way the kernel walks a path on this
 * host: component by component, following every symlink met, `..` going up from the current
 * place. `linkAt(rel)` says what is at a path: a symlink target, or undefined.
 */
export class LinkWalker {
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
export class EntryGuard {
  readonly #root: string;
  /** Every path that has been a symlink in this archive, with its (last) target. */
  readonly #symlinks = new Map<string, string>();
  readonly #checked = new Set<string>();
  /**
   * The parent directory of the last path whose parents all checked out, until a symlink is
   * added at it or above it: the next entry in the same directory (the usual case) skips the
   * walk.
   */
  #lastParent: string | null = null;
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
        // No exception for a path that is not there (most, when links point outside the tree): it costs ~25 µs.
        if (lstatSync(p, { throwIfNoEntry: false })?.isSymbolicLink()) t = readlinkSync(p);
      } catch {
        t = null;
      }
      this.#disk.set(rel, t);
    }
    return this.#disk.get(rel) ?? undefined;
  }

  /**
   * Records that the archive has put a file, a directory or a hardlink at `rel`: what was on
   * disk there is gone. Not for entries made at the end (symlinks, FIFOs) or skipped (devices):
   * until then, what was on disk is still there. Kept for every such path: the link walks meet
   * most of them again, and would otherwise lstat each.
   */
  wrote(rel: string): void {
    this.#disk.set(rel, null);
  }

  /** A symlink is now at `rel`: the parent skipped is no longer known safe if it is at or below it. */
  #linkAdded(rel: string): void {
    const last = this.#lastParent;
    if (last !== null && (last === rel || last.startsWith(`${rel}/`))) this.#lastParent = null;
  }

  /** Throws SC_ERR_UNSAFE_ARCHIVE unless no proper prefix of `rel` is a symlink. */
  #checkParents(rel: string, raw: string, what: string): void {
    const slash = rel.lastIndexOf('/');
    if (slash < 0) return;
    const parent = rel.slice(0, slash);
    if (parent === this.#lastParent) return;
    const parts = rel.split('/');
    let prefix = '';
    for (let i = 0; i < parts.length - 1; i++) {
      prefix = prefix ? `${prefix}/${parts[i]}` : parts[i];
      if (this.#symlinks.has(prefix)) throw unsafe(`${what} goes through the symlink ${prefix}`, raw);
      if (this.#checked.has(prefix)) continue;
      if (this.diskLink(prefix) !== undefined) throw unsafe(`${what} goes through the existing symlink ${prefix}`, raw);
      this.#checked.add(prefix);
    }
    this.#lastParent = parent;
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
      this.#linkAdded(rel);
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
        this.#linkAdded(rel);
      }
    }
    return rel;
  }
}
