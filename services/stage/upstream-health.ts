/**
 * The upstreams' health: what the stage's /healthz reports, and whether the stage is degraded.
 * `Upstreams` (upstreams.ts) owns one `UpstreamHealthTracker` and reports to it the outcome of
 * every real request, and the blob attempts in flight.
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
import { isScError, scError } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import type { Clock } from './clock.js';
import type { StageMetrics } from './metrics.js';

/** The health options of `UpstreamOptions` (upstreams.ts); durations in milliseconds. */
export interface UpstreamHealthOptions {
  clock: Clock;
  log: Logger;
  metrics: StageMetrics;
  /** Background /healthz check period per upstream (default 3000; 0: no background checks). */
  checkIntervalMs?: number;
  /** Deadline of one background check (default 2000). */
  checkTimeoutMs?: number;
  /** Failures in a row after which an upstream counts as down (default 2). */
  downAfter?: number;
}

/** Defaults of the health options of `UpstreamHealthOptions`. */
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

/** A blob attempt in flight, as health sees it: how long it has been silent, and how to end it. */
export interface TrackedAttempt {
  url: string;
  /** True once the upstream answered (response headers). */
  answered: boolean;
  quietMs(): number;
  end(): void;
}

/** GET of a small document from one upstream within `timeoutMs` (Upstreams' own, for the checks). */
export type GetSmallFrom = (url: string, path: string, signal: AbortSignal | undefined, timeoutMs: number) => Promise<{ status: number; body: Buffer }>;

/** Health of every upstream of one stage: background checks, passive outcomes, the degraded state. */
export class UpstreamHealthTracker {
  readonly urls: readonly string[];
  #o: UpstreamHealthOptions;
  #getSmallFrom: GetSmallFrom;
  #health = new Map<string, HealthState>();
  #degraded = false;
  #checkTimer: unknown;
  #closed = new AbortController();
  /** Blob attempts in flight (Upstreams adds and removes them; see `#endSilent`). */
  readonly attempts = new Set<TrackedAttempt>();

  /** Starts the background checks at once (unless `checkIntervalMs` is 0); `close()` stops them. */
  constructor(urls: readonly string[], o: UpstreamHealthOptions, getSmallFrom: GetSmallFrom) {
    this.urls = urls;
    this.#o = o;
    this.#getSmallFrom = getSmallFrom;
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
  answered(url: string, status?: string): void {
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
  failed(url: string, code: string): void {
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
    for (const a of [...this.attempts]) if (!a.answered || a.quietMs() >= quiet) a.end();
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
        this.answered(url, typeof body.status === 'string' ? body.status.slice(0, 32) : undefined);
        return true;
      }
      this.failed(url, `HTTP_${r.status}`);
      return false;
    } catch (err) {
      if (signal.aborted) return false;
      const code = failureCode(err);
      // Busy is not down: a check that timed out while a fill from this upstream still receives
      // bytes counts as an answer (under load, /healthz can be slower than the check's deadline,
      // and a stage that took that for "down" would end its fills and send every host to origin).
      if ((code === 'ETIMEDOUT' || code === 'SC_ERR_TIMEOUT') && this.#receiving(url)) {
        outcome = 'busy';
        this.answered(url);
        return true;
      }
      this.failed(url, code);
      return false;
    } finally {
      if (!signal.aborted) this.#o.metrics.upstreamChecks.inc({ upstream: url, outcome });
    }
  }

  /** Whether a fill from `url` received bytes within the last check interval. */
  #receiving(url: string): boolean {
    const within = this.#checkIntervalMs > 0 ? this.#checkIntervalMs : UPSTREAM_HEALTH_DEFAULTS.checkIntervalMs;
    for (const a of this.attempts) if (a.url === url && a.answered && a.quietMs() < within) return true;
    return false;
  }

  /** Throws SC_ERR_NO_UPSTREAM naming every upstream's last error (the stage is degraded). */
  noUpstream(what: string, cause?: unknown): never {
    const down = this.health().map((h) => ({ upstream: h.url, lastError: h.lastError }));
    throw scError('SC_ERR_NO_UPSTREAM', `no upstream answers (stage degraded): ${what}`, { degraded: true, upstreams: down }, cause);
  }

  /** Stops the background checks. */
  close(): void {
    this.#closed.abort();
    this.#o.clock.clearTimeout(this.#checkTimer);
  }
}

/** A short code for a failure to get an answer: the ScError code, else the socket error code. */
export function failureCode(err: unknown): string {
  if (isScError(err)) return err.code;
  const c = (err as { code?: unknown })?.code;
  return typeof c === 'string' ? c.slice(0, 40) : 'ERR';
}
