/**
 * Small filesystem and stream helpers of the origin's FsBlobStore and its garbage collector:
 * errno checks, existence checks, the verifying (hash + count) pass-through and a discarding
 * sink. Nothing here knows the store's layout. fsync and atomic writes are in shared/fs-atomic.ts.
 */
import { createHash } from 'node:crypto';
import { stat } from 'node:fs/promises';
import { Transform, type TransformCallback, Writable } from 'node:stream';
import { scError } from '../../shared/errors.js';

/** True when `err` is a Node errno error with one of `codes`. */
export function isErrno(err: unknown, ...codes: string[]): boolean {
  return codes.includes((err as NodeJS.ErrnoException)?.code ?? '');
}

/** True when `path` exists (anything but ENOENT/ENOTDIR is thrown). */
export async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch (err) {
    if (isErrno(err, 'ENOENT', 'ENOTDIR')) return false;
    throw err;
  }
}

/** Hashes and counts bytes, failing early (SC_ERR_SIZE_MISMATCH) when more than `limit` bytes arrive. */
export class VerifyingStream extends Transform {
  readonly hash = createHash('sha256');
  bytes = 0;
  constructor(private readonly limit?: number) {
    super({ highWaterMark: 1 << 20 });
  }
  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.bytes += chunk.length;
    if (this.limit !== undefined && this.bytes > this.limit) {
      cb(scError('SC_ERR_SIZE_MISMATCH', `body is longer than the declared ${this.limit} bytes`, { expected: this.limit }));
      return;
    }
    this.hash.update(chunk);
    cb(null, chunk);
  }
}

/** A writable that discards everything (for re-uploads of a blob the store already holds). */
export function sink(): Writable {
  return new Writable({
    highWaterMark: 1 << 20,
    write(_c, _e, cb) {
      cb();
    },
  });
}
