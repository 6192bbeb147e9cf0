/**
 * The Redis connection factory. Every service takes a URL (`redis://`, `rediss://` for TLS).
 * When no URL is configured, `ensureRedis` starts a private `redis-server` on a free loopback
 * port, so that the project runs where no Redis runs.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis, type RedisOptions } from 'ioredis';
import { scError } from './errors.js';

export { Redis };

/**
 * A new ioredis connection. `forBullmq` sets `maxRetriesPerRequest: null`, which BullMQ
 * Workers require (the constructor throws otherwise).
 */
export function createRedis(url: string, opts: { forBullmq?: boolean; name?: string; lazy?: boolean } = {}): Redis {
  const o: RedisOptions = {
    connectionName: opts.name,
    lazyConnect: opts.lazy ?? false,
    enableReadyCheck: true,
    ...(opts.forBullmq ? { maxRetriesPerRequest: null } : { maxRetriesPerRequest: 3 }),
  };
  return new Redis(url, o);
}

/** A Redis reachable at `url`, and how to stop it if we started it. */
export interface RedisHandle {
  url: string;
  started: boolean;
  stop(): Promise<void>;
}

/** A free TCP port on 127.0.0.1 (for child servers that need a fixed port before they start). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

/** True when `redis-server` is on the PATH. */
export function haveRedisServer(): boolean {
  return spawnSync('redis-server', ['--version'], { stdio: 'ignore' }).status === 0;
}

/**
 * Returns `url` when given. Otherwise starts a private `redis-server` (no persistence unless
 * `appendonly`) in a temp dir on a free port and waits until it answers PING. Throws
 * SC_ERR_REDIS_UNAVAILABLE, with install instructions, when redis-server is missing.
 */
export async function ensureRedis(url?: string, opts: { appendonly?: boolean; dir?: string } = {}): Promise<RedisHandle> {
  if (url) return { url, started: false, stop: async () => {} };
  if (!haveRedisServer()) {
    throw scError(
      'SC_ERR_REDIS_UNAVAILABLE',
      'no REDIS_URL given and redis-server is not installed; install it (Debian: apt-get install -y redis-server) or set REDIS_URL=redis://host:6379',
    );
  }
  const port = await freePort();
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), 'stagecoach-redis-'));
  const args = ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--save', '', '--daemonize', 'no'];
  args.push('--appendonly', opts.appendonly ? 'yes' : 'no');
  const child: ChildProcess = spawn('redis-server', args, { stdio: 'ignore' });
  const childUrl = `redis://127.0.0.1:${port}`;
  const probe = new Redis(childUrl, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
  probe.on('error', () => {});
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      await probe.connect();
      await probe.ping();
      break;
    } catch {
      if (Date.now() > deadline || child.exitCode !== null) {
        child.kill('SIGKILL');
        throw scError('SC_ERR_REDIS_UNAVAILABLE', `redis-server did not start on port ${port}`);
      }
      probe.disconnect();
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  probe.disconnect();
  return {
    url: childUrl,
    started: true,
    stop: async () => {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await exited;
      }
      if (!opts.dir) rmSync(dir, { recursive: true, force: true });
    },
  };
}
