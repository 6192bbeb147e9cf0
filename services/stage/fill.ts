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
 */
import { createHash, type Hash } from 'node:crypto';
import { type FileHandle, open, rename, unlink } from 'node:fs/promises';
import type { ServerResponse } from 'node:http';
import type { Digest } from '../../shared/digest.js';
import { type ScError, scError, toScError } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import type { BlobCache, CacheEntry } from './cache.js';
import type { Clock } from './clock.js';
import type { StageMetrics } from './metrics.js';
import type { FetchSink, Upstreams } from './upstreams.js';

/** The named outcomes of a fill. */
export type FillState = 'filling' | 'committed' | 'failed' | 'gone';

/** What GET /v1/fills shows for one fill. Times are ISO 8601. */
export interface FillInfo {
  digest: Digest;
  state: FillState;
  bytes: number;
  size: number | null;
  source: string | null;
  sources: string[];
  resumes: number;
  passThrough: boolean;
  startedAt: string;
  finishedAt: string | null;
  error?: { code: string; message: string };
}

/** Reader chunk for file reads: large enough for throughput, small enough that 500 readers stay cheap. */
const READ_CHUNK = 128 * 1024;
/**
 * The most recent bytes of a fill stay referenced in memory (the upstream's own chunks, no
 * copy), so readers following the edge of a fill share them instead of each reading the file.
 * Bounded per fill, independent of object size and client count.
 */
const RING_BYTES = 2 * 1024 * 1024;
/** Progress is signalled at once after this many new bytes, else within NOTIFY_MS. */
const NOTIFY_BYTES = 1024 * 1024;
const NOTIFY_MS = 10;

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

/** One running (or finished) fetch of one blob. Created only by `FetchOnce`. */
export class Fill {
  readonly digest: Digest;
  state: FillState = 'filling';
  /** Blob size in bytes, once an upstream told it. */
  size: number | null = null;
  /** Bytes written to the file, from offset 0. Always a prefix of what the upstream sent. */
  filled = 0;
  sources: string[] = [];
  resumes = 0;
  passThrough = false;
  error?: ScError;
  readonly startedAt: number;
  finishedAt: number | null = null;

  #fh: FileHandle | null = null;
  #fhReady = deferred();
  #path: string;
  #holders = 1; // the fill itself
  #change = deferred();
  #sized = deferred();
  #done = deferred();
  #notified = 0;
  #notifyTimer: NodeJS.Timeout | null = null;
  /** The budget entry while the blob is (to be) cached. */
  entry: CacheEntry | null = null;

  constructor(digest: Digest, path: string, now: number) {
    this.digest = digest;
    this.#path = path;
    this.startedAt = now;
  }

  /** True once the sha256 matched (readers may send their held-back final byte). */
  verified = false;
  #ring: { pos: number; buf: Buffer }[] = [];
  #ringBytes = 0;

  /** @internal Records a chunk just written at `pos` in the in-memory tail. */
  remember(pos: number, buf: Buffer): void {
    this.#ring.push({ pos, buf });
    this.#ringBytes += buf.length;
    while (this.#ring.length > 1 && this.#ringBytes - this.#ring[0].buf.length >= RING_BYTES) {
      this.#ringBytes -= this.#ring.shift()!.buf.length;
    }
  }

  /** @internal Drops the in-memory tail. */
  forget(): void {
    this.#ring = [];
    this.#ringBytes = 0;
  }

  /** Up to `n` bytes at `pos` from the in-memory tail (no copy), or null when not there. */
  fromTail(pos: number, n: number): Buffer | null {
    const r = this.#ring;
    if (r.length === 0 || pos < r[0].pos) return null;
    for (let i = r.length - 1; i >= 0; i--) {
      const c = r[i];
      if (pos >= c.pos) {
        const off = pos - c.pos;
        if (off >= c.buf.length) return null;
        return c.buf.subarray(off, off + Math.min(n, c.buf.length - off));
      }
    }
    return null;
  }

