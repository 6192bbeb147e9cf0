/**
 * Origin storage: `FsBlobStore`, the filesystem implementation of `BlobStore` (the interface and
 * its error contract live in blob-store.ts and are re-exported here).
 *
 * Data directory layout (FsBlobStore):
 * ```
 * DATA/blobs/sha256/<hex[0:2]>/<hex>     blob bytes, named by their sha256
 * DATA/manifests/<name>/<version>.json   the manifest, as canonical JSON (sha256 of the file = manifest digest)
 * DATA/meta/<name>/<version>.json        origin-side metadata of a manifest (content fingerprint)
 * DATA/removed/<name>/<version>.json     tombstone of a removed manifest: {manifestDigest, blob, removedAt}
 * DATA/tmp/                              uploads in progress; emptied when the store opens
 * ```
 * One origin process owns a data directory at a time (opening it empties tmp/). Removal and
 * garbage collection are in services/origin/gc.ts (safety argument) and guard.ts (the lock).
 */
import { randomUUID } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { link, mkdir, open, readdir, readFile, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { type Digest, digestHex, parseDigest } from '../../shared/digest.js';
import { isScError, scError } from '../../shared/errors.js';
import { fsyncPath, openWriteStream, writeFileAtomic } from '../../shared/fs-atomic.js';
import { canonicalJson, type Manifest, manifestDigest, parseManifest } from '../../shared/manifest.js';
import { parseName, parseVersion } from '../../shared/names.js';
import { collectGarbage, type GcOptions, type GcReport } from './gc.js';
import { exists, isErrno, sink, VerifyingStream } from './fs-util.js';
import { StoreGuard } from './guard.js';
import type { BlobRange, BlobStore, BundleEntry, ManifestMeta, RemovedManifest } from './blob-store.js';

export type { GcOptions, GcReport };
export type { BlobRange, BlobStore, BundleEntry, ManifestMeta, RemovedManifest } from './blob-store.js';

/** A removed version's tombstone, as stored under DATA/removed/. */
interface Tombstone {
  manifestDigest: Digest;
  blob: { digest: Digest; size: number };
  removedAt: string;
}

/** Filesystem BlobStore. Create with `FsBlobStore.open(dataDir)`. */
export class FsBlobStore implements BlobStore {
  readonly dir: string;
  readonly #tmp: string;
  /** Listing entries and blob digests by `name@version` (manifests are immutable; removal drops them). */
  readonly #entries = new Map<string, BundleEntry>();
  readonly #blobOf = new Map<string, Digest>();
  /** The lock manifest writes, removals and collections take, and the pins of running uploads. */
  readonly #guard = new StoreGuard();

  private constructor(dir: string) {
    this.dir = dir;
    this.#tmp = join(dir, 'tmp');
  }

  /** Opens (creating if needed) a store in `dir` and deletes leftover temp files. */
  static async open(dir: string): Promise<FsBlobStore> {
    const s = new FsBlobStore(dir);
    for (const d of ['blobs/sha256', 'manifests', 'meta', 'removed']) await mkdir(join(dir, d), { recursive: true });
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

  #tombstonePath(name: string, version: string): string {
    return join(this.dir, 'removed', parseName(name), `${parseVersion(version)}.json`);
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
    // Pinned from the first byte to the end: a collection never sweeps this digest meanwhile.
    const unpin = this.#guard.pin(digest);
    try {
      return await this.#putBlob(digest, final, src, expectedSize);
    } finally {
      unpin();
    }
  }

  async #putBlob(digest: Digest, final: string, src: Readable, expectedSize?: number): Promise<{ created: boolean; size: number }> {
    const verify = new VerifyingStream(expectedSize);
    const check = (): number => {
      if (expectedSize !== undefined && verify.bytes !== expectedSize) {
        throw scError('SC_ERR_SIZE_MISMATCH', `got ${verify.bytes} bytes, expected ${expectedSize}`, { expected: expectedSize, actual: verify.bytes });
      }
      const actual: Digest = `sha256:${verify.hash.digest('hex')}`;
      if (actual !== digest) throw scError('SC_ERR_DIGEST_MISMATCH', 'uploaded bytes do not match the digest', { expected: digest, actual });
      return verify.bytes;
    };

    // Under the lock, so that a sweep is either entirely before this check (and the blob is
    // young again after it) or entirely after it (and cannot sweep a pinned digest).
    const present = await this.#guard.exclusive(async () => (await exists(final)) && (await this.#touch(final)));
    if (present) {
      await pipeline(src, verify, sink());
      return { created: false, size: check() };
    }

    const tmp = this.#tmpFile(digestHex(digest));
    try {
      await pipeline(src, verify, await openWriteStream(tmp, { flags: 'wx', mode: 0o644, highWaterMark: 1 << 20 }));
      const size = check();
      await fsyncPath(tmp);
      await mkdir(dirname(final), { recursive: true });
      const created = await this.#publish(tmp, final);
      if (!created) await this.#touch(final);
      return { created, size };
    } finally {
      await rm(tmp, { force: true });
    }
  }

  /** Sets a blob's mtime to now (the grace period counts from it); false when it is gone. */
  async #touch(path: string): Promise<boolean> {
    const now = new Date();
    try {
      await utimes(path, now, now);
      return true;
    } catch (err) {
      if (isErrno(err, 'ENOENT', 'ENOTDIR')) return false;
      throw err;
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
        if (await exists(final)) created = false;
        else {
          await rename(tmp, final);
          created = true;
        }
      } else throw err;
    }
    if (created) await fsyncPath(dirname(final));
    return created;
  }

  async getManifest(name: string, version: string): Promise<Manifest> {
    const p = this.#manifestPath(name, version);
    let text: string;
    try {
      text = await readFile(p, 'utf8');
    } catch (err) {
      if (!isErrno(err, 'ENOENT', 'ENOTDIR')) throw err;
      if (await this.#tombstone(name, version)) {
        throw scError('SC_ERR_MANIFEST_NOT_FOUND', `${name}@${version} was removed`, { name, version, removed: true });
      }
      throw scError('SC_ERR_MANIFEST_NOT_FOUND', `no manifest ${name}@${version}`, { name, version });
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

  /** The tombstone of a removed name@version, or null. */
  async #tombstone(name: string, version: string): Promise<Tombstone | null> {
    try {
      return JSON.parse(await readFile(this.#tombstonePath(name, version), 'utf8')) as Tombstone;
    } catch (err) {
      if (isErrno(err, 'ENOENT', 'ENOTDIR')) return null;
      throw err;
    }
  }

  async putManifest(input: Manifest, meta: ManifestMeta = {}, opts: { requireBlob?: boolean } = {}): Promise<{ created: boolean; manifestDigest: Digest }> {
    const m = parseManifest(input);
    if (meta.fingerprint !== undefined) parseDigest(meta.fingerprint);
    return await this.#guard.exclusive(() => this.#putManifest(m, meta, opts.requireBlob === true));
  }

  /** putManifest under the lock. */
  async #putManifest(m: Manifest, meta: ManifestMeta, requireBlob: boolean): Promise<{ created: boolean; manifestDigest: Digest }> {
    const digest = manifestDigest(m);
    const gone = await this.#tombstone(m.name, m.version);
    if (gone && gone.manifestDigest !== digest) {
      throw scError('SC_ERR_VERSION_EXISTS', `${m.name}@${m.version} was removed; a removed version is never reused with other content`, {
        name: m.name,
        version: m.version,
        removed: true,
      });
    }
    if (requireBlob) await this.#checkBlob(m);
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
      else await rm(this.#metaPath(m.name, m.version), { force: true });
      this.#entries.set(`${m.name}@${m.version}`, toEntry(m));
      this.#blobOf.set(`${m.name}@${m.version}`, m.blob.digest);
      return { created: true, manifestDigest: digest };
    } finally {
      await rm(tmp, { force: true });
    }
  }

  /** SC_ERR_MISSING_BLOB / SC_ERR_SIZE_MISMATCH unless the manifest's blob is stored as stated. */
  async #checkBlob(m: Manifest): Promise<void> {
    let size: number;
    try {
      size = (await this.statBlob(m.blob.digest)).size;
    } catch (err) {
      if (isScError(err, 'SC_ERR_BLOB_NOT_FOUND')) {
        throw scError('SC_ERR_MISSING_BLOB', `upload blob ${m.blob.digest} before its manifest`, { digest: m.blob.digest });
      }
      throw err;
    }
    if (size !== m.blob.size) {
      throw scError('SC_ERR_SIZE_MISMATCH', `the manifest says ${m.blob.size} bytes but the stored blob has ${size}`, {
        expected: m.blob.size,
        actual: size,
      });
    }
  }

  async #writeMeta(name: string, version: string, meta: ManifestMeta): Promise<void> {
    await this.#writeJson(this.#metaPath(name, version), meta);
  }

  /** Writes `value` as JSON at `final` atomically and durably (shared/fs-atomic.ts), the temp file in DATA/tmp/. */
  async #writeJson(final: string, value: unknown): Promise<void> {
    await writeFileAtomic(final, JSON.stringify(value), { mkdirs: true, tempDir: this.#tmp });
  }

  async deleteManifest(name: string, version: string): Promise<RemovedManifest> {
    parseName(name);
    parseVersion(version);
    return await this.#guard.exclusive(async () => {
      const m = await this.getManifest(name, version);
      const digest = manifestDigest(m);
      const blob = { digest: m.blob.digest, size: m.blob.size };
      // The tombstone first: a crash after it leaves the version marked removed but still
      // served, and removing it again finishes the job.
      const stone: Tombstone = { manifestDigest: digest, blob, removedAt: new Date().toISOString() };
      await this.#writeJson(this.#tombstonePath(name, version), stone);
      const path = this.#manifestPath(name, version);
      await rm(path, { force: true });
      await fsyncPath(dirname(path));
      await rm(this.#metaPath(name, version), { force: true });
      this.#entries.delete(`${name}@${version}`);
      this.#blobOf.delete(`${name}@${version}`);
      return { name, version, manifestDigest: digest, blob };
    });
  }

  collectGarbage(opts: GcOptions): Promise<GcReport> {
    return collectGarbage(
      { blobsRoot: join(this.dir, 'blobs', 'sha256'), guard: this.#guard, referenced: () => this.#referenced() },
      opts,
    );
  }

  /** The blob digests every stored manifest references (a manifest that cannot be read throws). */
  async #referenced(): Promise<{ digests: Set<Digest>; manifests: number }> {
    const digests = new Set<Digest>();
    let manifests = 0;
    for (const { name, version } of await this.#manifestFiles()) {
      const key = `${name}@${version}`;
      let d = this.#blobOf.get(key);
      if (d === undefined) {
        let m: Manifest;
        try {
          m = await this.getManifest(name, version);
        } catch (err) {
          if (isScError(err, 'SC_ERR_MANIFEST_NOT_FOUND')) continue;
          throw scError('SC_ERR_INTERNAL', `cannot read manifest ${key}: refusing to collect garbage`, undefined, err);
        }
        d = m.blob.digest;
        this.#blobOf.set(key, d);
      }
      digests.add(d);
      manifests++;
    }
    return { digests, manifests };
  }

  /** Every `manifests/<name>/<version>.json` with a valid name and version. */
  async #manifestFiles(): Promise<{ name: string; version: string }[]> {
    const root = join(this.dir, 'manifests');
    const out: { name: string; version: string }[] = [];
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
        try {
          parseVersion(version);
        } catch {
          continue;
        }
        out.push({ name, version });
      }
    }
    return out;
  }

  async listBundles(): Promise<BundleEntry[]> {
    const out: BundleEntry[] = [];
    for (const { name, version } of await this.#manifestFiles()) {
      const key = `${name}@${version}`;
      let e = this.#entries.get(key);
      if (!e) {
        try {
          e = toEntry(await this.getManifest(name, version));
        } catch (err) {
          if (isScError(err, 'SC_ERR_MANIFEST_NOT_FOUND')) continue;
          throw err;
        }
        this.#entries.set(key, e);
      }
      out.push(e);
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
