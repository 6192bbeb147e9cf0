/** sha256 digests: validation, streaming computation and verification. */
import { createHash, type Hash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { scError } from './errors.js';

/** The only accepted digest form: `sha256:` and 64 lowercase hex characters. */
export const DIGEST_RE = /^sha256:[0-9a-f]{64}$/;

export type Digest = `sha256:${string}`;

/** True for a well-formed digest string. */
export function isDigest(s: unknown): s is Digest {
  return typeof s === 'string' && DIGEST_RE.test(s);
}

/** Returns `s` as a Digest or throws SC_ERR_BAD_DIGEST. */
export function parseDigest(s: unknown): Digest {
  if (!isDigest(s)) throw scError('SC_ERR_BAD_DIGEST', undefined, { digest: typeof s === 'string' ? s.slice(0, 100) : typeof s });
  return s;
}

/** The hex part of a digest. */
export function digestHex(d: Digest): string {
  return d.slice(7);
}

/** Digest of an in-memory buffer (small things only: manifests, test data). */
export function sha256Of(data: Uint8Array | string): Digest {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

/**
 * A pass-through Transform that hashes and counts what flows through it. `digest()` is valid
 * once the stream has ended.
 */
export class HashingStream extends Transform {
  readonly hash: Hash = createHash('sha256');
  bytes = 0;
  #digest?: Digest;

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.hash.update(chunk);
    this.bytes += chunk.length;
    cb(null, chunk);
  }

  override _flush(cb: TransformCallback): void {
    this.#digest = `sha256:${this.hash.digest('hex')}`;
    cb();
  }

  /** The digest of everything that passed; throws if the stream has not ended. */
  digest(): Digest {
    if (!this.#digest) throw scError('SC_ERR_INTERNAL', 'digest() before the stream ended');
    return this.#digest;
  }
}

/** Streams a file through sha256; returns its digest and size. */
export async function digestFile(path: string): Promise<{ digest: Digest; size: number }> {
  const h = new HashingStream();
  await pipeline(createReadStream(path, { highWaterMark: 1 << 20 }), h, async (src) => {
    for await (const _ of src) {
      /* drain */
    }
  });
  return { digest: h.digest(), size: h.bytes };
}

/** Throws SC_ERR_DIGEST_MISMATCH unless `actual` equals `expected`. */
export function assertDigest(expected: Digest, actual: Digest, what = 'content'): void {
  if (expected !== actual) throw scError('SC_ERR_DIGEST_MISMATCH', `${what} digest mismatch`, { expected, actual });
}
