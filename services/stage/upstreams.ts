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
 * - every retry asks only for the missing bytes (`Range: bytes=<have>-`); one attempt is the
 *   ranged request of shared/fetch-range.ts, whose rules (status, Content-Range, ETag,
 *   Content-Encoding, size, idle timeout as SC_ERR_TIMEOUT, a 200 to a Range request continuing
 *   after the bytes held) are the host's too; the blob size learnt from the first answer must be
 *   the size of every later one;
 * - a 404 on a fresh fetch is authoritative (the blob is gone); a fetch fails after
 *   `maxAttempts` consecutive attempts that brought no new byte.
 * got is used with `retry: {limit: 0}`: this loop is the only retry logic. Small documents (health
 * checks, manifests, listings) go through Node's own client (`#getSmallFrom`).
 *
 * Health (`health()`, `degraded`): see upstream-health.ts. While degraded, new fetches (blobs,
 * manifests, listings) fail at once with SC_ERR_NO_UPSTREAM.
 */
import { Agent as HttpAgent, type IncomingMessage, request as httpRequest } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import type { Digest } from '../../shared/digest.js';
import { type ScError, scError, toScError } from '../../shared/errors.js';
import { fetchRange, SinkFailure } from '../../shared/fetch-range.js';
import { sleep } from './clock.js';
import { nodeTls } from '../../shared/tls.js';
import { type TrackedAttempt, type UpstreamHealth, UpstreamHealthTracker, type UpstreamHealthOptions, failureCode } from './upstream-health.js';

export { UPSTREAM_HEALTH_DEFAULTS, type UpstreamHealth, type UpstreamHealthOptions } from './upstream-health.js';

