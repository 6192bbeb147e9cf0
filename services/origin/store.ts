/**
 * Origin storage: the `BlobStore` interface with its error contract, and `FsBlobStore`, the
 * filesystem implementation.
 *
 * Data directory layout (FsBlobStore):
 * ```
 * DATA/blobs/sha256/<hex[0:2]>/<hex>     blob bytes, named by their sha256
 * DATA/manifests/<name>/<version>.json   the manifest, as canonical JSON (sha256 of the file = manifest digest)
 * DATA/meta/<name>/<version>.json        origin-side metadata of a manifest (content fingerprint)
 * DATA/tmp/                              uploads in progress; emptied when the store opens
 * ```
 * One origin process owns a data directory at a time (opening it empties tmp/).
 */
import { createHash, randomUUID } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { link, mkdir, open, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { type Readable, Transform, type TransformCallback, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { type Digest, digestHex, parseDigest } from '../../shared/digest.js';
import { isScError, scError } from '../../shared/errors.js';
import { canonicalJson, type Manifest, manifestDigest, parseManifest } from '../../shared/manifest.js';
import { parseName, parseVersion } from '../../shared/names.js';

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
 *   immutable; an identical manifest is accepted with `created: false`);
 * - an upload whose source fails (e.g. the client disconnects) rejects with that error, and
 *   nothing is stored or left behind.
 * Implementations must be safe for concurrent callers: two uploads of the same blob both succeed
 * and the stored blob is correct (exactly one reports `created: true` in FsBlobStore); two
 * different manifests raced at one version give one success and one SC_ERR_VERSION_EXISTS.
 * Stored blobs and manifests are immutable: a reader never sees a partial write.
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
   * the manifest is created. Does not check that the blob exists: the server does.
   */
  putManifest(manifest: Manifest, meta?: ManifestMeta): Promise<{ created: boolean; manifestDigest: Digest }>;
  /** Every stored manifest, sorted by name, then publishedAt, then version. */
  listBundles(): Promise<BundleEntry[]>;
}

function isErrno(err: unknown, ...codes: string[]): boolean {
  return codes.includes((err as NodeJS.ErrnoException)?.code ?? '');
}

