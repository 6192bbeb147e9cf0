/**
 * Host-side source choice (used by shared/fetch.ts, hence by `stagecoach get` and the agent's
 * fetch step): source URL normalisation, the /healthz probe of one source (`checkSource`) and of
 * many (`probeSources`), and the candidate order (`selectSources`).
 *
 * Ranking: stages that answer healthy, fastest first; then stages that answer but report
 * `status: "degraded"` (no upstream: they serve only what they hold, and refuse a miss at once);
 * then stages that answer unhealthy; then stages that did not answer in time (busy is not down);
 * origin last, never probed. Stages that refused the connection are skipped unless nothing else
 * is left.
 */
import { performance } from 'node:perf_hooks';
import got from 'got';
import { scError } from './errors.js';
import { gotTls } from './tls.js';

/**
 * Validates and normalises a source base URL: http or https, no query or fragment, no trailing
 * slash. Throws SC_ERR_BAD_CONFIG.
 */
export function normalizeSource(url: string): string {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw scError('SC_ERR_BAD_CONFIG', `not a URL: ${JSON.stringify(String(url).slice(0, 200))}`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw scError('SC_ERR_BAD_CONFIG', `source must be http(s): ${u.protocol}`);
  if (u.search || u.hash) throw scError('SC_ERR_BAD_CONFIG', `source URL must not have a query or fragment: ${url.slice(0, 200)}`);
  return u.href.replace(/\/+$/, '');
}

/** Normalises every URL and drops duplicates, keeping the first occurrence's place. */
export function normalizeAll(urls: readonly string[]): string[] {
  return [...new Set(urls.map(normalizeSource))];
}

/** `sources` normalised, with `origin` appended when given and not already there. */
export function withOrigin(sources: readonly string[], origin?: string): string[] {
  const list = normalizeAll(sources);
  if (origin !== undefined) {
    const o = normalizeSource(origin);
    if (!list.includes(o)) list.push(o);
  }
  return list;
}

/** The outcome of probing one source. */
export interface ProbeResult {
  /** The normalised source URL. */
  url: string;
  /** Milliseconds from request to complete /healthz answer (or to the failure). */
  rttMs: number;
  /** True when /healthz answered 2xx with `{"ok":true}` (degraded stages included). */
  healthy: boolean;
  /**
   * True when a healthy source says `status: "degraded"`: a stage none of whose upstreams
   * answers. It serves what it has cached and refuses a miss at once (502), so it is ranked
   * after the fully healthy stages and still tried before origin.
   */
  degraded?: boolean;
  /** False when nothing answered at all (refused, reset, timed out). */
  reachable: boolean;
  /** True when the source accepted the connection or simply did not answer in time (as opposed to refusing it): busy, not known to be down. */
  slow?: boolean;
  /** HTTP status when the source answered. */
  status?: number;
  /** Why the source is not healthy. */
  error?: string;
}

/** Options for probing. */
export interface ProbeOptions {
  /** Per-source deadline for the whole /healthz exchange, in ms (default 2000). */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Clock in ms (default performance.now); injectable for tests. */
  now?: () => number;
}

/** Largest /healthz body read, in bytes. */
const MAX_HEALTH_BODY = 64 * 1024;

/**
 * GETs `<url>/healthz` once within `timeoutMs` (default 2000). `url` must be normalised. Never
 * throws for a failing source (the failure is in the result).
 */
export async function checkSource(url: string, opts: ProbeOptions = {}): Promise<ProbeResult> {
  const timeoutMs = opts.timeoutMs ?? 2000;
  const now = opts.now ?? (() => performance.now());
  const t0 = now();
  try {
    const res = await got(`${url}/healthz`, {
      ...gotTls(),
      timeout: { request: timeoutMs },
      retry: { limit: 0 },
      throwHttpErrors: false,
      followRedirect: false,
      responseType: 'text',
      headers: { 'user-agent': 'stagecoach-fetch' },
      signal: opts.signal,
    });
    const rttMs = now() - t0;
    let body: { ok?: unknown; status?: unknown } | undefined;
    try {
      body = res.body.length <= MAX_HEALTH_BODY ? (JSON.parse(res.body) as typeof body) : undefined;
    } catch {
      body = undefined;
    }
    const healthy = res.statusCode >= 200 && res.statusCode < 300 && body?.ok === true;
    const degraded = healthy && body?.status === 'degraded';
    return {
      url,
      rttMs,
      healthy,
      ...(degraded ? { degraded } : {}),
      reachable: true,
      status: res.statusCode,
      ...(healthy ? (degraded ? { error: 'degraded: no upstream answers' } : {}) : { error: `HTTP ${res.statusCode}` }),
    };
  } catch (err) {
    const slow = (err as { code?: string })?.code === 'ETIMEDOUT';
    return { url, rttMs: now() - t0, healthy: false, reachable: false, ...(slow ? { slow } : {}), error: describeError(err) };
  }
}

/** Rank of a probe result: lower is tried first. */
function rank(r: ProbeResult): number {
  if (r.healthy) return r.degraded ? 1 : 0;
  return r.reachable ? 2 : 3;
}

/**
 * GETs /healthz on every URL in parallel. Returns one result per distinct URL: healthy ones
 * sorted by RTT, then degraded ones (by RTT), then those that answered but are unhealthy (by
 * RTT; still usable as last resorts), then unreachable ones in the given order. Never throws for
 * a failing source; throws SC_ERR_BAD_CONFIG for a malformed URL.
 */
export async function probeSources(urls: readonly string[], opts: ProbeOptions = {}): Promise<ProbeResult[]> {
  const list = normalizeAll(urls);
  const results = await Promise.all(list.map((url) => checkSource(url, opts)));
  return results
    .map((r, i) => ({ r, i }))
    .sort((a, b) => rank(a.r) - rank(b.r) || (rank(a.r) < 3 ? a.r.rttMs - b.r.rttMs : 0) || a.i - b.i)
    .map((x) => x.r);
}

/** Options for choosing sources. */
export interface SelectOptions extends ProbeOptions {
  /** The origin URL: always the last candidate, never probed. */
  origin?: string;
}

/** The candidates chosen by selectSources. */
export interface SelectedSources {
  /** Manifest candidates: `stages`, then origin. */
  sources: string[];
  /** The stages worth trying, best first (no origin): the blob candidates before the last resort. */
  stages: string[];
  /** The normalised origin, when one was given. */
  origin?: string;
  probes: ProbeResult[];
}

/**
 * Probes `stages` and returns the candidate order used for manifests and blobs: healthy stages
 * fastest first, then degraded stages (they serve what they hold and refuse a miss at once, so
 * a miss there costs one round trip), then stages that answered unhealthy, then stages that did
 * not answer within the probe timeout (busy is not down), then `origin`. Stages that refused the
 * connection are skipped, unless nothing else is left (then they are tried anyway, in the given
 * order).
 */
export async function selectSources(stages: readonly string[], opts: SelectOptions = {}): Promise<SelectedSources> {
  const origin = opts.origin === undefined ? undefined : normalizeSource(opts.origin);
  const probes = await probeSources(
    normalizeAll(stages).filter((s) => s !== origin),
    opts,
  );
  let usable = probes.filter((p) => p.reachable || p.slow).map((p) => p.url);
  if (usable.length === 0 && !origin) usable = probes.map((p) => p.url);
  return { sources: origin ? [...usable, origin] : usable, stages: usable, ...(origin ? { origin } : {}), probes };
}

/** A one-line description of a request failure: its code and message. */
export function describeError(err: unknown): string {
  const e = err as { code?: string; message?: string };
  return e?.code && !String(e.message).includes(e.code) ? `${e.code}: ${e.message}` : String(e?.message ?? err);
}
