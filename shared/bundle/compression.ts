/**
 * Streaming compression for bundles: zstd (zstd-napi, level 3, with a frame checksum), gzip
 * (node:zlib) or none. Corrupt or truncated input fails the stream with SC_ERR_BAD_ARCHIVE.
 */
import { type Duplex, PassThrough, type Transform } from 'node:stream';
import { createGunzip, createGzip } from 'node:zlib';
import { CompressStream, DecompressStream } from 'zstd-napi';
import { COMPRESSIONS, type Compression } from '../manifest.js';
import { isScError, scError } from '../errors.js';

export { COMPRESSIONS, type Compression };

/** zstd level used for bundles (STACK.md: ~700 MB/s compress, ~450 MB/s decompress here). */
export const ZSTD_LEVEL = 3;

/** Magic bytes of the compressed formats a tarball input may arrive in. */
export const MAGIC = {
  gzip: Buffer.from([0x1f, 0x8b]),
  zstd: Buffer.from([0x28, 0xb5, 0x2f, 0xfd]),
  xz: Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]),
  bzip2: Buffer.from('BZh'),
} as const;

function checkCompression(c: unknown): Compression {
  if (!COMPRESSIONS.includes(c as Compression)) {
    throw scError('SC_ERR_BAD_REQUEST', `unknown compression ${JSON.stringify(c)}; expected one of ${COMPRESSIONS.join(', ')}`);
  }
  return c as Compression;
}

/**
 * Makes every error a stream is destroyed with an ScError with `code` (errors that already
 * carry a code pass through). Works for errors raised in _transform/_flush callbacks and for
 * native handles that call destroy(err) directly (zlib).
 */
export function withErrorCode<T extends Duplex>(stream: T, code: 'SC_ERR_BAD_ARCHIVE', what: string): T {
  const destroy = stream.destroy.bind(stream);
  stream.destroy = (err?: Error) => {
    const mapped = err && !isScError(err) ? scError(code, `${what}: ${err.message}`, undefined, err) : err;
    return destroy(mapped);
  };
  return stream;
}

/** A Transform that compresses with `c`. Throws SC_ERR_BAD_REQUEST for an unknown compression. */
export function compressStream(c: Compression): Transform {
  switch (checkCompression(c)) {
    case 'zstd':
      return new CompressStream({ compressionLevel: ZSTD_LEVEL, checksumFlag: true });
    case 'gzip':
      return createGzip({ level: 6, chunkSize: 256 * 1024 });
    default:
      return new PassThrough();
  }
}

/**
 * A Transform that decompresses `c`. The stream fails with SC_ERR_BAD_ARCHIVE on corrupt or
 * truncated input (a zstd frame or gzip member cut short never ends cleanly). Throws
 * SC_ERR_BAD_REQUEST for an unknown compression.
 */
export function decompressStream(c: Compression): Transform {
  switch (checkCompression(c)) {
    case 'zstd':
      return withErrorCode(new DecompressStream(), 'SC_ERR_BAD_ARCHIVE', 'zstd');
    case 'gzip':
      return withErrorCode(createGunzip({ chunkSize: 256 * 1024 }), 'SC_ERR_BAD_ARCHIVE', 'gzip');
    default:
      return new PassThrough();
  }
}

/** Identifies a compressed stream by its first bytes: 'zstd', 'gzip', or null for anything else. */
export function sniffCompression(head: Uint8Array): 'zstd' | 'gzip' | null {
  const b = Buffer.from(head.buffer, head.byteOffset, head.byteLength);
  if (b.length >= 4 && b.subarray(0, 4).equals(MAGIC.zstd)) return 'zstd';
  if (b.length >= 2 && b.subarray(0, 2).equals(MAGIC.gzip)) return 'gzip';
  return null;
}
