/**
 * Typed client of the control plane's HTTP API. Every failure is an ScError: error bodies keep
 * the server's code (`fromErrorBody`), network failures are SC_ERR_UNAVAILABLE, timeouts
 * SC_ERR_TIMEOUT. Writes need the token given to the constructor.
 */
import got, { type OptionsInit } from 'got';
import { fromErrorBody, ScError, scError } from '../../shared/errors.js';
import type { AuditEntry } from './audit.js';
import type { ColoView, HostView } from './inventory.js';
import type { CreateRolloutInput } from './plan.js';
import type { HostOp, HostState, RolloutView } from './rollouts/index.js';
import { gotTls, tlsError } from '../../shared/tls.js';

export type { AuditEntry, ColoView, CreateRolloutInput, HostOp, HostState, HostView, RolloutView };

/** Rollout states that end a rollout (`completed`: every host converted). */
export const ROLLOUT_FINISHED: readonly string[] = ['aborted', 'completed', 'failed'];

/** A rollout with its hosts, as `GET /v1/rollouts/:id` returns it. */
export type RolloutDetail = RolloutView & { hosts: HostState[] };

/** Client options. */
export interface ControlClientOptions {
  /** Bearer token for writes (never logged, never part of an error). */
  token?: string;
  /** Sent as `X-Actor`: who is acting, recorded in the audit log. */
  actor?: string;
  /** Request deadline in ms (default 30 000). */
  timeoutMs?: number;
}

/** Talks to one control plane. Safe to share between concurrent callers. */
export class ControlClient {
  readonly baseUrl: string;
  readonly #o: ControlClientOptions;

  constructor(baseUrl: string, opts: ControlClientOptions = {}) {
    let u: URL;
    try {
      u = new URL(baseUrl);
    } catch {
      throw scError('SC_ERR_BAD_CONFIG', `not a URL: ${JSON.stringify(baseUrl.slice(0, 200))}`);
    }
    if (u.protocol !== 'http:' && u.protocol !== 'https:') throw scError('SC_ERR_BAD_CONFIG', `expected an http(s) URL, got ${u.protocol}`);
    this.baseUrl = u.href.replace(/\/+$/, '');
    this.#o = opts;
  }

