/**
 * The ordered upstream list (origin or parent stages) with backoff and failover, and the resume
 * loop that drives one blob fetch to completion. The upstreams' health (what the stage's
 * /healthz reports, and the degraded state) is upstream-health.ts, fed by every request here.
 *
 * Policy for a blob fetch (`fetchInto`):
 * - upstreams are tried in configured order, those recently marked down last;
 * - a broken, stalled (no byte for `idleTimeoutMs`) or failed attempt is retried on the same
 *   upstream after a backoff (`backoffMs`, doubling up to `maxBackoffMs`), `retriesPerUpstream`
 *   times, then the next upstream is used (and the failed one is marked down for `upstreamDownMs`);
 * - every retry asks only for the missing bytes (`Range: bytes=<have>-`);
 * - a 404 on a fresh fetch is authoritative (the blob is gone); a fetch fails after
 *   `maxAttempts` consecutive attempts that brought no new byte.
 * got is used with `retry: {limit: 0}`: this loop is the only retry logic.
 *
 * Health (`health()`, `degraded`): see upstream-health.ts. While degraded, new fetches (blobs,
 * manifests, listings) fail at once with SC_ERR_NO_UPSTREAM.
 */
import { Agent as HttpAgent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';
import got, { type Response } from 'got';
import type { Digest } from '../../shared/digest.js';
import { isScError, scError, toScError } from '../../shared/errors.js';
import { sleep } from './clock.js';
import { gotTls, nodeTls } from '../../shared/tls.js';
import { type TrackedAttempt, type UpstreamHealth, UpstreamHealthTracker, type UpstreamHealthOptions, failureCode } from './upstream-health.js';

export { UPSTREAM_HEALTH_DEFAULTS, type UpstreamHealth, type UpstreamHealthOptions } from './upstream-health.js';

/** Where fetched bytes go. Errors thrown by the sink end the fetch at once (they are not retried). */
export interface FetchSink {
  /** Bytes already held: the next attempt starts here. */
  offset(): number;
  /** Called with the blob size from each response (Content-Length or Content-Range total). May throw. */
  onSize(size: number, upstream: string): void | Promise<void>;
  /** Appends a chunk at `offset()`; resolves once written (backpressure). */
  write(chunk: Buffer): Promise<void>;
  /** Forget everything held (an upstream refused our resume point and the size is unknown). */
  reset(): Promise<void>;
  /** Called before each retry attempt after a failure. */
  onResume(upstream: string, offset: number, reason: string): void;
}

/** Options for the upstream list (health options included); durations in milliseconds. */
export interface UpstreamOptions extends UpstreamHealthOptions {
  idleTimeoutMs: number;
  backoffMs: number;
  maxBackoffMs: number;
  retriesPerUpstream: number;
  maxAttempts: number;
  upstreamDownMs: number;
}

/** A small (JSON) upstream answer. */
export interface SmallResponse {
  upstream: string;
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

class SinkFailure extends Error {
  constructor(readonly inner: unknown) {
    super('sink failed');
  }
}

const RANGE_RE = /^bytes (\d+)-(\d+)\/(\d+)$/;
const SMALL_LIMIT = 1024 * 1024;

/** The ordered upstreams of one stage. Thread-safe in the Node sense: many fetches may run at once. */
export class Upstreams {
  readonly urls: readonly string[];
  #downUntil = new Map<string, number>();
  #o: UpstreamOptions;
  #agents = { http: new HttpAgent({ keepAlive: true, maxSockets: 256 }), https: new HttpsAgent({ keepAlive: true, maxSockets: 256, ...nodeTls() }) };
  #health: UpstreamHealthTracker;

  /** Starts the background health checks at once (unless `checkIntervalMs` is 0); `close()` stops them. */
  constructor(urls: readonly string[], o: UpstreamOptions) {
    if (urls.length === 0) throw scError('SC_ERR_BAD_CONFIG', 'at least one upstream is required');
    this.urls = urls;
    this.#o = o;
    this.#health = new UpstreamHealthTracker(urls, o, (url, path, signal, timeoutMs) => this.#getSmallFrom(url, path, signal, timeoutMs));
  }

  /** True while no upstream answers (every one failed `downAfter` times in a row); never without background checks. */
  get degraded(): boolean {
    return this.#health.degraded;
  }

  /** Every upstream's health, in configured order. */
  health(): UpstreamHealth[] {
    return this.#health.health();
  }

  /**
   * Checks one upstream now: GET /healthz within `checkTimeoutMs`. Up when it answers 2xx with
   * `ok: true`; anything else counts as one failure. Never throws.
   */
  check(url: string): Promise<boolean> {
    return this.#health.check(url);
  }

  /** Upstreams in the order to try now: configured order, the ones marked down last. */
  order(): string[] {
    const now = this.#o.clock.now();
    const up = this.urls.filter((u) => (this.#downUntil.get(u) ?? 0) <= now);
    return [...up, ...this.urls.filter((u) => !up.includes(u))];
  }

  /** Marks an upstream down for `upstreamDownMs` (it is still tried, after the others). */
  markDown(url: string): void {
    this.#downUntil.set(url, this.#o.clock.now() + this.#o.upstreamDownMs);
  }

  /** Clears a down mark. */
  markUp(url: string): void {
    this.#downUntil.delete(url);
  }

  /** Stops the background checks and closes pooled connections. */
  close(): void {
    this.#health.close();
    this.#agents.http.destroy();
    this.#agents.https.destroy();
  }

  /**
   * Fetches blob `digest` into `sink`, resuming from `sink.offset()` after every break, until
   * `offset() === size`. Returns the upstreams that contributed bytes, in order. Throws
   * SC_ERR_BLOB_NOT_FOUND when an upstream answers 404 to a fresh fetch, SC_ERR_NO_UPSTREAM when
   * `maxAttempts` attempts in a row brought nothing or as soon as the stage is degraded (at the
   * start, or after a failed attempt), a sink's own error as is, and SC_ERR_UNAVAILABLE when
   * `signal` aborts.
   */
  async fetchInto(digest: Digest, sink: FetchSink, signal: AbortSignal): Promise<{ size: number; sources: string[] }> {
    const o = this.#o;
    if (this.#health.degraded) this.#health.noUpstream(`cannot fetch ${digest}`);
    const sources: string[] = [];
    let url = this.order()[0];
    let triesHere = 0;
    let noProgress = 0;
    let size: number | null = null;
    for (;;) {
      if (signal.aborted) throw scError('SC_ERR_UNAVAILABLE', 'stage is closing');
      const before = sink.offset();
      try {
        size = await this.#attempt(url, digest, sink, signal, size);
        if (sink.offset() > before && !sources.includes(url)) sources.push(url);
        if (sink.offset() === size) {
          this.markUp(url);
          return { size, sources };
        }
        throw scError('SC_ERR_UPSTREAM', 'upstream response ended early', { have: sink.offset(), size });
      } catch (err) {
        if (err instanceof SinkFailure) throw err.inner;
        if (signal.aborted) throw scError('SC_ERR_UNAVAILABLE', 'stage is closing');
        const progressed = sink.offset() > before;
        if (progressed && !sources.includes(url)) sources.push(url);
        const e = toScError(err);
        if (e.code === 'SC_ERR_BLOB_NOT_FOUND' && before === 0 && !progressed) throw e;
        if (e.code === 'SC_ERR_BAD_RANGE' && size === null) await this.#reset(sink);
        o.log.warn({ upstream: url, digest, have: sink.offset(), code: e.code, msg: e.message }, 'upstream attempt failed');
        noProgress = progressed ? 0 : noProgress + 1;
        if (this.#health.degraded) this.#health.noUpstream(`cannot fetch ${digest}: ${e.message}`, err);
        if (noProgress >= o.maxAttempts) {
          throw scError('SC_ERR_NO_UPSTREAM', `no upstream could deliver ${digest}: ${e.message}`, { attempts: noProgress }, err);
        }
        triesHere = progressed ? 1 : triesHere + 1;
        let delay = Math.min(o.maxBackoffMs, o.backoffMs * 2 ** Math.max(0, triesHere - 1));
        if (triesHere > o.retriesPerUpstream) {
          this.markDown(url);
          url = this.urls[(this.urls.indexOf(url) + 1) % this.urls.length];
          triesHere = 0;
          // Failing over to a different upstream needs no wait, unless every one has failed in this round.
          if (noProgress < this.urls.length * (o.retriesPerUpstream + 1)) delay = 0;
        }
        await sleep(o.clock, delay, signal);
        sink.onResume(url, sink.offset(), e.code);
      }
    }
  }

  async #reset(sink: FetchSink): Promise<void> {
    try {
      await sink.reset();
    } catch (err) {
      throw new SinkFailure(err);
    }
  }

  /** One upstream attempt from `sink.offset()`. Returns the blob size; throws on any failure. */
  async #attempt(url: string, digest: Digest, sink: FetchSink, signal: AbortSignal, knownSize: number | null): Promise<number> {
    const o = this.#o;
    const start = sink.offset();
    const headers: Record<string, string> = { 'accept-encoding': 'identity', 'user-agent': 'stagecoach-stage' };
    if (start > 0) headers.range = `bytes=${start}-`;
    const stream = got.stream(`${url}/v1/blobs/${digest}`, { ...gotTls(),
      headers,
      retry: { limit: 0 },
      throwHttpErrors: false,
      decompress: false,
      agent: this.#agents,
    });
    let idle: unknown;
    let lastByte = o.clock.now();
    const arm = () => {
      lastByte = o.clock.now();
      o.clock.clearTimeout(idle);
      idle = o.clock.setTimeout(() => stream.destroy(scError('SC_ERR_TIMEOUT', `upstream idle for ${o.idleTimeoutMs} ms`)), o.idleTimeoutMs);
    };
    const onAbort = () => stream.destroy(scError('SC_ERR_UNAVAILABLE', 'stage is closing'));
    signal.addEventListener('abort', onAbort, { once: true });
    let endedDegraded = false;
    const tracked: TrackedAttempt = {
      url,
      answered: false,
      quietMs: () => o.clock.now() - lastByte,
      end: () => {
        endedDegraded = true;
        stream.destroy(scError('SC_ERR_NO_UPSTREAM', 'stage degraded: no upstream answers'));
      },
    };
    this.#health.attempts.add(tracked);
    arm();
    let outcome = 'error';
    try {
      const res = await new Promise<Response>((resolve, reject) => {
        stream.once('response', resolve);
        stream.once('error', reject);
      })
        .catch((err: unknown) => {
          if (!signal.aborted && !endedDegraded) this.#health.failed(url, failureCode(err));
          throw err;
        });
      tracked.answered = true;
      this.#health.answered(url);
      outcome = String(res.statusCode);
      let size: number;
      let skip = 0;
      if (res.statusCode === 200) {
        size = Number(res.headers['content-length']);
        skip = start; // the upstream ignored our Range: drop what we already hold
      } else if (res.statusCode === 206) {
        const m = RANGE_RE.exec(String(res.headers['content-range'] ?? ''));
        if (!m || Number(m[1]) !== start) throw scError('SC_ERR_UPSTREAM', `bad Content-Range ${String(res.headers['content-range']).slice(0, 80)}`);
        size = Number(m[3]);
        if (Number(m[2]) !== size - 1) throw scError('SC_ERR_UPSTREAM', 'upstream sent a shorter range than asked');
      } else if (res.statusCode === 404) {
        throw scError('SC_ERR_BLOB_NOT_FOUND', `upstream ${url} has no ${digest}`);
      } else if (res.statusCode === 416 && start > 0) {
        throw scError('SC_ERR_BAD_RANGE', `upstream refused resume at ${start}`);
      } else {
        throw scError('SC_ERR_UPSTREAM', `upstream answered HTTP ${res.statusCode}`, { upstream: url });
      }
      if (!Number.isSafeInteger(size) || size < 0) throw scError('SC_ERR_UPSTREAM', 'upstream sent no usable size');
      if (knownSize !== null && size !== knownSize) throw scError('SC_ERR_SIZE_MISMATCH', `upstream size ${size} differs from ${knownSize}`);
      try {
        await sink.onSize(size, url);
      } catch (err) {
        throw new SinkFailure(err);
      }
      if (sink.offset() !== start) return size; // the sink reset itself (held more than the blob): start over
      let pos = start - skip;
      for await (const c of stream as AsyncIterable<Buffer>) {
        arm();
        o.metrics.upstreamBytes.inc({ upstream: url }, c.length);
        let chunk = c;
        if (skip > 0) {
          const n = Math.min(skip, chunk.length);
          skip -= n;
          pos += n;
          chunk = chunk.subarray(n);
          if (chunk.length === 0) continue;
        }
        if (pos + chunk.length > size) throw scError('SC_ERR_SIZE_MISMATCH', 'upstream sent more bytes than announced');
        try {
          await sink.write(chunk);
        } catch (err) {
          throw new SinkFailure(err);
        }
        pos += chunk.length;
      }
      return size;
    } catch (err) {
      if (err instanceof SinkFailure || isScError(err)) throw err;
      throw scError('SC_ERR_UPSTREAM', `upstream ${url}: ${(err as Error).message}`, undefined, err);
    } finally {
      o.clock.clearTimeout(idle);
      signal.removeEventListener('abort', onAbort);
      this.#health.attempts.delete(tracked);
      o.metrics.upstreamRequests.inc({ upstream: url, kind: 'blob', outcome });
      if (!stream.destroyed) stream.destroy();
    }
  }

  /**
   * GETs a small document (manifest, ≤ 1 MiB) from the first upstream that answers with a
   * status below 500; connection failures and 5xx move on to the next one. Throws
   * SC_ERR_NO_UPSTREAM when none answers.
   */
  async getSmall(path: string, kind: string, signal?: AbortSignal): Promise<SmallResponse> {
    if (this.#health.degraded) this.#health.noUpstream(`cannot get ${path}`);
    let last: unknown;
    for (const url of this.order()) {
      let outcome = 'error';
      try {
        const r = await this.#getSmallFrom(url, path, signal, this.#o.idleTimeoutMs).catch((err: unknown) => {
          if (!signal?.aborted) this.#health.failed(url, failureCode(err));
          throw err;
        });
        this.#health.answered(url);
        outcome = String(r.status);
        if (r.status < 500) {
          this.markUp(url);
          return r;
        }
        last = scError('SC_ERR_UPSTREAM', `upstream answered HTTP ${r.status}`);
      } catch (err) {
        last = err;
      } finally {
        this.#o.metrics.upstreamRequests.inc({ upstream: url, kind, outcome });
      }
      this.#o.log.warn({ upstream: url, path, err: (last as Error).message }, 'upstream request failed');
    }
    throw scError('SC_ERR_NO_UPSTREAM', `no upstream answered ${path}: ${(last as Error)?.message}`);
  }

  /** GET of a small document from one upstream; the whole exchange within `timeoutMs`. */
  async #getSmallFrom(url: string, path: string, signal: AbortSignal | undefined, timeoutMs: number): Promise<SmallResponse> {
    const o = this.#o;
    const stream = got.stream(`${url}${path}`, { ...gotTls(),
      headers: { accept: 'application/json', 'user-agent': 'stagecoach-stage' },
      retry: { limit: 0 },
      throwHttpErrors: false,
      agent: this.#agents,
      signal,
    });
    const timer = o.clock.setTimeout(() => stream.destroy(scError('SC_ERR_TIMEOUT', 'upstream timed out')), timeoutMs);
    try {
      const res = await new Promise<Response>((resolve, reject) => {
        stream.once('response', resolve);
        stream.once('error', reject);
      });
      const parts: Buffer[] = [];
      let n = 0;
      for await (const c of stream as AsyncIterable<Buffer>) {
        n += c.length;
        if (n > SMALL_LIMIT) throw scError('SC_ERR_UPSTREAM', `upstream document over ${SMALL_LIMIT} bytes`);
        parts.push(c);
      }
      return { upstream: url, status: res.statusCode, headers: res.headers, body: Buffer.concat(parts) };
    } finally {
      o.clock.clearTimeout(timer);
      if (!stream.destroyed) stream.destroy();
    }
  }
}
