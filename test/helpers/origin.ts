/**
 * Starts a real origin for tests: 127.0.0.1 port 0, a fresh temp data dir and token file,
 * silent logs unless a logger is given. `close()` stops it and deletes the temp dir.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Logger } from '../../shared/log.js';
import { silentLogger } from '../../shared/log.js';
import { OriginClient } from '../../services/origin/client.js';
import { startOrigin } from '../../services/origin/main.js';
import type { OriginMetrics } from '../../services/origin/server.js';
import type { BlobStore } from '../../services/origin/store.js';

/** A running test origin. */
export interface TestOrigin {
  url: string;
  token: string;
  /** The origin's data directory (inside `root`). */
  dataDir: string;
  /** The temp directory holding dataDir and the token file; deleted by close(). */
  root: string;
  tokenFile: string;
  store: BlobStore;
  metrics: OriginMetrics;
  /** An OriginClient with the token. */
  client: OriginClient;
  close(): Promise<void>;
}

/** Starts an origin on port 0 in a fresh temp dir. `trustKey`: PEM paths to require signatures from. */
export async function startTestOrigin(
  opts: { trustKey?: string[]; logger?: Logger; dataDir?: string; maxBlobSize?: number | string; tls?: { cert: string; key: string } } = {},
): Promise<TestOrigin> {
  const root = mkdtempSync(join(tmpdir(), 'sc-origin-'));
  const dataDir = opts.dataDir ?? join(root, 'data');
  const tokenFile = join(root, 'token');
  const token = randomBytes(24).toString('hex');
  writeFileSync(tokenFile, `${token}\n`, { mode: 0o600 });
  let o: Awaited<ReturnType<typeof startOrigin>>;
  try {
    o = await startOrigin(
      { listen: '127.0.0.1:0', data: dataDir, tokenFile, trustKey: opts.trustKey ?? [], ...(opts.maxBlobSize !== undefined ? { maxBlobSize: opts.maxBlobSize } : {}),
        ...(opts.tls ? { tlsCert: opts.tls.cert, tlsKey: opts.tls.key } : {}),
      },
      { logger: opts.logger ?? silentLogger },
    );
  } catch (err) {
    rmSync(root, { recursive: true, force: true });
    throw err;
  }
  return {
    url: o.url,
    token,
    dataDir,
    root,
    tokenFile,
    store: o.store,
    metrics: o.metrics,
    client: new OriginClient(o.url, { token, retries: 0 }),
    close: async () => {
      await o.close();
      rmSync(root, { recursive: true, force: true });
    },
  };
}
