/**
 * The relay transport: the host has no Redis connection. It long-polls its colo's relay (a stage
 * started with `--redis`, services/relay/server.ts) for its next signed step job and reports
 * progress and outcomes over HTTP; the relay holds the BullMQ lock, writes registrations and
 * reports into Redis on the host's behalf, and hands an unfinished job to the host again when it
 * comes back after a reboot or crash (`readopted: true`). The agent still verifies every job's
 * signature, so a relay cannot forge steps, and checks every job against its own journal
 * (journal.ts), so a relay cannot replay them: `readopted` and `processedOn` are not believed.
 *
 * Wire (all JSON; `Authorization: Bearer <relayToken(secret, host)>`, `X-Stagecoach-Host: <host>`):
 * - `GET  /v1/relay/hosts/:id/next?wait=S`  → 200 `{job}` or 204 after S seconds without one.
 *   A `X-Stagecoach-Fields` header may carry pending registration fields (base64url JSON).
 * - `POST /v1/relay/hosts/:id/heartbeat`    `{fields}` → 204
 * - `POST /v1/relay/jobs/:jobId/progress`   `{report, progress?, log?, fields?}` → 204
 * - `POST /v1/relay/jobs/:jobId/complete`   `{result, report, log?, fields?}` → 204 (409 when the relay no longer holds it)
 * - `POST /v1/relay/jobs/:jobId/fail`       `{code, message, permanent, report, log?, fields?}` → 200 `{retry}`
 *
 * Round trips per step: one poll (which also carries state changes made since the last request),
 * one `started` event, progress at most once per interval, one completion. Registration fields
 * and log lines are not sent on their own: they ride on the next request, or go out after
 * `flushMs`.
 * The relay URLs are tried in order; a connection failure moves to the next one, and so does a
 * reply body over MAX_RELAY_REPLY_BYTES (SC_ERR_REPLY_TOO_LARGE, never buffered).
 */
