/**
 * The ordered upstream list (origin or parent stages) with backoff and failover, the resume
 * loop that drives one blob fetch to completion, and the upstreams' health (what the stage's
 * /healthz reports).
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
 * Health (`health()`, `degraded`): each upstream is checked in the background (GET /healthz,
 * `checkTimeoutMs`, every `checkIntervalMs`) and passively by every real request. An upstream that answers (any HTTP response to
 * a real request; 2xx with `ok: true` to a check) is up at once; one that fails `downAfter` times
 * in a row (refused, reset or timed out before any response; a check answered otherwise) is down.
 * A byte stream that breaks mid-body is not a failure here: the resume loop deals with it. The
 * stage is degraded while every upstream is down: new fetches (blobs, manifests, listings) then
 * fail at once with SC_ERR_NO_UPSTREAM instead of waiting out timeouts and backoffs, blob attempts
 * that are only waiting out the idle timeout are ended (`#endSilent`), and a fill in flight stops
 * at its next failed attempt. Cache hits are unaffected. Only the background check
 * (or a fill already running) brings an upstream back.
 */
import { Agent as HttpAgent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';
import got, { type Response } from 'got';
import type { Digest } from '../../shared/digest.js';
import { isScError, scError, toScError } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import { type Clock, sleep } from './clock.js';
import type { StageMetrics } from './metrics.js';
import { gotTls, nodeTls } from '../../shared/tls.js';

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

/** Options for the upstream list; durations in milliseconds. */
export interface UpstreamOptions {
  clock: Clock;
  log: Logger;
  metrics: StageMetrics;
  idleTimeoutMs: number;
  backoffMs: number;
  maxBackoffMs: number;
  retriesPerUpstream: number;
  maxAttempts: number;
  upstreamDownMs: number;
  /** Background /healthz check period per upstream (default 3000; 0: no background checks). */
  checkIntervalMs?: number;
  /** Deadline of one background check (default 2000). */
  checkTimeoutMs?: number;
  /** Failures in a row after which an upstream counts as down (default 2). */
  downAfter?: number;
}

/** Defaults of the health options of `UpstreamOptions`. */
export const UPSTREAM_HEALTH_DEFAULTS = { checkIntervalMs: 3000, checkTimeoutMs: 2000, downAfter: 2 } as const;

/** One upstream as the stage last saw it (the stage's /healthz `upstreamHealth`). Times are ISO 8601. */
export interface UpstreamHealth {
  url: string;
  /** True while it answers, false after `downAfter` failures in a row, null before the first check or request. */
  reachable: boolean | null;
  /** Last background check or real request outcome; null before the first. */
  checkedAt: string | null;
  /** Last answer (any HTTP response to a request; 2xx to a check); null if never. */
  answeredAt: string | null;
  /** Failures in a row now. */
  failures: number;
  /** Code of the last failure since start (`ECONNREFUSED`, `ETIMEDOUT`, `SC_ERR_TIMEOUT`, `HTTP_503`, …); null if none. */
  lastError: string | null;
  lastErrorAt: string | null;
  /** The upstream's own `status` from its last /healthz answer (a parent stage may say `degraded`). */
  status?: string;
}

interface HealthState {
  reachable: boolean | null;
  checkedAt: number | null;
  answeredAt: number | null;
  failures: number;
  lastError: string | null;
  lastErrorAt: number | null;
  status?: string;
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
  #health = new Map<string, HealthState>();
  #degraded = false;
  #checkTimer: unknown;
  #closed = new AbortController();
  /** Blob attempts in flight: how long each has been silent, and how to end it (see `#endSilent`). */
  #attempts = new Set<{ url: string; answered: boolean; quietMs(): number; end(): void }>();

  /** Starts the background checks at once (unless `checkIntervalMs` is 0); `close()` stops them. */
  constructor(urls: readonly string[], o: UpstreamOptions) {
    if (urls.length === 0) throw scError('SC_ERR_BAD_CONFIG', 'at least one upstream is required');
    this.urls = urls;
    this.#o = o;
    for (const u of urls) {
      this.#health.set(u, { reachable: null, checkedAt: null, answeredAt: null, failures: 0, lastError: null, lastErrorAt: null });
      o.metrics.upstreamUp.set({ upstream: u }, 1);
      o.metrics.upstreamLastAnswer.set({ upstream: u }, 0);
    }
    o.metrics.degraded.set(0);
    if (this.#checkIntervalMs > 0) this.#scheduleChecks(0);
  }

  get #checkIntervalMs(): number {
    return this.#o.checkIntervalMs ?? UPSTREAM_HEALTH_DEFAULTS.checkIntervalMs;
  }

  /** True while no upstream answers (every one failed `downAfter` times in a row); never without background checks. */
  get degraded(): boolean {
    return this.#degraded;
  }

  /** Every upstream's health, in configured order. */
  health(): UpstreamHealth[] {
    const iso = (t: number | null) => (t === null ? null : new Date(t).toISOString());
    return this.urls.map((url) => {
      const h = this.#health.get(url)!;
      return {
        url,
        reachable: h.reachable,
        checkedAt: iso(h.checkedAt),
        answeredAt: iso(h.answeredAt),
        failures: h.failures,
        lastError: h.lastError,
        lastErrorAt: iso(h.lastErrorAt),
        ...(h.status === undefined ? {} : { status: h.status }),
      };
    });
  }

  /** Records an answer from `url` (it is up from now on). */
  #answered(url: string, status?: string): void {
    const h = this.#health.get(url);
    if (!h) return;
    const now = this.#o.clock.now();
    const was = h.reachable;
    h.reachable = true;
    h.failures = 0;
    h.checkedAt = now;
    h.answeredAt = now;
    if (status !== undefined) h.status = status;
    this.#o.metrics.upstreamUp.set({ upstream: url }, 1);
    this.#o.metrics.upstreamLastAnswer.set({ upstream: url }, Math.floor(now / 1000));
    if (was === false) this.#o.log.info({ upstream: url }, 'upstream answers again');
    this.#updateDegraded();
  }

  /** Records a failure of `url` to answer (refused, reset, timed out, or an unhealthy check). */
  #failed(url: string, code: string): void {
    const h = this.#health.get(url);
    if (!h) return;
    const now = this.#o.clock.now();
    h.failures++;
    h.checkedAt = now;
    h.lastError = code;
    h.lastErrorAt = now;
    if (h.failures >= (this.#o.downAfter ?? UPSTREAM_HEALTH_DEFAULTS.downAfter) && h.reachable !== false) {
      h.reachable = false;
      this.#o.metrics.upstreamUp.set({ upstream: url }, 0);
      this.#o.log.warn({ upstream: url, failures: h.failures, code }, 'upstream down');
    }
    this.#updateDegraded();
  }

  #updateDegraded(): void {
    // Without background checks nothing would bring a degraded stage back: it is then never degraded.
    const degraded = this.#checkIntervalMs > 0 && [...this.#health.values()].every((h) => h.reachable === false);
    if (degraded === this.#degraded) return;
    this.#degraded = degraded;
    this.#o.metrics.degraded.set(degraded ? 1 : 0);
    if (degraded) {
      this.#o.log.warn({ upstreams: this.urls }, 'stage degraded: no upstream answers; serving cache hits only');
      this.#endSilent();
    }
    else this.#o.log.info('stage recovered: an upstream answers');
  }

  /**
   * While degraded, blob attempts that would only wait out the idle timeout are ended (their
   * fills then fail at once): those still waiting for an answer, and those whose body has been
   * silent for `checkTimeoutMs`, as long as every upstream has failed its checks. Called when the
   * stage turns degraded and after every check round.
   */
  #endSilent(): void {
    if (!this.#degraded) return;
    const quiet = this.#o.checkTimeoutMs ?? UPSTREAM_HEALTH_DEFAULTS.checkTimeoutMs;
    for (const a of [...this.#attempts]) if (!a.answered || a.quietMs() >= quiet) a.end();
  }

  /** Rounds start every `checkIntervalMs` (a slow round delays the next one, never overlaps it). */
  #scheduleChecks(delay: number): void {
    if (this.#closed.signal.aborted) return;
    this.#checkTimer = this.#o.clock.setTimeout(() => {
      const started = this.#o.clock.now();
      void this.#checkAll().finally(() => {
        this.#endSilent();
        this.#scheduleChecks(Math.max(0, this.#checkIntervalMs - (this.#o.clock.now() - started)));
      });
    }, delay);
  }

  /** One background round: every upstream is checked at once. */
  async #checkAll(): Promise<void> {
    await Promise.all(this.urls.map((url) => this.check(url)));
  }

  /**
   * Checks one upstream now: GET /healthz within `checkTimeoutMs`. Up when it answers 2xx with
   * `ok: true`; anything else counts as one failure. Never throws.
   */
  async check(url: string): Promise<boolean> {
    const signal = this.#closed.signal;
    if (signal.aborted) return false;
    let outcome = 'down';
    try {
      const r = await this.#getSmallFrom(url, '/healthz', signal, this.#o.checkTimeoutMs ?? UPSTREAM_HEALTH_DEFAULTS.checkTimeoutMs);
      let body: { ok?: unknown; status?: unknown } | undefined;
      try {
        body = JSON.parse(r.body.toString('utf8')) as typeof body;
      } catch {
        body = undefined;
      }
      if (signal.aborted) return false;
      if (r.status >= 200 && r.status < 300 && body?.ok === true) {
        outcome = 'up';
        this.#answered(url, typeof body.status === 'string' ? body.status.slice(0, 32) : undefined);
        return true;
      }
      this.#failed(url, `HTTP_${r.status}`);
      return false;
    } catch (err) {
      if (signal.aborted) return false;
      const code = failureCode(err);
      // Busy is not down: a check that timed out while a fill from this upstream still receives
      // bytes counts as an answer (under load, /healthz can be slower than the check's deadline,
      // and a stage that took that for "down" would end its fills and send every host to origin).
      if ((code === 'ETIMEDOUT' || code === 'SC_ERR_TIMEOUT') && this.#receiving(url)) {
        outcome = 'busy';
        this.#answered(url);
        return true;
      }
      this.#failed(url, code);
      return false;
    } finally {
      if (!signal.aborted) this.#o.metrics.upstreamChecks.inc({ upstream: url, outcome });
    }
  }

  /** Whether a fill from `url` received bytes within the last check interval. */
  #receiving(url: string): boolean {
    const within = this.#checkIntervalMs > 0 ? this.#checkIntervalMs : UPSTREAM_HEALTH_DEFAULTS.checkIntervalMs;
    for (const a of this.#attempts) if (a.url === url && a.answered && a.quietMs() < within) return true;
    return false;
  }

  #noUpstream(what: string, cause?: unknown): never {
    const down = this.health().map((h) => ({ upstream: h.url, lastError: h.lastError }));
    throw scError('SC_ERR_NO_UPSTREAM', `no upstream answers (stage degraded): ${what}`, { degraded: true, upstreams: down }, cause);
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
    this.#closed.abort();
    this.#o.clock.clearTimeout(this.#checkTimer);
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
    if (this.#degraded) this.#noUpstream(`cannot fetch ${digest}`);
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
        if (this.#degraded) this.#noUpstream(`cannot fetch ${digest}: ${e.message}`, err);
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
    const tracked = {
      url,
      answered: false,
      quietMs: () => o.clock.now() - lastByte,
      end: () => {
        endedDegraded = true;
        stream.destroy(scError('SC_ERR_NO_UPSTREAM', 'stage degraded: no upstream answers'));
      },
    };
    this.#attempts.add(tracked);
    arm();
    let outcome = 'error';
    try {
      const res = await new Promise<Response>((resolve, reject) => {
        stream.once('response', resolve);
        stream.once('error', reject);
      })
        .catch((err: unknown) => {
          if (!signal.aborted && !endedDegraded) this.#failed(url, failureCode(err));
          throw err;
        });
      tracked.answered = true;
      this.#answered(url);
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
      this.#attempts.delete(tracked);
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
    if (this.#degraded) this.#noUpstream(`cannot get ${path}`);
    let last: unknown;
    for (const url of this.order()) {
      let outcome = 'error';
      try {
        const r = await this.#getSmallFrom(url, path, signal, this.#o.idleTimeoutMs).catch((err: unknown) => {
          if (!signal?.aborted) this.#failed(url, failureCode(err));
          throw err;
        });
        this.#answered(url);
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

/** A short code for a failure to get an answer: the ScError code, else the socket error code. */
function failureCode(err: unknown): string {
  if (isScError(err)) return err.code;
  const c = (err as { code?: unknown })?.code;
  return typeof c === 'string' ? c.slice(0, 40) : 'ERR';
}
