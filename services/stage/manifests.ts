/**
 * Manifest caching. Manifests are immutable and signed, so the stage keeps them on disk
 * (`manifests/<name>/<version>.json`, canonical JSON) and in a small memory LRU. With trusted
 * keys configured, a manifest whose signature fails is neither cached nor served (422 with
 * SC_ERR_BAD_SIGNATURE / SC_ERR_UNTRUSTED_KEY), and cached ones are re-verified on every serve.
 * 404s are remembered for `negativeTtlMs` only. Concurrent misses share one upstream request.
 */
import { randomBytes } from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { LRUCache } from 'lru-cache';
import type { Digest } from '../../shared/digest.js';
import { isScError, scError } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import { type Manifest, canonicalJson, manifestDigest, parseManifest, verifyManifest } from '../../shared/manifest.js';
import type { Clock } from './clock.js';
import type { Upstreams } from './upstreams.js';

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
  #gone = new Map<string, number>();
  #pending = new Map<string, Promise<CachedManifest>>();

  constructor(o: ManifestCacheOptions) {
    this.#o = o;
  }

  /**
   * The manifest `name@version` (both already validated). Throws SC_ERR_MANIFEST_NOT_FOUND
   * (404), SC_ERR_BAD_SIGNATURE / SC_ERR_UNTRUSTED_KEY (422) when trusted keys reject it,
   * SC_ERR_UPSTREAM (502) for an invalid upstream answer, SC_ERR_NO_UPSTREAM (503).
   */
  async get(name: string, version: string): Promise<CachedManifest> {
    const key = `${name}/${version}`;
    let m = this.#mem.get(key) ?? (await this.#fromDisk(key));
    if (!m) {
      const until = this.#gone.get(key);
      if (until !== undefined && until > this.#o.clock.now()) throw scError('SC_ERR_MANIFEST_NOT_FOUND', `no manifest ${name}@${version}`);
      this.#gone.delete(key);
      let p = this.#pending.get(key);
      if (!p) {
        p = this.#fetch(name, version).finally(() => this.#pending.delete(key));
        this.#pending.set(key, p);
      }
      m = await p;
    }
    this.#verify(m.manifest);
    return m;
  }

  #verify(m: Manifest): void {
    if (this.#o.trusted.length > 0) verifyManifest(m, this.#o.trusted);
  }

  #path(key: string): string {
    return join(this.#o.dir, `${key}.json`);
  }

  async #fromDisk(key: string): Promise<CachedManifest | undefined> {
    let text: string;
    try {
      text = await readFile(this.#path(key), 'utf8');
    } catch {
      return undefined;
    }
    try {
      const manifest = parseManifest(JSON.parse(text));
      const m = { manifest, json: canonicalJson(manifest), digest: manifestDigest(manifest) };
      this.#mem.set(key, m);
      return m;
    } catch (err) {
      this.#o.log.warn({ key, err: (err as Error).message }, 'ignoring an unreadable cached manifest');
      return undefined;
    }
  }

  async #fetch(name: string, version: string): Promise<CachedManifest> {
    const key = `${name}/${version}`;
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
    this.#verify(manifest); // throws: never cached
    const m = { manifest, json: canonicalJson(manifest), digest: manifestDigest(manifest) };
    const path = this.#path(key);
    await mkdir(dirname(path), { recursive: true });
    const tmp = `${path}.${randomBytes(6).toString('hex')}.tmp`;
    await writeFile(tmp, m.json);
    await rename(tmp, path);
    this.#mem.set(key, m);
    return m;
  }
}
