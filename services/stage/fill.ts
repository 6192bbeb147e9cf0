/**
 * Fetch-once. A `Fill` is the single upstream fetch of one blob into a file on disk; every
 * request for that blob while it runs joins it. Its outcome is one of:
 * - `filling`: running (size known once the first upstream response arrived);
 * - `committed`: sha256 verified; the file was renamed into the cache (or, for a pass-through,
 *   kept only until its last reader is done);
 * - `failed`: digest mismatch (file deleted, readers aborted), no upstream could deliver, or a
 *   pass-through over `maxPassthroughBytes` (refused before any byte of it is fetched);
 * - `gone`: an upstream answered 404; remembered for `negativeTtlMs`.
 *
 * Readers never see a buffer of the object: they read the file at offsets (`streamFill`) and
 * wait on a progress signal between spans. The last byte of every response served from a fill
 * is held back until the fill is verified, so no client ever completes a 200/206 with bytes that
 * fail sha256: on a mismatch the response is destroyed mid-body.
 *
 * This file owns the fetch-once table (FetchOnce) and the run of one fill; the Fill object is
 * in fill-state.ts and streaming to clients in fill-stream.ts, both re-exported here.
 */
import { createHash, type Hash } from 'node:crypto';
import { type FileHandle, open, rename, unlink } from 'node:fs/promises';
import type { Digest } from '../../shared/digest.js';
import { type ScError, scError, toScError } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import type { BlobCache } from './cache.js';
import type { Clock } from './clock.js';
import { Fill, type FillInfo, type FillState } from './fill-state.js';
import type { StageMetrics } from './metrics.js';
import type { FetchSink, Upstreams } from './upstreams.js';

export { Fill, type FillInfo, type FillState } from './fill-state.js';
export { streamFill } from './fill-stream.js';

/** Dependencies of `FetchOnce`. */
export interface FetchOnceOptions {
  cache: BlobCache;
  upstreams: Upstreams;
  clock: Clock;
  log: Logger;
  metrics: StageMetrics;
  negativeTtlMs: number;
  /** Finished fills kept for `list()`. */
  history: number;
  /**
   * Largest blob passed through (over the whole budget); a larger one fails its fill with
   * SC_ERR_PASSTHROUGH_TOO_LARGE as soon as the size is known, before its body is read.
   */
  maxPassthroughBytes: number;
}

/**
 * The fetch-once table: at most one fill per digest, plus a short memory of 404s. All methods
 * are synchronous where it matters, so "is it cached / filling / start it" is atomic.
 */
export class FetchOnce {
  #opts: FetchOnceOptions;
  #inFlight = new Map<Digest, Fill>();
  #gone = new Map<Digest, number>();
  #recent: Fill[] = [];
  #abort = new AbortController();
  #running = new Set<Promise<void>>();

  constructor(o: FetchOnceOptions) {
    this.#opts = o;
  }

  /** The fill in flight for `d`, if any. */
  inFlight(d: Digest): Fill | undefined {
    return this.#inFlight.get(d);
  }