/** Where fetched bytes go. Errors thrown by the sink end the fetch at once (they are not retried). */
export interface FetchSink {
  /** Bytes already held: the next attempt starts here. */
  offset(): number;
  /** Called with the blob size from each answer that passed the checks (shared/fetch-range.ts). May throw, and may forget what is held. */
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
    // The blob size, from the first answer that gave one; every later answer must agree.
    const known: { size: number | null } = { size: null };
    for (;;) {
      if (signal.aborted) throw scError('SC_ERR_UNAVAILABLE', 'stage is closing');
      const before = sink.offset();
      try {
        const size = await this.#attempt(url, digest, sink, signal, known);
        if (sink.offset() > before && !sources.includes(url)) sources.push(url);
        this.markUp(url);
        return { size, sources };
      } catch (err) {
        if (err instanceof SinkFailure) throw err.inner;
        if (signal.aborted) throw scError('SC_ERR_UNAVAILABLE', 'stage is closing');
        const progressed = sink.offset() > before;
        if (progressed && !sources.includes(url)) sources.push(url);
        const e = toScError(err);
        // Every byte is held although the attempt failed after the last one (bytes past the
        // announced end): complete; the fill's sha256 check decides.
        if (known.size !== null && sink.offset() === known.size) return { size: known.size, sources };
        if (e.code === 'SC_ERR_BLOB_NOT_FOUND' && before === 0 && !progressed) throw e;
        if (e.code === 'SC_ERR_BAD_RANGE' && known.size === null) await this.#reset(sink);
        o.log.warn({ upstream: url, digest, have: sink.offset(), code: e.code, msg: e.message }, 'upstream attempt failed');
        noProgress = progressed ? 0 : noProgress + 1;
        if (this.#health.degraded) this.#health.noUpstream(`cannot fetch ${digest}: ${e.message}`, err);
        if (noProgress >= o.maxAttempts) {
          throw scError('SC_ERR_NO_UPSTREAM', `no upstream could deliver ${digest}: ${e.code}: ${e.message}`, { attempts: noProgress, code: e.code }, err);
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

  /**
   * One upstream attempt from `sink.offset()`: a ranged request (shared/fetch-range.ts, the same
   * rules as a host's download), reported to the health tracker and the metrics. `known.size`
   * is the blob size once an answer gave it. Resolves with the size once the sink holds the whole
   * blob; throws an ScError, or a SinkFailure for the sink's own errors.
   */
  async #attempt(url: string, digest: Digest, sink: FetchSink, signal: AbortSignal, known: { size: number | null }): Promise<number> {
    const o = this.#o;
    let lastByte = o.clock.now();
    let degradedEnd: ScError | null = null;
    let outcome = 'error';
    const tracked: TrackedAttempt = { url, answered: false, quietMs: () => o.clock.now() - lastByte, end: () => {} };
    this.#health.attempts.add(tracked);
    try {
      const r = await fetchRange(
        {
          offset: () => sink.offset(),
          begin: async (size) => {
            known.size = size;
            await sink.onSize(size, url);
          },
          write: (chunk) => sink.write(chunk),
        },
        {
          source: url,
          digest,
          size: known.size,
          idleTimeoutMs: o.idleTimeoutMs,
          userAgent: 'stagecoach-stage',
          clock: o.clock,
          signal,
          agent: this.#agents,
          hooks: {
            started: (_req, end) => {
              tracked.end = () => {
                degradedEnd = scError('SC_ERR_NO_UPSTREAM', 'stage degraded: no upstream answers');
                end(degradedEnd);
              };
            },
            answered: (status) => {
              lastByte = o.clock.now();
              tracked.answered = true;
              this.#health.answered(url);
              outcome = String(status);
            },
            unanswered: (err) => {
              if (err !== degradedEnd) this.#health.failed(url, failureCode(err));
            },
            chunk: (n) => {
              lastByte = o.clock.now();
              o.metrics.upstreamBytes.inc({ upstream: url }, n);
            },
          },
        },
      );
      return r.size;
    } finally {
      this.#health.attempts.delete(tracked);
      o.metrics.upstreamRequests.inc({ upstream: url, kind: 'blob', outcome });
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

  /**
   * GET of a small document from one upstream; the whole exchange within `timeoutMs`. On Node's
   * own client and the pooled agents (which carry this process's TLS trust), not got: the health
   * checks run this every `checkIntervalMs` per upstream for as long as the stage runs, and a got
   * request costs about 4× the CPU of Node's (0.37 against 0.08 ms warm, 0.76 against 0.19 cold;
   * README, "Idle cost"). No redirects and no decompression, as shared/fetch-range.ts.
   */
  async #getSmallFrom(url: string, path: string, signal: AbortSignal | undefined, timeoutMs: number): Promise<SmallResponse> {
    const o = this.#o;
    const target = new URL(`${url}${path}`);
    const tls = target.protocol === 'https:';
    const req = (tls ? httpsRequest : httpRequest)(target, {
      agent: tls ? this.#agents.https : this.#agents.http,
      headers: { accept: 'application/json', 'user-agent': 'stagecoach-stage' },
      signal,
    });
    let timedOut: ScError | null = null;
    const timer = o.clock.setTimeout(() => {
      timedOut = scError('SC_ERR_TIMEOUT', 'upstream timed out');
      req.destroy(timedOut);
    }, timeoutMs);
    try {
      const res = await new Promise<IncomingMessage>((resolve, reject) => {
        req.once('response', resolve);
        req.once('error', reject);
        req.end();
      });
      const parts: Buffer[] = [];
      let n = 0;
      try {
        for await (const c of res as AsyncIterable<Buffer>) {
          n += c.length;
          if (n > SMALL_LIMIT) throw scError('SC_ERR_UPSTREAM', `upstream document over ${SMALL_LIMIT} bytes`);
          parts.push(c);
        }
      } catch (err) {
        // Destroyed mid-body, Node ends the body with ECONNRESET "aborted": say why.
        throw timedOut ?? err;
      }
      return { upstream: url, status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(parts) };
    } finally {
      o.clock.clearTimeout(timer);
      if (!req.destroyed) req.destroy();
    }
  }
}
