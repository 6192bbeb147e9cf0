/**
 * The stage composition root: `startStage` wires config, cache, upstreams, fetch-once, the
 * reconcile pass and the HTTP server (in-process, for the CLI, the demo and tests); `runStage`
 * is the CLI's process lifecycle around it.
 */
import { readFileSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { type ConfigSources, parseListen, readTokenFile } from '../../shared/config.js';
import { scError } from '../../shared/errors.js';
import { createServer, loadServerTls, trustCa } from '../../shared/tls.js';
import { listen } from '../../shared/http.js';
import { type Logger, createLogger } from '../../shared/log.js';
import { loadPublicKey } from '../../shared/manifest.js';
import { type Registry, createRegistry } from '../../shared/metrics.js';
import { BlobCache } from './cache.js';
import { type Clock, realClock } from './clock.js';
import { type StageConfig, type StageConfigInput, loadStageConfig, parseStageConfig } from './config.js';
import { FetchOnce, type FillInfo } from './fill.js';
import { ManifestCache } from './manifests.js';
import { createStageMetrics } from './metrics.js';
import { type ReconcileResult, Reconciler } from './reconcile.js';
import { createStageHandler, onClientError } from './server.js';
import type { Relay, RelayStats } from '../relay/server.js';
// The relay wire only: the queue protocol (BullMQ, ioredis: about 20 MiB) loads with the relay, when it is on.
import { parseRelayKeys, readRelayKeys } from '../../shared/protocol/relay-wire.js';
import { Upstreams } from './upstreams.js';

/** Optional collaborators for `startStage`. */
export interface StageDeps {
  /** Logger; defaults to one at the config's level on stderr. */
  log?: Logger;
  /** Time source for idle timeouts, backoff, negative TTLs (tests move it). */
  clock?: Clock;
}

/** A running stage. */
export interface RunningStage {
  /** Base URL, e.g. `http://127.0.0.1:7080`. */
  url: string;
  port: number;
  /** The stage's own Prometheus registry. */
  metrics: Registry;
  config: StageConfig;
  /** Fills in flight and recently finished (what GET /v1/fills shows). */
  fills(): FillInfo[];
  /**
   * Runs one reconcile pass now (or joins the running one): drops cached blobs and manifests of
   * bundles the upstream no longer lists (reconcile.ts). Never rejects.
   */
  reconcile(): Promise<ReconcileResult>;
  /** The relay's numbers when the relay is on (config `redis`), else null. */
  relay(): RelayStats | null;
  /**
   * Stops listening, drops open connections, stops fills (partial files stay on disk and are
   * resumed by the next start on the same cache directory). Idempotent.
   */
  close(): Promise<void>;
}

/**
 * Starts a stage from a config (validated here; throws SC_ERR_BAD_CONFIG). Rebuilds the cache
 * index from disk and resumes partial fills before it answers. Resolves once listening.
 */
export async function startStage(input: StageConfigInput | StageConfig, deps: StageDeps = {}): Promise<RunningStage> {
  const config = parseStageConfig(input);
  if (config.ca) trustCa(config.ca);
  const log = (deps.log ?? createLogger({ level: config.logLevel })).child({ component: 'stage', colo: config.colo });
  const clock = deps.clock ?? realClock;
  const token = config.token ?? (config.tokenFile ? readTokenFile(config.tokenFile) : undefined);
  const trusted = config.trustKeys.map((p) => {
    try {
      return loadPublicKey(readFileSync(p));
    } catch (err) {
      throw scError('SC_ERR_BAD_CONFIG', `trust key ${p}: ${(err as Error).message}`);
    }
  });
  // Checked before anything is opened: a bad key file leaves nothing running.
  const relayKeys = config.relayKeys ? parseRelayKeys(config.relayKeys, 'relayKeys') : config.relayKeyFile ? readRelayKeys(config.relayKeyFile) : undefined;
  if (config.redis && !relayKeys) throw scError('SC_ERR_BAD_CONFIG', "the relay (--redis) needs --relay-key-file (this colo's keys: stagecoach acl relay-key)");
  const dir = resolve(config.cache);
  await mkdir(dir, { recursive: true });

  const registry = createRegistry('stage', { colo: config.colo });
  const metrics = createStageMetrics(registry);
  const { cache, partials } = await BlobCache.open(dir, config.cacheSize, log, metrics);
  const upstreams = new Upstreams(config.upstreams, {
    clock,
    log,
    metrics,
    idleTimeoutMs: config.idleTimeoutMs,
    backoffMs: config.backoffMs,
    maxBackoffMs: config.maxBackoffMs,
    retriesPerUpstream: config.retriesPerUpstream,
    maxAttempts: config.maxAttempts,
    upstreamDownMs: config.upstreamDownMs,
    checkIntervalMs: config.upstreamCheckIntervalMs,
    checkTimeoutMs: config.upstreamCheckTimeoutMs,
    downAfter: config.upstreamDownAfter,
  });
  const fills = new FetchOnce({ cache, upstreams, clock, log, metrics, negativeTtlMs: config.negativeTtlMs, history: config.fillHistory, maxPassthroughBytes: config.maxPassthroughBytes });
  const manifests = new ManifestCache({ dir: join(dir, 'manifests'), upstreams, trusted, clock, log, negativeTtlMs: config.negativeTtlMs });
  for (const d of partials) fills.resume(d);
  const reconciler = new Reconciler({ cache, manifests, upstreams, clock, log, metrics, intervalMs: config.reconcileIntervalMs });

  let relay: Relay | null = null;
  if (config.redis && relayKeys) {
    const { startRelay } = await import('../relay/server.js');
    relay = await startRelay({
      colo: config.colo,
      redisUrl: config.redis,
      prefix: config.prefix,
      keys: relayKeys,
      log,
      lockDurationMs: config.relayLockDurationMs,
      stalledIntervalMs: config.relayStalledIntervalMs,
      heartbeatMs: config.relayHeartbeatMs,
      maxWaitSec: config.relayMaxWaitSec,
    });
  }
  const app = createStageHandler({ colo: config.colo, cache, fills, manifests, upstreams, metrics, registry, log, token, accelRedirect: config.accelRedirect, relay: relay ?? undefined });
  const server = createServer(app, loadServerTls(config));
  server.on('clientError', onClientError);
  server.keepAliveTimeout = 65_000;
  const { host, port } = parseListen(config.listen);
  const l = await listen(server, host, port);
  log.info({ url: l.url, upstreams: config.upstreams, cacheSize: config.cacheSize, resumed: partials.length }, 'stage listening');
  reconciler.start();

  let closing: Promise<void> | undefined;
  return {
    url: l.url,
    port: l.port,
    metrics: registry,
    config,
    fills: () => fills.list(),
    reconcile: () => reconciler.run(),
    relay: () => relay?.stats() ?? null,
    close: () => {
      closing ??= (async () => {
        reconciler.close();
        await relay?.close();
        const serverClosed = l.close();
        await fills.close();
        await serverClosed;
        upstreams.close();
      })();
      return closing;
    },
  };
}

/** Runs a stage until SIGINT/SIGTERM (the `stagecoach stage` command). */
export async function runStage(flags: Record<string, unknown>, src: Omit<ConfigSources, 'flags'> = {}): Promise<void> {
  const config = loadStageConfig({ ...src, flags });
  const log = createLogger({ level: config.logLevel });
  const stage = await startStage(config, { log });
  process.stderr.write(`stage ${config.colo} listening on ${stage.url}\n`);
  await new Promise<void>((done) => {
    const stop = (sig: string) => {
      log.info({ signal: sig }, 'stopping');
      void stage.close().then(done);
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
}
