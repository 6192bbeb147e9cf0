/**
 * Starting the control plane: read secrets, connect to Redis, start the rollout engine and the
 * HTTP server. `startControl` is what tests and the demo call in-process; `runControl` adds the
 * process concerns (logs, SIGINT/SIGTERM).
 */
import { AgentProducer, readHostSources } from '../../shared/protocol/index.js';
import { ReadClient } from '../origin/client.js';
import { parseListen } from '../../shared/config.js';
import { createServer, loadServerTls, trustCa } from '../../shared/tls.js';
import { listen } from '../../shared/http.js';
import { createLogger, type Logger } from '../../shared/log.js';
import { createRegistry } from '../../shared/metrics.js';
import { createRedis } from '../../shared/redis.js';
import { AuditLog } from './audit.js';
import { type ControlConfig, type ControlConfigInput, controlConfig, readControlSecrets } from './config.js';
import { Inventory } from './inventory.js';
import { Board } from './queues.js';
import { RolloutEngine } from './rollouts/index.js';
import { createControlApp } from './server.js';

/** How often bull-board's list of queues is refreshed from the registrations (ms). */
const BOARD_REFRESH_MS = 60_000;

/** A running control plane. */
export interface RunningControl {
  /** Base URL, e.g. `http://127.0.0.1:7090`. */
  url: string;
  port: number;
  engine: RolloutEngine;
  /** Stops the engine (state stays in Redis), the server and the Redis connections. Idempotent. */
  close(): Promise<void>;
}

/**
 * Starts a control plane in this process. `config` is validated (SC_ERR_BAD_CONFIG); token,
 * keys and stage list are read once (SC_ERR_BAD_CONFIG / SC_ERR_BAD_KEY). Resolves once the
 * engine has loaded its state from Redis and the server listens.
 */
export async function startControl(config: ControlConfig | ControlConfigInput, opts: { logger?: Logger; now?: () => number } = {}): Promise<RunningControl> {
  const cfg = controlConfig(config as ControlConfigInput);
  if (cfg.ca) trustCa(cfg.ca);
  const log = opts.logger ?? createLogger({ level: cfg.logLevel, name: 'control' });
  const secrets = readControlSecrets(cfg);
  const { host, port } = parseListen(cfg.listen);
  const redis = createRedis(cfg.redis, { name: 'control' });
  const reader = createRedis(cfg.redis, { name: 'control-reports', forBullmq: true });
  redis.on('error', (err) => log.debug({ err: err.message }, 'redis error'));
  reader.on('error', (err) => log.debug({ err: err.message }, 'redis (reports) error'));

  const producer = new AgentProducer({ connection: redis, prefix: cfg.prefix, signingKey: secrets.signingKey });
  const inventory = new Inventory({ redis, prefix: cfg.prefix, stages: secrets.stages, staleMs: cfg.staleSec * 1000 });
  const engine = new RolloutEngine({
    redis,
    readerRedis: reader,
    prefix: cfg.prefix,
    producer,
    inventory,
    origin: new ReadClient(cfg.origin, { timeoutMs: 10_000 }),
    trustKeys: secrets.trustKeys,
    stageToken: secrets.stageToken,
    consumer: cfg.consumer,
    tickMs: cfg.tickMs,
    passMs: cfg.passMs,
    preheatTimeoutMs: cfg.preheatTimeoutSec * 1000,
    jobTtlMs: cfg.jobTtlSec * 1000,
    hostTimeoutMs: cfg.hostTimeoutSec * 1000,
    log: log.child({ component: 'engine' }),
    now: opts.now,
  });
  const audit = new AuditLog(redis, cfg.prefix);
  const board = cfg.boardQueues > 0 ? new Board({ redis, prefix: cfg.prefix, basePath: '/queues', limit: cfg.boardQueues, log }) : null;
  const registry = createRegistry('control');
  try {
    await engine.start();
  } catch (err) {
    redis.disconnect();
    reader.disconnect();
    throw err;
  }

  const refreshBoard = async () => {
    if (!board) return;
    try {
      await board.refresh(await readHostSources(redis, cfg.prefix));
    } catch (err) {
      log.debug({ err: (err as Error).message }, 'bull-board refresh failed');
    }
  };
  await refreshBoard();
  // Reads the host indexes (not the records): once a minute, for a view that only lists queues.
  const boardTimer = setInterval(refreshBoard, BOARD_REFRESH_MS);
  boardTimer.unref();

  const app = createControlApp({ engine, inventory, audit, board, tokens: secrets.tokens, readTokens: secrets.readTokens, openReads: cfg.openReads, metricsToken: cfg.metricsToken, registry, log, redisReady: () => redis.status === 'ready' });
  const server = createServer(app, loadServerTls(cfg));
  server.headersTimeout = 30_000;
  const l = await listen(server, host, port);
  let closing: Promise<void> | undefined;
  return {
    url: l.url,
    port: l.port,
    engine,
    close: () => {
      closing ??= (async () => {
        clearInterval(boardTimer);
        await l.close();
        await engine.stop();
        await board?.close();
        await producer.close().catch(() => {});
        await redis.quit().catch(() => redis.disconnect());
        reader.disconnect();
      })();
      return closing;
    },
  };
}

/**
 * Runs control as the process's service until SIGINT/SIGTERM. Exits with code 1 when another
 * instance took over the prefix (the service manager restarts it; it then waits for the lease).
 */
export async function runControl(cfg: ControlConfig): Promise<void> {
  const logger = createLogger({ level: cfg.logLevel, name: 'control' });
  const c = await startControl(cfg, { logger });
  logger.info({ url: c.url, redisPrefix: cfg.prefix }, 'control listening');
  c.engine.once('lease-lost', () => {
    process.exitCode = 1;
    process.kill(process.pid, 'SIGTERM');
  });
  await new Promise<void>((resolve) => {
    const stop = (signal: NodeJS.Signals) => {
      logger.info({ signal }, 'control stopping');
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      c.close().then(resolve, resolve);
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
  logger.info('control stopped');
  logger.flush();
}