import { Agent as HttpAgent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';
import got from 'got';
import pRetry, { AbortError, type Options as RetryOptions } from 'p-retry';
import { isScError, type ScError, scError } from '../../shared/errors.js';
import { abortError, readBounded, responseOf } from '../../shared/fetch-http.js';
import { attemptError } from '../../shared/fetch-range.js';
import type { Logger } from '../../shared/log.js';
import { gotTls } from '../../shared/tls.js';
import type { HostRecord } from '../../shared/protocol/index.js';
import type { JobProgress, ReportFields, StepJob, StepTransport } from '../../shared/protocol/transport.js';

/**
 * Largest relay reply body the agent reads, in bytes. Replies are small JSON (a signed step
 * job, a retry flag); a larger one fails with SC_ERR_REPLY_TOO_LARGE without being buffered,
 * so a compromised relay cannot make a host allocate unbounded memory.
 */
export const MAX_RELAY_REPLY_BYTES = 1 << 20;

// One keep-alive pool per process: an in-process fleet shares it.
const httpAgent = new HttpAgent({ keepAlive: true, maxSockets: Number.POSITIVE_INFINITY, keepAliveMsecs: 30_000 });
const httpsAgent = new HttpsAgent({ keepAlive: true, maxSockets: Number.POSITIVE_INFINITY, keepAliveMsecs: 30_000 });

/**
 * Codes of a report that no relay took yet (unreachable, 5xx, silent, or a TLS failure, which
 * moved on to the next relay as any connection failure does): worth sending again.
 */
const TRANSIENT = new Set(['SC_ERR_UNAVAILABLE', 'SC_ERR_UPSTREAM', 'SC_ERR_TIMEOUT', 'SC_ERR_TLS']);

/**
 * How started/reboot events, completions and failures are re-sent while no relay answers:
 * 250 ms doubling up to 5 s between attempts, for up to `retryMs` in all (maxRetryTime).
 */
const REPORT_RETRY = { retries: Number.POSITIVE_INFINITY, factor: 2, minTimeout: 250, maxTimeout: 5000, randomize: false } as const satisfies RetryOptions;

/** Options of RelayTransport. */
export interface RelayTransportOptions {
  hostId: string;
  /** The colo's relay URLs, in failover order. */
  relays: readonly string[];
  /** relayToken(secret, hostId). Never logged. */
  token: string;
  logger: Logger;
  /** Long-poll wait in seconds (default 55, the agent's relayWaitSec). */
  waitSec?: number;
  /** How long registration fields may wait for a request to ride on, ms (default 250). */
  flushMs?: number;
  /** How long completion/failure reports are retried while no relay answers, ms (default 120000). */
  retryMs?: number;
  /**
   * A heartbeat is sent only after this long without an answered request and without an open
   * poll, ms (default 9000: just under the agent's heartbeat period, 10 s). The relay counts
   * every request as a sign of life, so a host that reports progress sends no heartbeats.
   */
  quietMs?: number;
}

interface Reply {
  status: number;
  body: unknown;
}

/** The relay's job (see the top of this file). */
export class RelayTransport implements StepTransport {
  readonly kind = 'relay' as const;
  readonly #o: Required<RelayTransportOptions>;
  #urlIndex = 0;
  #lastAnswer = 0;
  #pending: Partial<HostRecord> | null = null;
  #flushTimer: NodeJS.Timeout | null = null;
  /** Log lines not sent yet: they ride on the job's next request, or go out after `flushMs`. */
  #logs: { job: StepJob; lines: string[]; timer: NodeJS.Timeout } | null = null;
  #closed = false;
  readonly #polls = new Set<AbortController>();

  constructor(o: RelayTransportOptions) {
    if (o.relays.length === 0) throw scError('SC_ERR_BAD_CONFIG', 'relay mode needs at least one relay URL');
    this.#o = { waitSec: 55, flushMs: 250, retryMs: 120_000, quietMs: 9000, ...o };
  }

  async open(): Promise<void> {}

  async update(fields: Partial<HostRecord>): Promise<void> {
    this.#pending = { ...(this.#pending ?? {}), ...fields, transport: 'relay' };
    this.#flushTimer ??= setTimeout(() => {
      this.#flushTimer = null;
      void this.heartbeat({});
    }, this.#o.flushMs);
  }

  async heartbeat(fields: Partial<HostRecord>): Promise<void> {
    // While a poll is open, or after any request, the relay counts the host as alive (its
    // heartbeat tick writes when it last saw each host): only changed fields, or a silence of
    // quietMs (a step without progress), need a request of their own.
    if (!this.#pending && (this.#polls.size > 0 || Date.now() - this.#lastAnswer < this.#o.quietMs)) return;
    const body = { fields: this.#take(fields) ?? {} };
    const r = await this.#call('POST', `/v1/relay/hosts/${this.#o.hostId}/heartbeat`, body, 15_000).catch((err) => {
      this.#pending = { ...body.fields, ...(this.#pending ?? {}) };
      throw err;
    });
    this.#check(r);
  }

  async readopt(): Promise<StepJob | undefined> {
    return undefined; // the relay hands a held job out again on the next poll
  }

  async next(): Promise<StepJob | undefined> {
    if (this.#closed) return undefined;
    const ac = new AbortController();
    this.#polls.add(ac);
    const fields = this.#take({});
    const headers: Record<string, string> = {};
    if (fields) headers['x-stagecoach-fields'] = Buffer.from(JSON.stringify(fields)).toString('base64url');
    try {
      const r = await this.#call('GET', `/v1/relay/hosts/${this.#o.hostId}/next?wait=${this.#o.waitSec}`, undefined, (this.#o.waitSec + 15) * 1000, ac.signal, headers);
      if (r.status === 204) return undefined;
      this.#check(r);
      const j = (r.body as { job?: StepJob }).job;
      if (!j || typeof j.id !== 'string') throw scError('SC_ERR_UPSTREAM', 'relay answered without a job');
      return j;
    } catch (err) {
      if (fields) this.#pending = { ...fields, ...(this.#pending ?? {}) };
      if (this.#closed) return undefined;
      throw err;
    } finally {
      this.#polls.delete(ac);
    }
  }

  async abortRequested(): Promise<boolean> {
    return false; // the relay checks the abort flag before it hands a job over
  }

  hold(): () => void {
    return () => {}; // the relay holds the BullMQ lock, also while the host reboots
  }

  async event(job: StepJob, r: ReportFields): Promise<void> {
    // A step's start or reboot is part of its record (control times steps by it): retried like
    // a completion while the relay is briefly out of reach (right after a boot), then given up.
    await this.#retrying(() => this.#post(job, 'progress', { report: r })).catch((err) => this.#o.logger.warn({ err: (err as Error).message }, 'report failed'));
  }

  async progress(job: StepJob, p: JobProgress, r: ReportFields): Promise<void> {
    await this.#post(job, 'progress', { report: r, progress: p }).catch(() => {});
  }

  async log(job: StepJob, line: string): Promise<void> {
    if (this.#logs && this.#logs.job.id !== job.id) await this.#flushLogs();
    if (this.#logs) this.#logs.lines.push(line);
    else this.#logs = { job, lines: [line], timer: setTimeout(() => void this.#flushLogs(), this.#o.flushMs) };
    if (this.#logs.lines.length >= 100) await this.#flushLogs();
  }

  /** Sends pending log lines on a request of their own. */
  async #flushLogs(): Promise<void> {
    const l = this.#logs;
    if (!l) return;
    clearTimeout(l.timer);
    this.#logs = null;
    await this.#post(l.job, 'progress', { log: l.lines }).catch(() => {});
  }

  async complete(job: StepJob, result: Record<string, unknown>, r: ReportFields): Promise<void> {
    await this.#retrying(() => this.#post(job, 'complete', { result, report: r }));
  }

  async fail(job: StepJob, e: ScError, permanent: boolean, r: ReportFields): Promise<boolean> {
    try {
      const body = await this.#retrying(() => this.#post(job, 'fail', { code: e.code, message: e.message, permanent, report: r }));
      return (body as { retry?: boolean } | null)?.retry === true;
    } catch (x) {
      this.#o.logger.error({ job: job.id, err: (x as Error).message }, 'could not fail the job');
      return false;
    }
  }

  async close(): Promise<void> {
    this.#closed = true;
    if (this.#logs) clearTimeout(this.#logs.timer);
    this.#logs = null;
    if (this.#flushTimer) clearTimeout(this.#flushTimer);
    this.#flushTimer = null;
    for (const ac of this.#polls) ac.abort();
  }

  // ---------------------------------------------------------------- wire

  #take(extra: Partial<HostRecord>): Partial<HostRecord> | null {
    const p = this.#pending;
    this.#pending = null;
    if (this.#flushTimer) clearTimeout(this.#flushTimer);
    this.#flushTimer = null;
    const merged = { ...(p ?? {}), ...extra };
    return Object.keys(merged).length ? { ...merged, transport: 'relay' } : null;
  }

  async #post(job: StepJob, what: 'progress' | 'complete' | 'fail', body: Record<string, unknown>): Promise<unknown> {
    const fields = this.#take({});
    let logs: string[] | undefined;
    if (this.#logs?.job.id === job.id && body.log === undefined) {
      clearTimeout(this.#logs.timer);
      logs = this.#logs.lines;
      this.#logs = null;
    }
    const full = { ...body, ...(fields ? { fields } : {}), ...(logs ? { log: logs } : {}) };
    const r = await this.#call('POST', `/v1/relay/jobs/${encodeURIComponent(job.id)}/${what}`, full, 30_000).catch((err) => {
      if (fields) this.#pending = { ...fields, ...(this.#pending ?? {}) };
      // Lines not delivered go back in front, for the job's next request (completion retries included).
      if (logs && !this.#logs) this.#logs = { job, lines: logs, timer: setTimeout(() => void this.#flushLogs(), this.#o.flushMs) };
      throw err;
    });
    this.#check(r);
    return r.body;
  }

  /**
   * Runs `fn` under REPORT_RETRY while no relay answers (TRANSIENT codes) for up to retryMs; any
   * other failure, or one after close(), is thrown at once.
   */
  #retrying<T>(fn: () => Promise<T>): Promise<T> {
    return pRetry(
      () =>
        fn().catch((err: unknown) => {
          if (!TRANSIENT.has((err as ScError)?.code) || this.#closed) throw new AbortError(err as Error);
          throw err;
        }),
      { ...REPORT_RETRY, maxRetryTime: this.#o.retryMs },
    );
  }

  #check(r: Reply): void {
    if (r.status >= 200 && r.status < 300) return;
    const err = (r.body as { error?: { code?: string; message?: string } } | null)?.error;
    const code = err?.code && /^SC_ERR_[A-Z_]+$/.test(err.code) ? err.code : r.status >= 500 ? 'SC_ERR_UPSTREAM' : 'SC_ERR_BAD_REQUEST';
    throw scError(code as 'SC_ERR_UPSTREAM', `relay answered ${r.status}: ${err?.message ?? ''}`.trim());
  }

  /**
   * One request to the current relay. A connection failure (no answer: refused, reset, TLS) moves
   * to the next relay and throws SC_ERR_UNAVAILABLE (SC_ERR_TLS for a certificate problem); a
   * socket silent for `timeoutMs` throws SC_ERR_TIMEOUT; a reply body over MAX_RELAY_REPLY_BYTES
   * moves on too and throws SC_ERR_REPLY_TOO_LARGE, having read at most that much of it.
   */
  async #call(method: string, path: string, body: unknown, timeoutMs: number, signal?: AbortSignal, extra: Record<string, string> = {}): Promise<Reply> {
    const base = this.#o.relays[this.#urlIndex % this.#o.relays.length];
    const url = new URL(path, base.endsWith('/') ? base : `${base}/`);
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const req = got.stream(url, {
      ...gotTls(),
      method: method as 'GET' | 'POST',
      ...(payload ? { body: payload } : {}),
      agent: { http: httpAgent, https: httpsAgent },
      retry: { limit: 0 }, // #retrying is the only retry policy
      throwHttpErrors: false,
      followRedirect: false,
      decompress: false, // and so no Accept-Encoding: the wire stays what it was on node:http
      timeout: { socket: timeoutMs }, // no byte either way for timeoutMs (the long poll's bound)
      signal,
      headers: {
        'user-agent': undefined,
        authorization: `Bearer ${this.#o.token}`,
        'x-stagecoach-host': this.#o.hostId,
        accept: 'application/json',
        ...(payload ? { 'content-type': 'application/json' } : {}),
        ...extra,
      },
    });
    // Failures surface through responseOf / readBounded; this keeps one emitted between two awaits from being uncaught.
    req.on('error', () => {});
    const tooLarge = (what: string) => {
      // A relay that sends this is misbehaving: the next request goes to the next relay.
      this.#urlIndex++;
      return scError('SC_ERR_REPLY_TOO_LARGE', `relay ${base} sent ${what}; replies are capped at ${MAX_RELAY_REPLY_BYTES} bytes`, { max: MAX_RELAY_REPLY_BYTES });
    };
    let answered = false;
    try {
      const res = await responseOf(req);
      answered = true;
      const declared = Number(res.headers['content-length']);
      if (Number.isFinite(declared) && declared > MAX_RELAY_REPLY_BYTES) throw tooLarge(`a ${declared}-byte reply`);
      const data = await readBounded(req, MAX_RELAY_REPLY_BYTES).catch((err: unknown) => {
        throw isScError(err, 'SC_ERR_TOO_LARGE') ? tooLarge('a reply of more than that') : err;
      });
      const text = data.toString('utf8');
      let parsed: unknown = null;
      try {
        parsed = text ? JSON.parse(text) : null;
      } catch {
        parsed = null;
      }
      this.#lastAnswer = Date.now();
      return { status: res.statusCode, body: parsed };
    } catch (err) {
      if (isScError(err)) throw err;
      if (signal?.aborted) throw abortError(signal);
      const e = attemptError(err, `relay ${base}`);
      if (e.code === 'SC_ERR_TIMEOUT') throw e;
      if (!answered) this.#urlIndex++;
      // Not reached, or cut off mid-reply: the relay is unavailable (a certificate problem stays SC_ERR_TLS).
      throw e.code === 'SC_ERR_UPSTREAM' ? scError('SC_ERR_UNAVAILABLE', e.message, undefined, err) : e;
    } finally {
      if (!req.destroyed) req.destroy();
    }
  }
}
