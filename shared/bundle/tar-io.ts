/**
 * Plumbing shared by the tar packer and extractor: waiting on a writable's back-pressure, and
 * turning a file system error into an ScError (SC_ERR_NO_SPACE for a full disk).
 */
import { type ErrorCode, isScError, type ScError, scError } from '../errors.js';

/**
 * Resolves when a writable wants more, or is closed (destroyed). A writable already destroyed
 * (or being destroyed: streamx's `destroying`) resolves at once: its 'close' may have fired
 * before this was called, and waiting for it would hang the writer for ever.
 */
export function drained(w: { once(ev: string, fn: () => void): unknown; off(ev: string, fn: () => void): unknown; destroyed?: boolean; destroying?: boolean }): Promise<void> {
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

/** A file system error as an ScError: SC_ERR_NO_SPACE for ENOSPC/EDQUOT, else `fallback`. */
export function fsFailure(err: unknown, what: string, path?: string, fallback: ErrorCode = 'SC_ERR_INTERNAL'): ScError {
  if (isScError(err)) return err;
  const e = err as NodeJS.ErrnoException;
  const errno = typeof e?.code === 'string' && /^E[A-Z0-9]+$/.test(e.code) ? e.code : undefined;
  const code: ErrorCode = errno === 'ENOSPC' || errno === 'EDQUOT' ? 'SC_ERR_NO_SPACE' : fallback;
  return scError(code, `${what}: ${errno ?? ''} ${e?.message ?? String(err)}`.trim(), { ...(errno ? { errno } : {}), ...(path ? { path } : {}) }, err);
}