  /** True while a 404 for `d` is remembered (negative cache). */
  isGone(d: Digest): boolean {
    const until = this.#gone.get(d);
    if (until === undefined) return false;
    if (until > this.#opts.clock.now()) return true;
    this.#gone.delete(d);
    return false;
  }

  /**
   * Returns the fill in flight for `d`, starting one if none runs (`joined` tells which). The
   * fill is returned held for the caller, who must call `fill.release()` when done with it.
   */
  join(d: Digest): { fill: Fill; joined: boolean } {
    let f = this.#inFlight.get(d);
    const joined = f !== undefined;
    f ??= this.#start(d);
    f.acquire();
    return { fill: f, joined };
  }

  /** Starts a fill for `d` unless one runs (prefetch); does not hold it. */
  ensure(d: Digest): Fill {
    return this.#inFlight.get(d) ?? this.#start(d);
  }

  /** Resumes a partial fill found on disk at start (hashing what is there first). */
  resume(d: Digest): Fill {
    return this.#inFlight.get(d) ?? this.#start(d);
  }

  /** Every fill in flight, then recently finished ones (newest first). */
  list(): FillInfo[] {
    return [...this.#inFlight.values(), ...[...this.#recent].reverse()].map((f) => f.info());
  }

  /** Number of fills in flight. */
  get size(): number {
    return this.#inFlight.size;
  }

  /** Stops every fill (partial files stay on disk for the next start) and waits for them to settle. */
  async close(): Promise<void> {
    this.#abort.abort();
    await Promise.allSettled([...this.#running]);
  }

  #start(d: Digest): Fill {
    const { cache, clock, metrics } = this.#opts;
    const fill = new Fill(d, cache.partialPath(d), clock.now());
    this.#inFlight.set(d, fill);
    metrics.fillsInFlight.set(this.#inFlight.size);
    const p = this.#run(fill).finally(() => this.#running.delete(p));
    this.#running.add(p);
    return fill;
  }

  async #run(fill: Fill): Promise<void> {
    const { cache, clock, log, metrics, upstreams } = this.#opts;
    const d = fill.digest;
    const hashRef: { h: Hash } = { h: createHash('sha256') };
    let keepFile = false;
    fill.onClosed = async () => {
      if (fill.entry) cache.release(fill.entry);
      else if (!keepFile || fill.passThrough) await unlink(fill.path).catch(() => {});
    };
    try {
      // A partial left by an earlier run or an earlier failed fill is continued, never thrown away.
      const fh = await open(fill.path, 'r+').catch((err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT') return open(fill.path, 'w+');
        throw err;
      });
      fill.setFile(fh);
      fill.filled = await hashFile(fh, hashRef.h);
      if (fill.filled > 0) log.info({ digest: d, bytes: fill.filled }, 'continuing a partial fill');
      if (fill.filled > 0 && `sha256:${hashRef.h.copy().digest('hex')}` === d) {
        // The partial was complete (the stage stopped between the last write and the rename).
        await this.#setSize(fill, fill.filled, hashRef);
        fill.sized();
      }
      keepFile = true;
      if (fill.size === null || fill.filled < fill.size) {
        const sink: FetchSink = {
          offset: () => fill.filled,
          onSize: async (size, upstream) => {
            if (!fill.sources.includes(upstream)) fill.sources.push(upstream);
            if (fill.size === null) {
              await this.#setSize(fill, size, hashRef);
              log.info({ digest: d, size, upstream, from: fill.filled, passThrough: fill.passThrough }, 'fill started');
              fill.sized();
            }
          },
          write: async (chunk) => {
            const f = fill.file;
            if (!f) throw scError('SC_ERR_INTERNAL', 'fill file closed');
            let off = 0;
            while (off < chunk.length) {
              const { bytesWritten } = await f.write(chunk, off, chunk.length - off, fill.filled + off);
              off += bytesWritten;
            }
            hashRef.h.update(chunk);
            fill.remember(fill.filled, chunk);
            fill.filled += chunk.length;
            fill.progress();
          },
          reset: async () => {
            fill.forget();
            await fill.file?.truncate(0);
            hashRef.h = createHash('sha256');
            fill.filled = 0;
          },
          onResume: (upstream, offset, reason) => {
            fill.resumes++;
            metrics.resumes.inc();
            log.info({ digest: d, upstream, offset, reason }, 'resuming fill');
          },
        };
        const r = await upstreams.fetchInto(d, sink, this.#abort.signal);
        fill.sources = r.sources;
      }
      const actual = `sha256:${hashRef.h.digest('hex')}`;
      if (actual !== d) {
        metrics.digestFailures.inc();
        throw scError('SC_ERR_DIGEST_MISMATCH', `fill of ${d} does not match its digest`, { actual });
      }
      // Verified: readers may finish now; durability (datasync + rename) follows.
      fill.verified = true;
      fill.forget();
      fill.progress(true);
      await fill.file?.datasync();
      if (fill.entry) await cache.commit(fill.entry);
      // Committed: from here on lookups find the cache entry, and the in-flight slot is freed in the same tick.
      this.#end(fill, 'committed');
      metrics.fillsCommitted.inc();
      log.info({ digest: d, size: fill.size, resumes: fill.resumes, sources: fill.sources, passThrough: fill.passThrough }, 'fill committed');
    } catch (err) {
      const e = toScError(err);
      if (e.code === 'SC_ERR_BLOB_NOT_FOUND') {
        this.#gone.set(d, clock.now() + this.#opts.negativeTtlMs);
        keepFile = false;
        this.#end(fill, 'gone', e);
        log.info({ digest: d }, 'blob not found upstream');
      } else {
        // Keep a partial across a shutdown or an upstream outage (the next fill continues it);
        // bad content (digest or size mismatch) and local errors start over.
        keepFile =
          !fill.verified && !fill.passThrough && ['SC_ERR_UNAVAILABLE', 'SC_ERR_NO_UPSTREAM', 'SC_ERR_UPSTREAM', 'SC_ERR_TIMEOUT'].includes(e.code);
        if (fill.entry && !this.#abort.signal.aborted) cache.drop(fill.entry, keepFile);
        if (!keepFile && !fill.entry) await unlink(fill.path).catch(() => {});
        if (!this.#abort.signal.aborted) metrics.fillsFailed.inc();
        this.#end(fill, 'failed', e);
        log.warn({ digest: d, code: e.code, msg: e.message, bytes: fill.filled }, 'fill failed');
      }
    } finally {
      fill.release();
    }
  }

  /**
   * Learns the size: reserves the budget, or switches to pass-through when over the whole budget.
   * Throws SC_ERR_PASSTHROUGH_TOO_LARGE when a pass-through would be over maxPassthroughBytes.
   */
  async #setSize(fill: Fill, size: number, hashRef: { h: Hash }): Promise<void> {
    const { cache, metrics } = this.#opts;
    if (fill.filled > size) {
      await fill.file?.truncate(0);
      hashRef.h = createHash('sha256');
      fill.filled = 0;
    }
    fill.size = size;
    fill.entry = cache.reserve(fill.digest, size, fill.path);
    if (!fill.entry && size > this.#opts.maxPassthroughBytes) {
      throw scError(
        'SC_ERR_PASSTHROUGH_TOO_LARGE',
        `blob ${fill.digest} of ${size} bytes is over the cache budget and over maxPassthroughBytes (${this.#opts.maxPassthroughBytes})`,
        { size, max: this.#opts.maxPassthroughBytes },
      );
    }
    if (!fill.entry) {
      const tmp = cache.tmpPath(fill.digest);
      await rename(fill.path, tmp);
      fill.path = tmp;
      fill.passThrough = true;
      metrics.passThroughs.inc();
    }
  }

  #end(fill: Fill, state: Exclude<FillState, 'filling'>, error?: ScError): void {
    const { clock, metrics, history } = this.#opts;
    if (this.#inFlight.get(fill.digest) === fill) this.#inFlight.delete(fill.digest);
    metrics.fillsInFlight.set(this.#inFlight.size);
    fill.finish(state, clock.now(), error);
    if (history > 0) {
      this.#recent.push(fill);
      if (this.#recent.length > history) this.#recent.shift();
    }
  }
}

/** Hashes a file from its start; returns its length. */
async function hashFile(fh: FileHandle, h: Hash): Promise<number> {
  const buf = Buffer.allocUnsafe(1 << 20);
  let pos = 0;
  for (;;) {
    const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
    if (bytesRead === 0) return pos;
    h.update(buf.subarray(0, bytesRead));
    pos += bytesRead;
  }
}
