/**
 * The origin's storage interface, `BlobStore`, with its written error contract, and the shapes it
 * returns. Implementations: FsBlobStore (services/origin/store.ts). Import these through
 * store.ts, which re-exports them.
 */
import type { Readable } from 'node:stream';
import type { Digest } from '../../shared/digest.js';
import type { Manifest } from '../../shared/manifest.js';
import type { GcOptions, GcReport } from './gc.js';

/** One published bundle, as listed by `GET /v1/bundles` (contract). */
export interface BundleEntry {
  name: string;
  version: string;
  role: 'base' | 'target';
  manifestDigest: Digest;
  publishedAt: string;
}

/** An inclusive byte range, as in HTTP `Range: bytes=start-end`. */
export interface BlobRange {
  start: number;
  end: number;
}

/** Origin-side metadata kept beside a manifest. Never part of the signed manifest. */
export interface ManifestMeta {
  /**
   * A digest of the bundle content that is stable across re-encryptions (see the publish
   * command), recorded by the publisher so a re-publish of the same content is a no-op.
   */
  fingerprint?: Digest;
}

/**
 * Storage for blobs (by sha256) and manifests (by name@version).
 *
 * Error contract, for every implementation (all errors are ScError):
 * - a missing blob: SC_ERR_BLOB_NOT_FOUND; a missing manifest: SC_ERR_MANIFEST_NOT_FOUND;
 * - malformed input: SC_ERR_BAD_DIGEST, SC_ERR_BAD_NAME, SC_ERR_BAD_VERSION, SC_ERR_BAD_MANIFEST;
 * - an upload whose bytes do not hash to the digest: SC_ERR_DIGEST_MISMATCH; whose length differs
 *   from `expectedSize`: SC_ERR_SIZE_MISMATCH. In both cases nothing is stored and nothing is
 *   left behind;
 * - a different manifest at an existing name@version: SC_ERR_VERSION_EXISTS (versions are
 *   immutable; an identical manifest is accepted with `created: false`); so is a different
 *   manifest at a removed name@version (a removed version is never reused with other content);
 * - a manifest written with `requireBlob` whose blob is absent: SC_ERR_MISSING_BLOB; of another
 *   size: SC_ERR_SIZE_MISMATCH;
 * - an upload whose source fails (e.g. the client disconnects) rejects with that error, and
 *   nothing is stored or left behind.
 * Implementations must be safe for concurrent callers: two uploads of the same blob both succeed
 * and the stored blob is correct (exactly one reports `created: true` in FsBlobStore); two
 * different manifests raced at one version give one success and one SC_ERR_VERSION_EXISTS.
 * Stored blobs and manifests are immutable: a reader never sees a partial write.
 * Removal and collection never touch anything still referenced: `deleteManifest` removes one
 * manifest (its blob stays until a collection finds it unreferenced), and `collectGarbage`
 * never removes a blob that a stored manifest references, that a manifest being written with
 * `requireBlob` references, that is being uploaded, or that is younger than the grace period.
 */
export interface BlobStore {
  /** Size in bytes of a stored blob. */
  statBlob(digest: Digest): Promise<{ size: number }>;
  /**
   * Local path of a stored blob, when the implementation keeps blobs as files (lets the server
   * use sendfile-like streaming). Does not check existence: call statBlob first.
   */
  blobPath?(digest: Digest): string;
  /** The blob's bytes, optionally one inclusive range of them. */
  openBlob(digest: Digest, range?: BlobRange): Promise<Readable>;
  /**
   * Streams `src` into the store, verifying sha256 (and `expectedSize` when given) before the
   * blob becomes visible. When the blob is already stored the source is still read to its end
   * and verified, nothing is written, and `created` is false.
   */
  putBlob(digest: Digest, src: Readable, expectedSize?: number): Promise<{ created: boolean; size: number }>;
  /** The manifest stored at name@version (validated). */
  getManifest(name: string, version: string): Promise<Manifest>;
  /** Origin-side metadata of a stored manifest ({} when none was recorded). */
  getManifestMeta(name: string, version: string): Promise<ManifestMeta>;
  /**
   * Stores a manifest at its own name@version. Identical content (same manifest digest) gives
   * `created: false`; different content SC_ERR_VERSION_EXISTS. `meta` is recorded only when
   * the manifest is created. With `opts.requireBlob` the blob must be stored with the size the
   * manifest states, checked atomically with respect to `collectGarbage`; without it the blob
   * is not checked.
   */
  putManifest(manifest: Manifest, meta?: ManifestMeta, opts?: { requireBlob?: boolean }): Promise<{ created: boolean; manifestDigest: Digest }>;
  /** Every stored manifest, sorted by name, then publishedAt, then version. */
  listBundles(): Promise<BundleEntry[]>;
  /**
   * Removes the manifest name@version and its metadata, and remembers that the version was
   * removed (it is never reused with other content). The blob stays: a collection frees it once
   * no manifest references it. Throws SC_ERR_MANIFEST_NOT_FOUND when there is no such manifest.
   */
  deleteManifest(name: string, version: string): Promise<RemovedManifest>;
  /** One mark-and-sweep collection of unreferenced blobs (services/origin/gc.ts). */
  collectGarbage(opts: GcOptions): Promise<GcReport>;
}

/** What `deleteManifest` removed. */
export interface RemovedManifest {
  name: string;
  version: string;
  manifestDigest: Digest;
  /** The blob the manifest referenced (not removed by this call). */
  blob: { digest: Digest; size: number };
}
