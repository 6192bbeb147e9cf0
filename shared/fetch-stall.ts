/**
 * Stall checks of one blob request (see `FetchBlobOptions.stallCheckMs` in shared/fetch-blob.ts):
 * while a source sends nothing, its /healthz tells a source that cannot serve (left at once) from
 * one that is busy (kept until the idle timeout). Also the mark for "cannot serve" errors.
 */
import { performance } from 'node:perf_hooks';
import type { Request as GotRequest } from 'got';
import { type ErrorCode, type ScError, scError } from './errors.js';
import { checkSource } from './fetch-sources.js';

/** What the stall checks of one request need to know (a subset of the pull's arguments). */
export interface StallArgs {
  source: string;
  idleTimeoutMs: number;
  stallCheckMs: number;
  probeTimeoutMs: number;
}

/** Codes with which a source (a stage) says it cannot serve now: its upstreams failed or it is closing. */
export const UNSERVED_CODES: ReadonlySet<ErrorCode> = new Set(['SC_ERR_UPSTREAM', 'SC_ERR_NO_UPSTREAM', 'SC_ERR_UNAVAILABLE']);

/** Errors meaning "this source cannot serve now" (not "it is slow"): fail over at once, and let origin join. */
export const unserved = new WeakSet<object>();

/**
 * The stall checks of one request (see `FetchBlobOptions.stallCheckMs`): `activity()` on every
 * sign of life; after `stallCheckMs` without one, the source's /healthz is checked, and a refused,
 * failed or degraded answer destroys `req` and sets `error` (in `unserved`; got wraps what
 * destroys it). A check that times out means busy, not down: the request is kept, and only the
 * idle timeout (the caller's) ends it. One check at a time; an answer that arrives after new
 * bytes is ignored. `stop()` ends it (and a check in flight).
 */
export function watchStall(req: GotRequest, a: StallArgs): { activity(): void; stop(): void; readonly error: ScError | null } {
  const every = a.stallCheckMs;
  if (!(every > 0 && every < a.idleTimeoutMs)) return { activity() {}, stop() {}, error: null };
  let error: ScError | null = null;
  let last = performance.now();
  let timer: NodeJS.Timeout | undefined;
  let checking: AbortController | null = null;
  let stopped = false;
  const schedule = (ms: number) => {
    timer = setTimeout(tick, ms);
  };
  const tick = () => {
    const quiet = performance.now() - last;
    if (quiet < every) return schedule(every - quiet);
    const seen = last;
    checking = new AbortController();
    void checkSource(a.source, { timeoutMs: a.probeTimeoutMs, signal: checking.signal }).then((r) => {
      checking = null;
      if (stopped || req.destroyed) return;
      // New bytes, a healthy answer, or a check that timed out (busy is not down): keep the request.
      if (last !== seen || r.slow || (r.healthy && !r.degraded)) return schedule(every);
      const why = r.degraded ? 'it reports degraded (no upstream answers)' : `its /healthz failed (${r.error ?? 'unhealthy'})`;
      const e = scError(r.degraded ? 'SC_ERR_NO_UPSTREAM' : 'SC_ERR_UNAVAILABLE', `${a.source}: nothing received for ${Math.round(performance.now() - seen)} ms and ${why}`);
      unserved.add(e);
      error = e;
      req.destroy(e);
    });
  };
  schedule(every);
  return {
    activity() {
      last = performance.now();
    },
    stop() {
      stopped = true;
      clearTimeout(timer);
      checking?.abort();
    },
    get error() {
      return error;
    },
  };
}
