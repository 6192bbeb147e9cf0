/**
 * Starting the origin: open the store, build the app, listen. `startOrigin` is what tests and
 * the demo call in-process; `runOrigin` adds the process concerns (logs, SIGINT/SIGTERM).
 */
import { readFileSync } from 'node:fs';
import { createServer, loadServerTls } from '../../shared/tls.js';
import { listen } from '../../shared/http.js';
import { createLogger, type Logger } from '../../shared/log.js';
import { loadPublicKey } from '../../shared/manifest.js';
import { parseListen } from '../../shared/config.js';
import { scError } from '../../shared/errors.js';
import { type OriginConfig, type OriginConfigInput, originConfig, readOriginToken } from './config.js';
import { configureOriginServer, createOriginApp, createOriginMetrics, type OriginMetrics } from './server.js';
import { type BlobStore, FsBlobStore } from './store.js';

/** A running origin. */
export interface RunningOrigin {
  /** Base URL, e.g. `http://127.0.0.1:7070`. */
  url: string;
  port: number;
  store: BlobStore;
  metrics: OriginMetrics;
  /** Stops listening and closes open connections. Idempotent. */
  close(): Promise<void>;
}

/** Loads the trusted release keys (PEM files); throws SC_ERR_BAD_KEY / SC_ERR_BAD_CONFIG. */
function loadTrustKeys(paths: readonly string[]) {
  return paths.map((p) => {
    let pem: Buffer;
    try {
      pem = readFileSync(p);
    } catch (err) {
      throw scError('SC_ERR_BAD_CONFIG', `cannot read trust key ${p}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
    return loadPublicKey(pem);
  });
}

/**
 * Starts an origin in this process. `config` is validated (SC_ERR_BAD_CONFIG); the token file
 * and trust keys are read once. `logger` defaults to one at `config.logLevel` on stderr.
 */
export async function startOrigin(config: OriginConfig | OriginConfigInput, opts: { logger?: Logger } = {}): Promise<RunningOrigin> {
  const cfg = originConfig(config as OriginConfigInput);
  const logger = opts.logger ?? createLogger({ level: cfg.logLevel, name: 'origin' });
  const token = readOriginToken(cfg.tokenFile);
  const trustedKeys = loadTrustKeys(cfg.trustKey);
  const { host, port } = parseListen(cfg.listen);
  const store = await FsBlobStore.open(cfg.data);
  const metrics = createOriginMetrics();
  const app = createOriginApp({ store, token, trustedKeys, logger, metrics, maxManifestBytes: cfg.maxManifestBytes, maxBlobSize: cfg.maxBlobSize });
  const server = createServer(app, loadServerTls(cfg));
  configureOriginServer(server, cfg.idleTimeoutSec);
  const l = await listen(server, host, port);
  let closing: Promise<void> | undefined;
  return {
    url: l.url,
    port: l.port,
    store,
    metrics,
    close: () => {
      closing ??= l.close();
      return closing;
    },
  };
}

/**
 * Runs the origin as the process's service: logs where it listens and closes cleanly on
 * SIGINT/SIGTERM. Resolves once it has stopped.
 */
export async function runOrigin(cfg: OriginConfig): Promise<void> {
  const logger = createLogger({ level: cfg.logLevel, name: 'origin' });
  const o = await startOrigin(cfg, { logger });
  logger.info({ url: o.url, data: cfg.data, trustKeys: cfg.trustKey.length }, 'origin listening');
  await new Promise<void>((resolve) => {
    const stop = (signal: NodeJS.Signals) => {
      logger.info({ signal }, 'origin stopping');
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      o.close().then(resolve, resolve);
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
  logger.info('origin stopped');
  logger.flush();
}
