/**
 * File access inside an OS root directory (a mounted partition, or `/` for the running OS)
 * with chroot semantics: symlinks are resolved against the root (an absolute target is
 * root-relative, `..` stops at the root), so no read or write ever leaves it, however the
 * tree's links point. Paths are given as the target OS sees them (`/etc/hostname`).
 */
import { promises as fsp } from 'node:fs';
import { dirname, join } from 'node:path';
import { scError } from '../../../shared/errors.js';
import { writeFileAtomic } from '../../../shared/fs-atomic.js';

const MAX_LINKS = 40;

function segments(p: string): string[] {
  if (p.includes('\0')) throw scError('SC_ERR_BAD_PATH', 'NUL in path');
  return p.split('/').filter((s) => s !== '' && s !== '.');
}

/**
 * Resolves `osPath` inside `root` following symlinks chroot-style. With `followLast` false
 * the final component is not dereferenced (for writes that replace it). Returns the host path.
 * Throws SC_ERR_BAD_PATH on a symlink loop; a missing component is fine (the rest is appended).
 */
export async function resolveInside(root: string, osPath: string, followLast = true): Promise<string> {
  const todo = segments(osPath);
  const done: string[] = [];
  let links = 0;
  while (todo.length) {
    const seg = todo.shift()!;
    if (seg === '..') {
      done.pop();
      continue;
    }
    const host = join(root, ...done, seg);
    if (!followLast && todo.length === 0) {
      done.push(seg);
      break;
    }
    let st: import('node:fs').Stats;
    try {
      st = await fsp.lstat(host);
    } catch {
      // A missing component: nothing below it can be a link, so the rest is resolved lexically.
      for (const s of [seg, ...todo]) {
        if (s === '..') done.pop();
        else done.push(s);
      }
      break;
    }
    if (st.isSymbolicLink()) {
      if (++links > MAX_LINKS) throw scError('SC_ERR_BAD_PATH', `too many levels of symbolic links in ${osPath}`);
      const target = await fsp.readlink(host);
      if (target.startsWith('/')) done.length = 0;
      todo.unshift(...segments(target));
      continue;
    }
    done.push(seg);
  }
  return join(root, ...done);
}

/** Reads a text file inside the root; null when it does not exist (or is not a regular file). */
export async function readInside(root: string, osPath: string): Promise<string | null> {
  const p = await resolveInside(root, osPath);
  try {
    const st = await fsp.stat(p);
    if (!st.isFile()) return null;
    if (st.size > 4 << 20) throw scError('SC_ERR_BAD_CONFIG', `${osPath} is too large to be a config file`);
    return await fsp.readFile(p, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'ENOTDIR') return null;
    throw err;
  }
}

/** Lists the names in a directory inside the root, sorted; [] when it does not exist. */
export async function listInside(root: string, osDir: string): Promise<string[]> {
  const p = await resolveInside(root, osDir);
  try {
    return (await fsp.readdir(p)).sort();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'ENOTDIR') return [];
    throw err;
  }
}

async function mkdirsInside(root: string, osDir: string): Promise<string> {
  const segs = segments(osDir);
  let cur = '';
  for (const s of segs) {
    cur = `${cur}/${s}`;
    const host = await resolveInside(root, cur);
    try {
      // Recursive: a resolved symlink may point at a directory that does not exist yet; every
      // existing component of `host` was resolved, so only real directories are traversed.
      await fsp.mkdir(host, { recursive: true, mode: s === '.ssh' ? 0o700 : 0o755 });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
  }
  return resolveInside(root, osDir);
}

/**
 * Writes a file inside the root atomically and durably (shared/fs-atomic.ts: a hidden temp file
 * the target OS's config globs skip, fsync, rename, fsync of the directory; a symlink at the final
 * path is replaced, never followed) with exactly `mode`. Missing parent directories are
 * created. Returns false, touching nothing, when the file already has this content and mode.
 */
export async function writeInside(root: string, osPath: string, content: string, mode: number): Promise<boolean> {
  const target = await resolveInside(root, osPath, false);
  try {
    const st = await fsp.lstat(target);
    if (st.isFile() && (st.mode & 0o7777) === mode && (await fsp.readFile(target, 'utf8')) === content) return false;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  const dir = await mkdirsInside(root, dirname(`/${segments(osPath).join('/')}`));
  await writeFileAtomic(target, content, { mode, tempDir: dir });
  return true;
}

/** Renames a file inside the root (both paths resolved chroot-style); no-op when `from` is missing. */
export async function renameInside(root: string, from: string, to: string): Promise<boolean> {
  const a = await resolveInside(root, from, false);
  const b = await resolveInside(root, to, false);
  try {
    await fsp.rename(a, b);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err;
  }
}