  /** Resolves when the size is known or the fill ended (check `state`). Never rejects. */
  ready(): Promise<void> {
    return this.#sized.promise;
  }

  /** Resolves when the fill reaches an outcome. Never rejects. */
  done(): Promise<void> {
    return this.#done.promise;
  }

  /** Resolves at the next progress or state change. */
  changed(): Promise<void> {
    return this.#change.promise;
  }

  /** Takes a hold on the fill's file handle (for reading); pair with `release`. */
  acquire(): void {
    this.#holders++;
  }

  /** Drops a hold; the file handle closes (and a pass-through file is deleted) at the last one. */
  release(): void {
    if (--this.#holders === 0) void this.#closeFile();
  }

  /** Reads up to `n` bytes at `pos` into `buf`; only valid for bytes below `filled`. */
  async read(buf: Buffer, n: number, pos: number): Promise<number> {
    const fh = this.#fh ?? (await this.#waitFile());
    const { bytesRead } = await fh.read(buf, 0, n, pos);
    return bytesRead;
  }

  /** A snapshot for GET /v1/fills. */
  info(): FillInfo {
    return {
      digest: this.digest,
      state: this.state,
      bytes: this.filled,
      size: this.size,
      source: this.sources.at(-1) ?? null,
      sources: [...this.sources],
      resumes: this.resumes,
      passThrough: this.passThrough,
      startedAt: new Date(this.startedAt).toISOString(),
      finishedAt: this.finishedAt === null ? null : new Date(this.finishedAt).toISOString(),
      ...(this.error ? { error: { code: this.error.code, message: this.error.message } } : {}),
    };
  }

  // ---- used by FetchOnce ----

  /** @internal */ get path(): string {
    return this.#path;
  }
  /** @internal */ set path(p: string) {
    this.#path = p;
  }
  /** @internal */ setFile(fh: FileHandle): void {
    this.#fh = fh;
    this.#fhReady.resolve();
  }
  /** @internal */ get file(): FileHandle | null {
    return this.#fh;
  }
  /** @internal */ sized(): void {
    this.#sized.resolve();
  }

  /** @internal Signals progress; immediate for big steps, else coalesced within NOTIFY_MS. */
  progress(force = false): void {
    if (force || this.filled - this.#notified >= NOTIFY_BYTES) {
      this.#fire();
      return;
    }
    if (!this.#notifyTimer) {
      this.#notifyTimer = setTimeout(() => this.#fire(), NOTIFY_MS);
    }
  }

  /** @internal Ends the fill with an outcome. */
  finish(state: Exclude<FillState, 'filling'>, now: number, error?: ScError): void {
    this.state = state;
    this.forget();
    this.error = error;
    this.finishedAt = now;
    this.#sized.resolve();
    this.#fire();
    this.#done.resolve();
    this.#fhReady.resolve();
  }

  #fire(): void {
    if (this.#notifyTimer) {
      clearTimeout(this.#notifyTimer);
      this.#notifyTimer = null;
    }
    this.#notified = this.filled;
    const d = this.#change;
    this.#change = deferred();
    d.resolve();
  }

  async #waitFile(): Promise<FileHandle> {
    await this.#fhReady.promise;
    if (!this.#fh) throw scError('SC_ERR_INTERNAL', 'fill has no file');
    return this.#fh;
  }

  /** @internal Hook run when the last holder is gone (set by FetchOnce). */
  onClosed: () => Promise<void> = async () => {};

  async #closeFile(): Promise<void> {
    const fh = this.#fh;
    this.#fh = null;
    await fh?.close().catch(() => {});
    await this.onClosed();
  }
}

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
  #o: FetchOnceOptions;
  #inFlight = new Map<Digest, Fill>();
  #gone = new Map<Digest, number>();
  #recent: Fill[] = [];
  #abort = new AbortController();
  #running = new Set<Promise<void>>();

  constructor(o: FetchOnceOptions) {
    this.#o = o;
  }

  /** The fill in flight for `d`, if any. */
  inFlight(d: Digest): Fill | undefined {
    return this.#inFlight.get(d);
  }

  /** True while a 404 for `d` is remembered (negative cache). */
  isGone(d: Digest): boolean {
    const until = this.#gone.get(d);
    if (until === undefined) return false;
    if (until > this.#o.clock.now()) return true;
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
    const { cache, clock, metrics } = this.#o;
    const fill = new Fill(d, cache.partialPath(d), clock.now());
    this.#inFlight.set(d, fill);
    metrics.fillsInFlight.set(this.#inFlight.size);
    const p = this.#run(fill).finally(() => this.#running.delete(p));
    this.#running.add(p);
    return fill;
  }

  async #run(fill: Fill): Promise<void> {
    const { cache, clock, log, metrics, upstreams } = this.#o;
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
        this.#gone.set(d, clock.now() + this.#o.negativeTtlMs);
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
    const { cache, metrics } = this.#o;
    if (fill.filled > size) {
      await fill.file?.truncate(0);
      hashRef.h = createHash('sha256');
      fill.filled = 0;
    }
    fill.size = size;
    fill.entry = cache.reserve(fill.digest, size, fill.path);
    if (!fill.entry && size > this.#o.maxPassthroughBytes) {
      throw scError(
        'SC_ERR_PASSTHROUGH_TOO_LARGE',
        `blob ${fill.digest} of ${size} bytes is over the cache budget and over maxPassthroughBytes (${this.#o.maxPassthroughBytes})`,
        { size, max: this.#o.maxPassthroughBytes },
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
    const { clock, metrics, history } = this.#o;
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

/** Resolves when `p` settles (or `event` fires) or `res` closes, leaving no listener behind. */
function untilOrClosed(p: Promise<void> | null, res: ServerResponse, event?: 'drain'): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      res.off('close', done);
      if (event) res.off(event, done);
      resolve();
    };
    res.once('close', done);
    if (event) res.once(event, done);
    void p?.then(done);
  });
}

/**
 * Streams bytes [start, end] (inclusive) of a fill to `res`, following the file as it grows.
 * Byte `end` is sent only after the fill is verified. If the fill fails, `res` is destroyed
 * mid-body. The caller must hold the fill (from `FetchOnce.join`). Calls `onBytes` for every
 * chunk written. Resolves when done or when the client left.
 */
export async function streamFill(fill: Fill, res: ServerResponse, start: number, end: number, onBytes: (n: number) => void): Promise<void> {
  let pos = start;
  let own: Buffer | undefined;
  while (pos <= end) {
    if (res.destroyed || res.writableEnded) return;
    if (fill.state === 'failed' || fill.state === 'gone') {
      res.destroy();
      return;
    }
    const avail = fill.verified ? end + 1 : Math.min(fill.filled, end);
    if (avail <= pos) {
      await untilOrClosed(fill.changed(), res);
      continue;
    }
    const n = Math.min(avail - pos, READ_CHUNK);
    const shared = fill.fromTail(pos, n);
    if (shared) {
      // the upstream's own chunk, shared by every reader at the edge: no copy, no read
      if (res.destroyed) return;
      const ok = res.write(shared);
      pos += shared.length;
      onBytes(shared.length);
      if (!ok) await untilOrClosed(null, res, 'drain');
      continue;
    }
    // behind the edge: read the file into this reader's one buffer, reused once the socket took it
    own ??= Buffer.allocUnsafe(READ_CHUNK);
    const got = await fill.read(own, n, pos);
    if (got <= 0) throw scError('SC_ERR_INTERNAL', `short read at ${pos} of a fill`);
    if (res.destroyed) return;
    const flushed = new Promise<void>((r) => {
      res.write(got === own!.length ? own! : own!.subarray(0, got), () => r());
    });
    pos += got;
    onBytes(got);
    await untilOrClosed(flushed, res);
  }
  res.end();
}
