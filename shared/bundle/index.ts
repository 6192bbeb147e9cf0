/**
 * The bundle codec: directory or tarball → tar → compression → age, and back, streaming.
 * This index is the public surface of shared/bundle; import from here.
 *
 * A bundle blob is `age(compress(tar))`: age is skipped when there are no recipients
 * (manifest `encryption: none`), compression may be `none`. Nothing is ever held whole in
 * memory.
 */
import { pipeline, type Readable, type Transform } from 'node:stream';
import { scError } from '../errors.js';
import { decryptStream, encryptStream } from './age.js';
import { type Compression, compressStream, decompressStream } from './compression.js';
import { type ExtractResult, packDirStream, safeExtract } from './tar.js';
import { openTarball } from './tarball.js';

export {
  AGE_CHUNK_SIZE,
  AGE_MAX_HEAD,
  type AgeIdentity,
  type AgePayload,
  type AgeRecipient,
  decryptStream,
  encryptStream,
  generateAgeIdentity,
  openAgePayload,
  parseIdentity,
  parseRecipient,
  readIdentityFile,
  readRecipientsFile,
} from './age.js';
export { COMPRESSIONS, type Compression, compressStream, decompressStream, sniffCompression, ZSTD_LEVEL } from './compression.js';
export { defaultNetFormat, parseOsRelease, readOsRelease } from './osrelease.js';
export { makeSampleRootfs, type SampleRootfsOptions } from './sample.js';
export { type ExtractOptions, type ExtractResult, packDirStream, safeExtract, scanTar } from './tar.js';
export { XATTR_NAMESPACES } from './xattr.js';
export { createTarExtract, type TarEntry, XATTR_KEY } from './pax.js';
export { isTarBlock, openTarball } from './tarball.js';

/** Encryption of a bundle blob, as in the manifest. */
export type Encryption = 'age' | 'none';

/** Where a bundle's tree comes from: exactly one of a directory or a tarball file. */
export interface BundleInput {
  dir?: string;
  tarball?: string;
}

/** Options for `packBundle`. */
export interface PackBundleOptions {
  compression: Compression;
  /** `age1…` recipients; empty means no encryption (manifest `encryption: none`). */
  recipients: string[];
}

/**
 * Streams a bundle blob built from `input`: a directory (packed with `packDirStream`) or a
 * tarball (see `openTarball`), compressed with `opts.compression`, then age-encrypted when
 * recipients are given. Throws synchronously with SC_ERR_BAD_REQUEST (input), SC_ERR_BAD_KEY
 * (recipients) or SC_ERR_BAD_ARCHIVE (tarball format); the returned stream fails with the
 * error of whichever stage failed.
 */
export function packBundle(input: BundleInput, opts: PackBundleOptions): Readable {
  if (!input || Boolean(input.dir) === Boolean(input.tarball)) {
    throw scError('SC_ERR_BAD_REQUEST', 'packBundle needs exactly one of a directory or a tarball');
  }
  const recipients = opts.recipients ?? [];
  const enc = recipients.length ? encryptStream(recipients) : null;
  const comp = compressStream(opts.compression);
  const src = input.dir ? packDirStream(input.dir) : openTarball(input.tarball!);
  const stages = enc ? [src, comp, enc] : [src, comp];
  return pipeline(stages, () => {}) as unknown as Readable;
}

/** Options for `unpackBundle`. */
export interface UnpackBundleOptions {
  /** Target directory (created if missing). */
  dir: string;
  compression: Compression;
  encryption: Encryption;
  /** `AGE-SECRET-KEY-1…` identities; required when encryption is `age`. */
  identities: string[];
  /**
   * Most plaintext tar bytes to unpack: the manifest's `blob.unpackedSize` when it has one,
   * else a cap (default `DEFAULT_MAX_UNPACKED_BYTES`). Past it: SC_ERR_BUNDLE_TOO_LARGE.
   */
  maxUnpackedBytes?: number;
}

/**
 * The unpack cap for bundles whose manifest has no `unpackedSize` (published before it existed):
 * 256 GiB, more than any root filesystem we ship, less than a decompression bomb would write.
 */
export const DEFAULT_MAX_UNPACKED_BYTES = 256 * 2 ** 30;

/**
 * Unpacks a bundle blob stream into `opts.dir`: age-decrypts (when `encryption` is `age`),
 * decompresses, and extracts with `safeExtract`. Rejects with SC_ERR_DECRYPT (wrong identity,
 * tampering, truncation), SC_ERR_BAD_ARCHIVE (corrupt compression or tar),
 * SC_ERR_UNSAFE_ARCHIVE, SC_ERR_UNSUPPORTED_XATTR, SC_ERR_BUNDLE_TOO_LARGE (past
 * `maxUnpackedBytes`), SC_ERR_NO_SPACE, SC_ERR_BAD_KEY / SC_ERR_BAD_REQUEST (options), or the
 * error `src` failed with. On failure `src` is destroyed and the target may hold a partial tree.
 */
export async function unpackBundle(src: Readable, opts: UnpackBundleOptions): Promise<ExtractResult> {
  if (opts.encryption !== 'age' && opts.encryption !== 'none') {
    src.destroy();
    throw scError('SC_ERR_BAD_REQUEST', `unknown encryption ${JSON.stringify(opts.encryption)}`);
  }
  let stages: (Readable | Transform)[];
  try {
    const dec = opts.encryption === 'age' ? [decryptStream(opts.identities ?? [])] : [];
    stages = [src, ...dec, decompressStream(opts.compression)];
  } catch (err) {
    src.destroy();
    throw err;
  }
  const plain = pipeline(stages, () => {}) as unknown as Readable;
  return safeExtract(plain, opts.dir, { maxBytes: opts.maxUnpackedBytes ?? DEFAULT_MAX_UNPACKED_BYTES });
}
