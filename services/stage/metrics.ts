/**
 * The stage's Prometheus metrics (all named `stage_*`), registered on the stage's own Registry.
 * The README's operator table documents each one.
 */
import { Counter, Gauge, httpMetrics, type Registry } from '../../shared/metrics.js';

/** Creates every stage metric on `r`. Gauges that mirror live state are set by their owners. */
export function createStageMetrics(r: Registry) {
  const c = (name: string, help: string) => new Counter({ name, help, registers: [r] });
  return {
    http: httpMetrics(r, 'stage'),
    upstreamRequests: new Counter({
      name: 'stage_upstream_requests_total',
      help: 'Requests sent upstream, by upstream, kind (blob|manifest|listing) and outcome (HTTP status or error)',
      labelNames: ['upstream', 'kind', 'outcome'] as const,
      registers: [r],
    }),
    upstreamBytes: new Counter({
      name: 'stage_upstream_bytes_total',
      help: 'Blob body bytes received from upstreams',
      labelNames: ['upstream'] as const,
      registers: [r],
    }),
    bytesServed: c('stage_bytes_served_total', 'Blob body bytes sent to clients (by the stage, or handed to the front nginx: stage_accel_bytes_total)'),
    accelHandoffs: c('stage_accel_handoffs_total', 'Blob requests handed to the front nginx (X-Accel-Redirect) to send from the cache file'),
    accelBytes: c('stage_accel_bytes_total', 'Blob body bytes of the requests handed to the front nginx (whole blobs; also in stage_bytes_served_total)'),
    hits: c('stage_hits_total', 'Blob requests answered from a committed cache entry'),
    misses: c('stage_misses_total', 'Blob requests that started a fill'),
    coalesced: c('stage_coalesced_total', 'Blob requests that joined a fill already in flight'),
    negativeHits: c('stage_negative_hits_total', 'Requests answered 404 from the negative cache'),
    resumes: c('stage_resumes_total', 'Upstream attempts that continued a broken or stalled fill'),
    digestFailures: c('stage_digest_failures_total', 'Fills whose sha256 did not match (deleted, readers aborted)'),
    fillsFailed: c('stage_fills_failed_total', 'Fills that ended without content (digest failures, upstreams exhausted)'),
    fillsCommitted: c('stage_fills_committed_total', 'Fills verified and committed (pass-throughs included)'),
    evictions: c('stage_evictions_total', 'Cache entries evicted by the byte budget'),
    evictedBytes: c('stage_evicted_bytes_total', 'Bytes evicted by the byte budget'),
    passThroughs: c('stage_passthrough_total', 'Fills of blobs larger than the whole budget, streamed without being cached'),
    fillsInFlight: new Gauge({ name: 'stage_fills_in_flight', help: 'Fills currently running', registers: [r] }),
    cacheBytes: new Gauge({
      name: 'stage_cache_bytes',
      help: 'Bytes held by the cache: committed and reserved (filling) entries plus evicted files still open by readers',
      registers: [r],
    }),
    cacheDeferredBytes: new Gauge({
      name: 'stage_cache_deferred_bytes',
      help: 'Bytes of evicted entries whose unlink waits for their last reader',
      registers: [r],
    }),
    cacheMaxBytes: new Gauge({ name: 'stage_cache_max_bytes', help: 'The byte budget (--cache-size)', registers: [r] }),
    cacheEntries: new Gauge({ name: 'stage_cache_entries', help: 'Entries in the cache index', registers: [r] }),
    upstreamUp: new Gauge({
      name: 'stage_upstream_up',
      help: 'Per upstream: 1 while it answers (its /healthz check or a real request), 0 once it failed upstreamDownAfter times in a row',
      labelNames: ['upstream'] as const,
      registers: [r],
    }),
    upstreamLastAnswer: new Gauge({
      name: 'stage_upstream_last_answer_timestamp_seconds',
      help: 'Per upstream: Unix time of its last answer (any HTTP response); 0 before the first',
      labelNames: ['upstream'] as const,
      registers: [r],
    }),
    upstreamChecks: new Counter({
      name: 'stage_upstream_checks_total',
      help: 'Background /healthz checks of upstreams, by upstream and outcome (up|down)',
      labelNames: ['upstream', 'outcome'] as const,
      registers: [r],
    }),
    reconcileRuns: new Counter({
      name: 'stage_reconcile_runs_total',
      help: 'Reconcile passes by outcome: ok, upstream_error (no valid answer), invalid_listing, empty_listing, incomplete (a listed manifest could not be read); only ok drops anything',
      labelNames: ['outcome'] as const,
      registers: [r],
    }),
    reconcileDroppedBlobs: c('stage_reconcile_dropped_blobs_total', 'Cached blobs dropped because no bundle the upstream lists references them'),
    reconcileDroppedBytes: c('stage_reconcile_dropped_bytes_total', 'Bytes of cached blobs dropped by reconcile passes'),
    reconcileDroppedManifests: c('stage_reconcile_dropped_manifests_total', 'Cached manifests dropped because the upstream no longer lists them'),
    reconcileLastSuccess: new Gauge({
      name: 'stage_reconcile_last_success_timestamp_seconds',
      help: 'Unix time of the last reconcile pass that ended ok; 0 before the first',
      registers: [r],
    }),
    degraded: new Gauge({
      name: 'stage_degraded',
      help: '1 while no upstream answers (cache hits are still served, misses are refused at once), else 0',
      registers: [r],
    }),
  };
}

/** The stage's metric handles. */
export type StageMetrics = ReturnType<typeof createStageMetrics>;