async function fsyncPath(path: string): Promise<void> {
  const fh = await open(path, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Hashes and counts bytes, failing early when more than `limit` bytes arrive. */
class VerifyingStream extends Transform {
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

/** A writable that discards everything (for re-uploads of a blob we already hold). */
function sink(): Writable {
  return new Writable({
    highWaterMark: 1 << 20,
    write(_c, _e, cb) {
      cb();
    },
  });
}

/** Filesystem BlobStore. Create with `FsBlobStore.open(dataDir)`. */
export class FsBlobStore implements BlobStore {
  readonly dir: string;
  readonly #tmp: string;
  /** Listing entries by `name@version`; manifests are immutable so entries never go stale. */
  readonly #entries = new Map<string, BundleEntry>();

  private constructor(dir: string) {
    this.dir = dir;
    this.#tmp = join(dir, 'tmp');
  }

  /** Opens (creating if needed) a store in `dir` and deletes leftover temp files. */
  static async open(dir: string): Promise<FsBlobStore> {
    const s = new FsBlobStore(dir);
    for (const d of ['blobs/sha256', 'manifests', 'meta']) await mkdir(join(dir, d), { recursive: true });
    await rm(s.#tmp, { recursive: true, force: true });
    await mkdir(s.#tmp, { recursive: true });
    return s;
  }

  /** Path of a blob's file (digest validated; existence not checked). */
  blobPath(digest: Digest): string {
    const hex = digestHex(parseDigest(digest));
    return join(this.dir, 'blobs', 'sha256', hex.slice(0, 2), hex);
  }

  #manifestPath(name: string, version: string): string {
    return join(this.dir, 'manifests', parseName(name), `${parseVersion(version)}.json`);
  }

  #metaPath(name: string, version: string): string {
    return join(this.dir, 'meta', parseName(name), `${parseVersion(version)}.json`);
  }

  #tmpFile(label: string): string {
    return join(this.#tmp, `${label}.${randomUUID()}.part`);
  }

  async statBlob(digest: Digest): Promise<{ size: number }> {
    const p = this.blobPath(digest);
    try {
      const st = await stat(p);
      if (!st.isFile()) throw scError('SC_ERR_BLOB_NOT_FOUND', undefined, { digest });
      return { size: st.size };
    } catch (err) {
      if (isErrno(err, 'ENOENT', 'ENOTDIR')) throw scError('SC_ERR_BLOB_NOT_FOUND', undefined, { digest });
      throw err;
    }
  }

  async openBlob(digest: Digest, range?: BlobRange): Promise<Readable> {
    const p = this.blobPath(digest);
    let fh: Awaited<ReturnType<typeof open>>;
    try {
      fh = await open(p, 'r');
    } catch (err) {
      if (isErrno(err, 'ENOENT', 'ENOTDIR')) throw scError('SC_ERR_BLOB_NOT_FOUND', undefined, { digest });
      throw err;
    }
    if (range && (range.start < 0 || range.end < range.start - 1)) {
      await fh.close();
      throw scError('SC_ERR_BAD_RANGE', undefined, { start: range.start, end: range.end });
    }
    return createReadStream(p, { fd: fh, autoClose: true, highWaterMark: 1 << 20, ...(range ? { start: range.start, end: range.end } : {}) });
  }

  async putBlob(digest: Digest, src: Readable, expectedSize?: number): Promise<{ created: boolean; size: number }> {
    const final = this.blobPath(digest);
    if (expectedSize !== undefined && (!Number.isSafeInteger(expectedSize) || expectedSize < 0)) {
      src.destroy();
      throw scError('SC_ERR_SIZE_MISMATCH', `bad expected size ${expectedSize}`);
    }
    const verify = new VerifyingStream(expectedSize);
    const check = (): number => {
      if (expectedSize !== undefined && verify.bytes !== expectedSize) {
        throw scError('SC_ERR_SIZE_MISMATCH', `got ${verify.bytes} bytes, expected ${expectedSize}`, { expected: expectedSize, actual: verify.bytes });
      }
      const actual: Digest = `sha256:${verify.hash.digest('hex')}`;
      if (actual !== digest) throw scError('SC_ERR_DIGEST_MISMATCH', 'uploaded bytes do not match the digest', { expected: digest, actual });
      return verify.bytes;
    };

    if (await this.#exists(final)) {
      await pipeline(src, verify, sink());
      return { created: false, size: check() };
    }

    const tmp = this.#tmpFile(digestHex(digest));
    try {
      await pipeline(src, verify, createWriteStream(tmp, { flags: 'wx', mode: 0o644, highWaterMark: 1 << 20 }));
      const size = check();
      await fsyncPath(tmp);
      await mkdir(dirname(final), { recursive: true });
      const created = await this.#publish(tmp, final);
      return { created, size };
    } finally {
      await rm(tmp, { force: true });
    }
  }

  /**
   * Makes `tmp` visible at `final` without ever replacing an existing file: link(2) fails
   * with EEXIST when another writer won. Falls back to rename(2) on filesystems without hard
   * links. Returns whether this call created `final`.
   */
  async #publish(tmp: string, final: string): Promise<boolean> {
    let created: boolean;
    try {
      await link(tmp, final);
      created = true;
    } catch (err) {
      if (isErrno(err, 'EEXIST')) created = false;
      else if (isErrno(err, 'EPERM', 'ENOTSUP', 'EOPNOTSUPP', 'EXDEV')) {
        if (await this.#exists(final)) created = false;
        else {
          await rename(tmp, final);
          created = true;
        }
      } else throw err;
    }
    if (created) await fsyncPath(dirname(final));
    return created;
  }

  async #exists(path: string): Promise<boolean> {
    try {
      await stat(path);
      return true;
    } catch (err) {
      if (isErrno(err, 'ENOENT', 'ENOTDIR')) return false;
      throw err;
    }
  }

  async getManifest(name: string, version: string): Promise<Manifest> {
    const p = this.#manifestPath(name, version);
    let text: string;
    try {
      text = await readFile(p, 'utf8');
    } catch (err) {
      if (isErrno(err, 'ENOENT', 'ENOTDIR')) throw scError('SC_ERR_MANIFEST_NOT_FOUND', `no manifest ${name}@${version}`, { name, version });
      throw err;
    }
    try {
      return parseManifest(JSON.parse(text));
    } catch (err) {
      throw scError('SC_ERR_INTERNAL', `stored manifest ${name}@${version} is corrupt`, undefined, err);
    }
  }

  async getManifestMeta(name: string, version: string): Promise<ManifestMeta> {
    await this.getManifest(name, version);
    try {
      const raw = JSON.parse(await readFile(this.#metaPath(name, version), 'utf8')) as ManifestMeta;
      return raw.fingerprint ? { fingerprint: parseDigest(raw.fingerprint) } : {};
    } catch (err) {
      if (isErrno(err, 'ENOENT', 'ENOTDIR')) return {};
      throw err;
    }
  }

  async putManifest(input: Manifest, meta: ManifestMeta = {}): Promise<{ created: boolean; manifestDigest: Digest }> {
    const m = parseManifest(input);
    if (meta.fingerprint !== undefined) parseDigest(meta.fingerprint);
    const digest = manifestDigest(m);
    const final = this.#manifestPath(m.name, m.version);
    const tmp = this.#tmpFile('manifest');
    try {
      await writeFile(tmp, canonicalJson(m), { flag: 'wx', mode: 0o644 });
      await fsyncPath(tmp);
      await mkdir(dirname(final), { recursive: true });
      const created = await this.#publish(tmp, final);
      if (!created) {
        const existing = await this.getManifest(m.name, m.version);
        const existingDigest = manifestDigest(existing);
        if (existingDigest !== digest) {
          throw scError('SC_ERR_VERSION_EXISTS', `${m.name}@${m.version} exists with other content; versions are immutable`, {
            name: m.name,
            version: m.version,
            existing: existingDigest,
            given: digest,
          });
        }
        return { created: false, manifestDigest: digest };
      }
      if (meta.fingerprint) await this.#writeMeta(m.name, m.version, { fingerprint: meta.fingerprint });
      this.#entries.set(`${m.name}@${m.version}`, toEntry(m));
      return { created: true, manifestDigest: digest };
    } finally {
      await rm(tmp, { force: true });
    }
  }

  async #writeMeta(name: string, version: string, meta: ManifestMeta): Promise<void> {
    const final = this.#metaPath(name, version);
    const tmp = this.#tmpFile('meta');
    try {
      await writeFile(tmp, JSON.stringify(meta), { flag: 'wx', mode: 0o644 });
      await fsyncPath(tmp);
      await mkdir(dirname(final), { recursive: true });
      await rename(tmp, final);
      await fsyncPath(dirname(final));
    } finally {
      await rm(tmp, { force: true });
    }
  }

  async listBundles(): Promise<BundleEntry[]> {
    const root = join(this.dir, 'manifests');
    const out: BundleEntry[] = [];
    for (const name of await readdir(root)) {
      try {
        parseName(name);
      } catch {
        continue;
      }
      let files: string[];
      try {
        files = await readdir(join(root, name));
      } catch (err) {
        if (isErrno(err, 'ENOENT', 'ENOTDIR')) continue;
        throw err;
      }
      for (const f of files) {
        if (!f.endsWith('.json')) continue;
        const version = f.slice(0, -5);
        const key = `${name}@${version}`;
        let e = this.#entries.get(key);
        if (!e) {
          try {
            e = toEntry(await this.getManifest(name, version));
          } catch (err) {
            if (isScError(err, 'SC_ERR_BAD_VERSION') || isScError(err, 'SC_ERR_MANIFEST_NOT_FOUND')) continue;
            throw err;
          }
          this.#entries.set(key, e);
        }
        out.push(e);
      }
    }
    return out.sort((a, b) => cmp(a.name, b.name) || cmp(a.publishedAt, b.publishedAt) || cmp(a.version, b.version));
  }
}

function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

function toEntry(m: Manifest): BundleEntry {
  return { name: m.name, version: m.version, role: m.role, manifestDigest: manifestDigest(m), publishedAt: m.publishedAt };
}
