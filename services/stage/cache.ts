/**
 * The stage's disk cache and its byte budget.
 *
 * Layout under the cache directory:
 * - `blobs/<hex>`: committed blobs (verified against their sha256 before the rename that put them here);
 * - `partial/<hex>`: fills in progress, kept across restarts and resumed from their length;
 * - `tmp/`: pass-through fills (blobs larger than the budget); wiped at start;
 * - `manifests/<name>/<version>.json`: cached manifests (canonical JSON).
 *
 * The budget is an lru-cache with `maxSize` and `sizeCalculation`. A filling blob reserves its
 * full size as soon as the size is known, so fills evict older blobs before they land. Eviction
 * deletes the file, unless readers hold the entry: then the unlink waits for the last `release`,
 * and those bytes stay counted (`deferredBytes`) and shrink the room left for new entries.
 *
 * `dropUnreferenced` is the other way out of the index (the reconcile pass, reconcile.ts): it
 * goes through the same removal, so a dropped blob that is being read is unlinked only at its
 * last `release`. An evicted file whose path a newer entry of the same digest has taken since
 * (the blob was filled again while an old reader held it) is left to the newer entry.
 */
import { mkdir, readdir, rename, rm, stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { LRUCache } from 'lru-cache';
import type { Digest } from '../../shared/digest.js';
import type { Logger } from '../../shared/log.js';
import type { StageMetrics } from './metrics.js';

const HEX_RE = /^[0-9a-f]{64}$/;

/** One blob in the budget. `state` is `filling` while reserved for a fill, `committed` once verified. */
export interface CacheEntry {
  readonly digest: Digest;
  readonly size: number;
  /** The file currently holding the bytes (partial path while filling, blob path once committed). */
  path: string;
  state: 'filling' | 'committed';
  /** Holders (readers, and the fill itself while filling). The file is never unlinked while > 0. */
  refs: number;
  /** True once the entry left the index (evicted or dropped); its file goes at the last release. */
  evicted: boolean;
  /** Set by `drop(e, true)`: the file outlives the entry (a partial kept for a later resume). */
  retain?: boolean;
  /**
   * Cache generation at which the entry was reserved or committed (0: found on disk at start).
   * `dropUnreferenced` leaves entries newer than the generation it is given.
   */
  gen: number;
}

/** What `BlobCache.dropUnreferenced` removed. */
export interface DropReport {
  /** Committed entries taken out of the index. */
  blobs: number;
  /** Their bytes. */
  bytes: number;
  /** Of those, entries read at that moment: their files go at their last release. */
  held: number;
}

/** What `BlobCache.open` found on disk. */
export interface OpenedCache {
  cache: BlobCache;
  /** Digests with a partial fill on disk, to be resumed. */
  partials: Digest[];
}

/** The disk layout and LRU byte budget of one stage. Not safe to share between processes. */
export class BlobCache {
  readonly dir: string;
  readonly maxBytes: number;
  #lru: LRUCache<Digest, CacheEntry>;
  #deferred = 0;
  #gen = 0;
  /** Unlinks in progress, by digest: a commit of the same digest waits for them. */
  #unlinking = new Map<Digest, Promise<void>>();
  #log: Logger;
  #metrics?: StageMetrics;

  private constructor(dir: string, maxBytes: number, log: Logger, metrics?: StageMetrics) {
    this.dir = dir;
    this.maxBytes = maxBytes;
    this.#log = log;
    this.#metrics = metrics;
    this.#lru = new LRUCache<Digest, CacheEntry>({
      maxSize: Math.max(1, maxBytes),
      sizeCalculation: (e) => Math.max(1, e.size),
      dispose: (e, _k, reason) => this.#disposed(e, reason),
    });
    metrics?.cacheMaxBytes.set(maxBytes);
  }

  /**
   * Creates the layout, wipes `tmp/`, and rebuilds the index from `blobs/` (oldest first, so
   * the LRU order survives restarts roughly; if the budget shrank, the oldest are evicted).
   * Unexpected files in `blobs/` and `partial/` are removed.
   */
  static async open(dir: string, maxBytes: number, log: Logger, metrics?: StageMetrics): Promise<OpenedCache> {
    const cache = new BlobCache(dir, maxBytes, log, metrics);
    await rm(join(dir, 'tmp'), { recursive: true, force: true });
    for (const d of ['blobs', 'partial', 'tmp', 'manifests']) await mkdir(join(dir, d), { recursive: true });
    const found: { digest: Digest; size: number; t: number }[] = [];
    for (const name of await readdir(join(dir, 'blobs'))) {
      const p = join(dir, 'blobs', name);
      if (!HEX_RE.test(name)) {
        await rm(p, { recursive: true, force: true });
        continue;
      }
      const st = await stat(p);
      found.push({ digest: `sha256:${name}`, size: st.size, t: Math.max(st.atimeMs, st.mtimeMs) });
    }
    found.sort((a, b) => a.t - b.t);
    for (const f of found) {
      const e: CacheEntry = { digest: f.digest, size: f.size, path: cache.blobPath(f.digest), state: 'committed', refs: 0, evicted: false, gen: 0 };
      if (f.size > maxBytes) {
        await unlink(e.path).catch(() => {});
        continue;
      }
      cache.#lru.set(f.digest, e);
    }
    const partials: Digest[] = [];
    for (const name of await readdir(join(dir, 'partial'))) {
      if (HEX_RE.test(name) && !cache.#lru.has(`sha256:${name}`)) partials.push(`sha256:${name}`);
      else await rm(join(dir, 'partial', name), { recursive: true, force: true });
    }
    cache.#gauges();
    log.info({ blobs: cache.#lru.size, bytes: cache.#lru.calculatedSize, partials: partials.length }, 'cache index rebuilt');
    return { cache, partials };
  }

  /** Path of a committed blob. */
  blobPath(d: Digest): string {
    return join(this.dir, 'blobs', d.slice(7));
  }

  /** Path of a partial (resumable) fill. */
  partialPath(d: Digest): string {
    return join(this.dir, 'partial', d.slice(7));
  }

  /** Path of a pass-through fill (never resumed, wiped at start). */
  tmpPath(d: Digest): string {
    return join(this.dir, 'tmp', `${d.slice(7)}.${process.pid}.${Date.now()}`);
  }

  /** The committed entry for `d` (refreshing its recency), or undefined. */
  lookup(d: Digest): CacheEntry | undefined {
    const e = this.#lru.get(d);
    return e && e.state === 'committed' ? e : undefined;
  }

  /** True when `d` is indexed (committed or reserved by a fill). */
  has(d: Digest): boolean {
    return this.#lru.has(d);
  }

  /** Takes a hold on an entry: its file is not unlinked until the matching `release`. */
  acquire(e: CacheEntry): void {
    e.refs++;
  }

  /** Drops a hold; unlinks the file when the entry was evicted and this was the last holder. */
  release(e: CacheEntry): void {
    e.refs--;
    if (e.refs === 0 && e.evicted) {
      this.#deferred -= e.size;
      this.#gauges();
      this.#unlink(e);
    }
  }

  /**
   * Reserves the budget for a fill of `size` bytes whose file is `path`. Returns null when the
   * blob is larger than the whole budget (the caller passes it through uncached). The returned
   * entry is held once for the fill; release it when the fill is done with the file.
   */
  reserve(d: Digest, size: number, path: string): CacheEntry | null {
    if (size > this.maxBytes) return null;
    const e: CacheEntry = { digest: d, size, path, state: 'filling', refs: 1, evicted: false, gen: ++this.#gen };
    this.#lru.set(d, e);
    this.#trim(d);
    this.#gauges();
    return e;
  }

  /** Moves a verified fill into `blobs/` and marks it committed (unless it was evicted meanwhile). */
  async commit(e: CacheEntry): Promise<void> {
    if (e.evicted) return;
    // An older entry of this digest may be unlinking `dest` right now: never let it take ours.
    const unlinking = this.#unlinking.get(e.digest);
    if (unlinking) {
      await unlinking;
      if (e.evicted) return;
    }
    const dest = this.blobPath(e.digest);
    await rename(e.path, dest);
    e.path = dest;
    e.state = 'committed';
    e.gen = ++this.#gen;
  }

  /**
   * The current generation: every later reservation or commit gets a higher one. Read it before
   * learning what to keep, and pass it to `dropUnreferenced`, so blobs that arrive meanwhile stay.
   */
  get generation(): number {
    return this.#gen;
  }

  /**
   * Takes every committed entry whose digest is not in `keep` and whose generation is at most
   * `upTo` out of the index. Fills in progress are never touched. A dropped entry that readers
   * hold keeps its file until the last `release` (counted in `deferredBytes` until then), so its
   * readers finish; new requests no longer find it. Never throws.
   */
  dropUnreferenced(keep: ReadonlySet<Digest>, upTo: number): DropReport {
    const out: DropReport = { blobs: 0, bytes: 0, held: 0 };
    const victims: CacheEntry[] = [];
    for (const e of this.#lru.values()) if (e.state === 'committed' && e.gen <= upTo && !keep.has(e.digest)) victims.push(e);
    for (const e of victims) {
      if (this.#lru.peek(e.digest) !== e) continue;
      out.blobs++;
      out.bytes += e.size;
      if (e.refs > 0) out.held++;
      this.#log.info({ digest: e.digest, size: e.size, readers: e.refs }, 'dropped: no longer referenced upstream');
      this.#lru.delete(e.digest);
    }
    this.#gauges();
    return out;
  }

  /**
   * Removes an entry from the index (a failed fill). Its file goes at the last release, unless
   * `keepFile` (a partial kept on disk for the next fill to continue; it is budgeted again then).
   */
  drop(e: CacheEntry, keepFile = false): void {
    e.retain = keepFile;
    if (this.#lru.peek(e.digest) === e) this.#lru.delete(e.digest);
    this.#gauges();
  }

  /** Bytes counted against the budget: indexed entries plus evicted files still held by readers. */
  get bytes(): number {
    return this.#lru.calculatedSize + this.#deferred;
  }

  /** Bytes of evicted entries waiting for their last reader. */
  get deferredBytes(): number {
    return this.#deferred;
  }

  /** Number of indexed entries. */
  get entries(): number {
    return this.#lru.size;
  }

  /** Keeps indexed + deferred bytes within the budget, never evicting `keep` (the entry just added). */
  #trim(keep: Digest): void {
    while (this.#lru.calculatedSize + this.#deferred > this.maxBytes && this.#lru.size > 1) {
      const oldest = this.#lru.rkeys().next().value;
      if (oldest === undefined || oldest === keep) break;
      this.#lru.pop();
    }
  }

  #disposed(e: CacheEntry, reason: LRUCache.DisposeReason): void {
    if (reason === 'set') return;
    e.evicted = true;
    if (reason === 'evict') {
      this.#metrics?.evictions.inc();
      this.#metrics?.evictedBytes.inc(e.size);
      this.#log.info({ digest: e.digest, size: e.size, readers: e.refs }, 'evicted');
    }
    if (e.refs === 0) this.#unlink(e);
    else this.#deferred += e.size;
    this.#gauges();
  }

  #unlink(e: CacheEntry): void {
    if (e.retain) return;
    const live = this.#lru.peek(e.digest);
    // A committed blob filled again since its eviction: the file at its path is the new entry's.
    if (e.path === this.blobPath(e.digest) && live && live !== e && live.path === e.path) return;
    const p = unlink(e.path)
      .catch((err: NodeJS.ErrnoException) => {
        if (err.code !== 'ENOENT') this.#log.warn({ err, path: e.path }, 'cannot delete evicted blob');
      })
      .finally(() => {
        if (this.#unlinking.get(e.digest) === p) this.#unlinking.delete(e.digest);
        this.#gauges();
      });
    this.#unlinking.set(e.digest, p);
  }

  #gauges(): void {
    if (!this.#metrics) return;
    this.#metrics.cacheBytes.set(this.bytes);
    this.#metrics.cacheDeferredBytes.set(this.#deferred);
    this.#metrics.cacheEntries.set(this.#lru.size);
  }
}
