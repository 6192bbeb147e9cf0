/**
 * Local file system helpers whose failures are ScErrors a person can read: directory creation
 * that always ends (also where a parent takes no new entries), and errno codes in words.
 */
import { mkdirSync, statSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { type ScError, scError } from './errors.js';

/** Words for the errno codes a person meets on the command line; others are shown as the bare code. */
const ERRNO_WORDS: Record<string, string> = {
  ENOENT: 'no such file or directory',
  ENOTDIR: 'a part of the path is not a directory',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  EROFS: 'read-only file system',
  EISDIR: 'is a directory',
  EEXIST: 'already exists',
  ENOSPC: 'no space left on the device',
};

/** `no such file or directory (ENOENT)` for a Node system error; its message otherwise. */
export function describeErrno(err: unknown): string {
  const code = (err as NodeJS.ErrnoException)?.code;
  if (typeof code === 'string' && /^E[A-Z]+$/.test(code)) return ERRNO_WORDS[code] ? `${ERRNO_WORDS[code]} (${code})` : code;
  return err instanceof Error ? err.message : String(err);
}

/**
 * Creates `dir` and its missing parents with `mode`, one level at a time. Node's own
 * `mkdir({recursive: true})` never returns when a parent refuses new entries with ENOENT (as
 * /proc does): it retries the same mkdir forever. Here the second ENOENT for the same path ends
 * it. Throws SC_ERR_FILE_ACCESS naming the directory.
 */
export function makeDir(dir: string, mode = 0o777): void {
  const path = resolve(dir);
  try {
    mkdirSync(path, { mode });
    return;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST' && isDir(path)) return;
    if (code !== 'ENOENT' || dirname(path) === path) throw dirError(path, err);
  }
  makeDir(dirname(path), mode);
  try {
    mkdirSync(path, { mode });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST' && isDir(path)) return;
    // The parent exists now, so ENOENT means it takes no new directories (/proc, /sys).
    if (code === 'ENOENT') throw scError('SC_ERR_FILE_ACCESS', `cannot create directory ${path}: ${dirname(path)} takes no new directories (ENOENT)`, { path });
    throw dirError(path, err);
  }
}

function isDir(path: string): boolean {
  try {
    return statSync(path).isDirectory();
  } catch {
    return false;
  }
}

function dirError(path: string, err: unknown): ScError {
  const why = (err as NodeJS.ErrnoException).code === 'EEXIST' ? 'a file of that name exists' : describeErrno(err);
  return scError('SC_ERR_FILE_ACCESS', `cannot create directory ${path}: ${why}`, { path });
}