  async #req<T>(method: 'GET' | 'POST', path: string, body?: unknown, write = method === 'POST'): Promise<T> {
    const headers: Record<string, string> = { accept: 'application/json' };
    if (write || this.#o.token) {
      if (this.#o.token) headers.authorization = `Bearer ${this.#o.token}`;
      if (this.#o.actor) headers['x-actor'] = this.#o.actor;
    }
    const url = `${this.baseUrl}${path}`;
    let res: { statusCode: number; body: string };
    try {
      res = (await got(url, { ...gotTls(),
        method,
        headers,
        ...(body !== undefined ? { json: body } : method === 'POST' ? { json: {} } : {}),
        throwHttpErrors: false,
        followRedirect: false,
        retry: { limit: method === 'GET' ? 1 : 0 },
        timeout: { request: this.#o.timeoutMs ?? 30_000 },
        responseType: 'text',
      } as OptionsInit)) as { statusCode: number; body: string };
    } catch (err) {
      if (err instanceof ScError) throw err;
      const tls = tlsError(err, this.baseUrl);
      if (tls) throw tls;
      const e = err as { name?: string; code?: string; message?: string };
      if (e.name === 'TimeoutError') throw scError('SC_ERR_TIMEOUT', `${url}: timed out`);
      throw scError('SC_ERR_UNAVAILABLE', `cannot reach control at ${this.baseUrl}: ${e.code ?? e.message}`);
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(res.body);
    } catch {
      parsed = undefined;
    }
    if (res.statusCode === 401) throw fromErrorBody(401, parsed).withHint(this.#o.token ? 'the token was not accepted' : 'give a control token with --token-file (a read-only token reads, a write token also writes)');
    if (res.statusCode >= 400) throw fromErrorBody(res.statusCode, parsed);
    if (parsed === undefined) throw scError('SC_ERR_UPSTREAM', `${url}: not JSON`);
    return parsed as T;
  }

  /** `GET /healthz`. */
  health(): Promise<{ ok: boolean; role: string; activeRollouts: number }> {
    return this.#req('GET', '/healthz');
  }

  /** Registered hosts (optionally of one colo), with liveness and current work. */
  async hosts(opts: { colo?: string } = {}): Promise<HostView[]> {
    const q = opts.colo ? `?colo=${encodeURIComponent(opts.colo)}` : '';
    return (await this.#req<{ hosts: HostView[] }>('GET', `/v1/hosts${q}`)).hosts;
  }

  /** One host; SC_ERR_NOT_FOUND when not registered. */
  host(id: string): Promise<HostView> {
    return this.#req('GET', `/v1/hosts/${encodeURIComponent(id)}`);
  }

  /** Colos with their hosts and stages (with the stages' live numbers). */
  async colos(): Promise<ColoView[]> {
    return (await this.#req<{ colos: ColoView[] }>('GET', '/v1/colos')).colos;
  }

  /**
   * Creates a rollout (token). Throws SC_ERR_BAD_REQUEST (validation, unknown hosts),
   * SC_ERR_MANIFEST_NOT_FOUND, SC_ERR_UNTRUSTED_KEY / SC_ERR_BAD_SIGNATURE, SC_ERR_CONFLICT.
   */
  createRollout(req: CreateRolloutInput): Promise<RolloutDetail> {
    return this.#req('POST', '/v1/rollouts', req);
  }

  /** Rollouts, newest first (without hosts). */
  async rollouts(limit = 50): Promise<RolloutView[]> {
    return (await this.#req<{ rollouts: RolloutView[] }>('GET', `/v1/rollouts?limit=${limit}`)).rollouts;
  }

  /** One rollout with per-host step states and, for failed hosts, the failed step's log tail. */
  rollout(id: string): Promise<RolloutDetail> {
    return this.#req('GET', `/v1/rollouts/${encodeURIComponent(id)}`);
  }

  /** Pauses (token): no new host starts. SC_ERR_CONFLICT unless running. */
  pause(id: string): Promise<RolloutView> {
    return this.#req('POST', `/v1/rollouts/${encodeURIComponent(id)}/pause`);
  }

  /** Resumes (token): failed hosts stay failed, the others go on. SC_ERR_CONFLICT unless paused. */
  resume(id: string): Promise<RolloutView> {
    return this.#req('POST', `/v1/rollouts/${encodeURIComponent(id)}/resume`);
  }

  /** Aborts (token): hosts in flight stop at their next step boundary. */
  abort(id: string): Promise<RolloutView> {
    return this.#req('POST', `/v1/rollouts/${encodeURIComponent(id)}/abort`);
  }

  /** Boots a host into its rescue OS B (token). */
  rescue(host: string): Promise<HostOp> {
    return this.#req('POST', `/v1/hosts/${encodeURIComponent(host)}/rescue`);
  }

  /** Reinstalls the kept target bundle from disk2p2 (token). */
  reinstall(host: string): Promise<HostOp> {
    return this.#req('POST', `/v1/hosts/${encodeURIComponent(host)}/reinstall`);
  }

  /** Installs another OS `NAME@VERSION` (a published target bundle) from B (token). */
  install(host: string, bundle: string): Promise<HostOp> {
    return this.#req('POST', `/v1/hosts/${encodeURIComponent(host)}/install`, { bundle });
  }

  /** One host operation. */
  op(id: string): Promise<HostOp> {
    return this.#req('GET', `/v1/ops/${encodeURIComponent(id)}`);
  }

  /** Host operations, newest first; with `host`, only that host's. */
  async ops(limit = 50, host?: string): Promise<HostOp[]> {
    const q = `?limit=${limit}${host === undefined ? '' : `&host=${encodeURIComponent(host)}`}`;
    return (await this.#req<{ ops: HostOp[] }>('GET', `/v1/ops${q}`)).ops;
  }

  /** The audit log, newest first; `before` pages back from an entry id. */
  async audit(limit = 100, before?: string): Promise<AuditEntry[]> {
    const q = `?limit=${limit}${before ? `&before=${encodeURIComponent(before)}` : ''}`;
    return (await this.#req<{ entries: AuditEntry[] }>('GET', `/v1/audit${q}`)).entries;
  }

  /** Who the token is (token name and actor); SC_ERR_UNAUTHORIZED / SC_ERR_FORBIDDEN otherwise. */
  whoami(): Promise<{ token: string; actor: string }> {
    return this.#req('GET', '/v1/whoami', undefined, true);
  }
}
