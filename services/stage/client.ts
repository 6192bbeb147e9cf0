/**
 * Typed client for a stage's own endpoints (preheat, fill progress, health, metrics). Reading
 * blobs and manifests from a stage is the origin's `ReadClient` (same read API).
 */
import got, { type OptionsInit } from 'got';
import { type Digest, parseDigest } from '../../shared/digest.js';
import { fromErrorBody, scError } from '../../shared/errors.js';
import type { FillInfo } from './fill.js';
import type { UpstreamHealth } from './upstream-health.js';
import type { RelayStats } from '../../shared/protocol/index.js';
import { gotTls, tlsError } from '../../shared/tls.js';

export type { FillInfo };

/** What `GET /healthz` on a stage returns. */
export interface StageHealth {
  ok: boolean;
  /** `degraded` while no upstream answers (the cache still serves; see the stage's /healthz). */
  status: 'ok' | 'degraded';
  role: 'stage';
  colo: string;
  upstreams: string[];
  /** What the stage knows of each upstream. */
  upstreamHealth: UpstreamHealth[];
  fillsInFlight: number;
  cacheBytes: number;
  cacheMaxBytes: number;
  cacheEntries: number;
  /** The colo relay's numbers, when this stage runs one. */
  relay?: RelayStats;
}

/** Answer of `POST /v1/prefetch`. */
export interface PrefetchResult {
  accepted: Digest[];
  fills: { digest: Digest; state: string }[];
}

/**
 * A client for one stage. Methods throw ScError (codes from the stage's JSON error bodies).
 * Redirects are never followed (a 3xx is an error): requests, and the prefetch token, go only to
 * `baseUrl`.
 */
export class StageClient {
  readonly baseUrl: string;
  #timeoutMs: number;

  constructor(baseUrl: string, opts: { timeoutMs?: number } = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, '');
    this.#timeoutMs = opts.timeoutMs ?? 10_000;
  }

  async #json<T>(path: string, o: OptionsInit = {}): Promise<T> {
    let res: { statusCode: number; body: string };
    try {
      res = (await got(`${this.baseUrl}${path}`, { ...gotTls(),
        retry: { limit: 0 },
        throwHttpErrors: false,
        followRedirect: false,
        timeout: { request: this.#timeoutMs },
        ...o,
        resolveBodyOnly: false,
        responseType: 'text',
      })) as { statusCode: number; body: string };
    } catch (err) {
      throw tlsError(err, this.baseUrl) ?? scError('SC_ERR_UNAVAILABLE', `stage ${this.baseUrl}: ${(err as Error).message}`, undefined, err);
    }
    let body: unknown;
    try {
      body = JSON.parse(res.body);
    } catch {
      body = undefined;
    }
    if (res.statusCode >= 300) throw fromErrorBody(res.statusCode, body);
    return body as T;
  }

  /** Starts fills for `digests` (validated here; SC_ERR_BAD_DIGEST) without waiting for them. */
  async prefetch(digests: string[], token: string): Promise<PrefetchResult> {
    const ds = digests.map((d) => parseDigest(d));
    return this.#json<PrefetchResult>('/v1/prefetch', {
      method: 'POST',
      json: { digests: ds },
      headers: { authorization: `Bearer ${token}` },
    });
  }

  /** Fills in flight, then recently finished ones. */
  async fills(): Promise<FillInfo[]> {
    return (await this.#json<{ fills: FillInfo[] }>('/v1/fills')).fills;
  }

  /** The stage's /healthz. */
  health(): Promise<StageHealth> {
    return this.#json<StageHealth>('/healthz');
  }

  /** Prometheus text from /metrics. */
  async metricsText(): Promise<string> {
    try {
      const r = await got(`${this.baseUrl}/metrics`, { ...gotTls(), retry: { limit: 0 }, followRedirect: false, timeout: { request: this.#timeoutMs } });
      return r.body;
    } catch (err) {
      throw tlsError(err, this.baseUrl) ?? scError('SC_ERR_UNAVAILABLE', `stage ${this.baseUrl}: ${(err as Error).message}`, undefined, err);
    }
  }
}
