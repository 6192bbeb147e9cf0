/**
 * Manifest caching. Manifests are immutable and signed, so the stage keeps them on disk
 * (`manifests/<name>/<version>.json`, canonical JSON) and in a small memory LRU. With trusted
 * keys configured, a manifest whose signature fails is neither cached nor served (422 with
 * SC_ERR_BAD_SIGNATURE / SC_ERR_UNTRUSTED_KEY), and cached ones are re-verified on every serve.
 * 404s are remembered for `negativeTtlMs` only. Concurrent misses share one upstream request.
 *
 * For the reconcile pass (reconcile.ts): `blobOf` tells which blob a listed bundle references,
 * from the cached copy when its digest is the listed one, else from one upstream request (which
 * caches it, when trusted); `dropUnlisted` deletes cached manifests of bundles the upstream no
 * longer lists, so the next request asks the upstream again (and gets its 404).
 */
import { randomBytes } from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import { mkdir, readFile, readdir, rename, unlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { LRUCache } from 'lru-cache';
import type { Digest } from '../../shared/digest.js';
import { isScError, scError } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import { type Manifest, canonicalJson, manifestDigest, parseManifest, verifyManifest } from '../../shared/manifest.js';
import type { Clock } from './clock.js';
import type { Upstreams } from './upstreams.js';

/** The cache key of name@version (also the file path under the cache's dir, without `.json`). */
export function manifestKey(name: string, version: string): string {
  return `${name}/${version}`;
}

/** A manifest ready to serve. */
export interface CachedManifest {
  manifest: Manifest;
  /** Canonical JSON: the response body. */
  json: string;
  /** sha256 of `json`: the ETag. */
  digest: Digest;
}

/** Dependencies of `ManifestCache`. */
export interface ManifestCacheOptions {
  dir: string;
  upstreams: Upstreams;
  trusted: KeyObject[];
  clock: Clock;
  log: Logger;
  negativeTtlMs: number;
}

/** The stage's manifest cache (disk + memory + negative + request coalescing). */
export class ManifestCache {
  #o: ManifestCacheOptions;
  #mem = new LRUCache<string, CachedManifest>({ max: 1000 });
  /** Manifests whose signature passed (the trusted keys are fixed for the process's life): checked once, not per request. */
  #verified = new WeakSet<Manifest>();
  #gone = new Map<string, number>();
  #pending = new Map<string, Promise<CachedManifest>>();
  #gen = 0;
  /** Generation at which this process stored each key (absent: found on disk). */
  #storedGen = new Map<string, number>();

  constructor(o: ManifestCacheOptions) {
    this.#o = o;
  }

  /**
   * The manifest `name@version` (both already validated). Throws SC_ERR_MANIFEST_NOT_FOUND
   * (404), SC_ERR_BAD_SIGNATURE / SC_ERR_UNTRUSTED_KEY (422) when trusted keys reject it,
   * SC_ERR_UPSTREAM (502) for an invalid upstream answer, SC_ERR_NO_UPSTREAM (503).
   */
  async get(name: string, version: string): Promise<CachedManifest> {
    const key = manifestKey(name, version);
    let m = this.#mem.get(key) ?? (await this.#fromDisk(key));
    if (!m) {
      const until = this.#gone.get(key);
      if (until !== undefined && until > this.#o.clock.now()) throw scError('SC_ERR_MANIFEST_NOT_FOUND', `no manifest ${name}@${version}`);
      this.#gone.delete(key);
      m = await this.#upstream(name, version);
    }
    this.#verify(m.manifest);
    return m;
  }

  /**
   * The blob digest the manifest `name@version` references, given the manifest digest the
   * upstream's listing names for it: from the cached copy when it has that digest, else from
   * the upstream (ignoring the negative cache; the listing is newer news). Signatures are not
   * checked (what a bundle references does not depend on whom the stage trusts). Throws
   * SC_ERR_MANIFEST_NOT_FOUND when the upstream answers 404, SC_ERR_UPSTREAM when it serves
   * another digest than it lists or an invalid manifest, SC_ERR_NO_UPSTREAM when none answers.
   */
  async blobOf(name: string, version: string, listed: Digest): Promise<Digest> {
    const key = manifestKey(name, version);
    const have = this.#mem.peek(key) ?? (await this.#fromDisk(key, false));
    if (have?.digest === listed) return have.manifest.blob.digest;
    const m = await this.#upstream(name, version);
    if (m.digest !== listed) throw scError('SC_ERR_UPSTREAM', `upstream lists ${name}@${version} as ${listed} but serves ${m.digest}`);
    return m.manifest.blob.digest;
  }

  /**
   * Read this before asking the upstream what to keep, and pass it to `dropUnlisted`: manifests
   * this process stores afterwards are kept.
   */
  get generation(): number {
    return this.#gen;
  }

  /**
   * Deletes every cached manifest (disk and memory) whose key (`manifestKey`) is not in
   * `listed`, except those stored after generation `upTo`. Returns how many were deleted.
   */
  async dropUnlisted(listed: ReadonlySet<string>, upTo: number): Promise<number> {
    const keys = new Set(this.#mem.keys());
    for (const name of await readdir(this.#o.dir).catch(() => [] as string[])) {
      const files = await readdir(join(this.#o.dir, name)).catch(() => [] as string[]);
      for (const f of files) if (f.endsWith('.json')) keys.add(manifestKey(name, f.slice(0, -'.json'.length)));
    }
    let dropped = 0;
    for (const key of keys) {
      if (listed.has(key) || (this.#storedGen.get(key) ?? 0) > upTo) continue;
      const inMem = this.#mem.delete(key);
      this.#storedGen.delete(key);
      const onDisk = await unlink(this.#path(key)).then(
        () => true,
        (err: NodeJS.ErrnoException) => {
          if (err.code !== 'ENOENT') this.#o.log.warn({ key, err: err.message }, 'cannot delete a cached manifest');
          return false;
        },
      );
      if (inMem || onDisk) {
        dropped++;
        this.#o.log.info({ manifest: key }, 'dropped: no longer listed upstream');
      }
    }
    return dropped;
  }

  /** One upstream request for name@version, shared by concurrent callers. */
  #upstream(name: string, version: string): Promise<CachedManifest> {
    const key = manifestKey(name, version);
    let p = this.#pending.get(key);
    if (!p) {
      p = this.#fetch(name, version).finally(() => this.#pending.delete(key));
      this.#pending.set(key, p);
    }
    return p;
  }

  #verify(m: Manifest): void {
    if (this.#o.trusted.length === 0 || this.#verified.has(m)) return;
    verifyManifest(m, this.#o.trusted);
    this.#verified.add(m);
  }

  #path(key: string): string {
    return join(this.#o.dir, `${key}.json`);
  }

  async #fromDisk(key: string, remember = true): Promise<CachedManifest | undefined> {
    let text: string;
    try {
      text = await readFile(this.#path(key), 'utf8');
    } catch {
      return undefined;
    }
    try {
      const manifest = parseManifest(JSON.parse(text));
      const m = { manifest, json: canonicalJson(manifest), digest: manifestDigest(manifest) };
      if (remember) this.#mem.set(key, m);
      return m;
    } catch (err) {
      this.#o.log.warn({ key, err: (err as Error).message }, 'ignoring an unreadable cached manifest');
      return undefined;
    }
  }

  /**
   * Fetches, parses and checks name@version; caches it only when it passes the trusted keys
   * (`get` verifies again and refuses it otherwise; `blobOf` only needs its blob digest).
   */
  async #fetch(name: string, version: string): Promise<CachedManifest> {
    const key = manifestKey(name, version);
    const r = await this.#o.upstreams.getSmall(`/v1/bundles/${name}/${version}`, 'manifest');
    if (r.status === 404) {
      this.#gone.set(key, this.#o.clock.now() + this.#o.negativeTtlMs);
      throw scError('SC_ERR_MANIFEST_NOT_FOUND', `no manifest ${name}@${version}`);
    }
    if (r.status !== 200) throw scError('SC_ERR_UPSTREAM', `upstream answered HTTP ${r.status} for ${name}@${version}`);
    let manifest: Manifest;
    try {
      manifest = parseManifest(JSON.parse(r.body.toString('utf8')));
    } catch (err) {
      throw scError('SC_ERR_UPSTREAM', `upstream sent an invalid manifest for ${name}@${version}`, {
        reason: isScError(err) ? err.details : (err as Error).message,
      });
    }
    if (manifest.name !== name || manifest.version !== version) {
      throw scError('SC_ERR_UPSTREAM', `upstream sent ${manifest.name}@${manifest.version} for ${name}@${version}`);
    }
    const m = { manifest, json: canonicalJson(manifest), digest: manifestDigest(manifest) };
    try {
      this.#verify(manifest);
    } catch {
      return m; // never cached; `get` throws the same error
    }
    const path = this.#path(key);
    await mkdir(dirname(path), { recursive: true });
    const tmp = `${path}.${randomBytes(6).toString('hex')}.tmp`;
    await writeFile(tmp, m.json);
    await rename(tmp, path);
    this.#mem.set(key, m);
    this.#storedGen.set(key, ++this.#gen);
    return m;
  }
}
