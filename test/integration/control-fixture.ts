/**
 * Shared setup of the control tests: a real origin with published base/target bundles, keys and
 * token files in a temp dir, a unique Redis prefix (all its keys deleted by cleanup), and a
 * control plane on port 0.
 */
import { generateKeyPairSync, randomBytes, randomUUID, type KeyObject } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import got from 'got';
import { encodeHostRecord, keys } from '../../shared/protocol/index.js';
import type { ControlConfigInput } from '../../services/control/config.js';
import { type RunningControl, startControl } from '../../services/control/main.js';
import { sha256Of } from '../../shared/digest.js';
import { silentLogger } from '../../shared/log.js';
import { type Manifest, signManifest } from '../../shared/manifest.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';

/** The Redis the test runner provides. */
export const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';

/** A fresh ed25519 key pair written as PEM files into `dir`. */
export function keyPair(dir: string, name: string): { priv: KeyObject; pub: KeyObject; privPath: string; pubPath: string } {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  const privPath = join(dir, `${name}.key`);
  const pubPath = join(dir, `${name}.pub`);
  writeFileSync(privPath, privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
  writeFileSync(pubPath, publicKey.export({ type: 'spki', format: 'pem' }));
  return { priv: privateKey, pub: publicKey, privPath, pubPath };
}

/** Publishes a small bundle (random bytes, not a real OS) signed with `key`; returns its manifest. */
export async function publishDummy(origin: TestOrigin, key: KeyObject, name: string, version: string, role: 'base' | 'target'): Promise<Manifest> {
  const blob = randomBytes(256 * 1024);
  const digest = sha256Of(blob);
  const { Readable } = await import('node:stream');
  await origin.client.putBlob(Readable.from([blob]), digest, blob.length);
  const m = signManifest(
    {
      schema: 1,
      name,
      version,
      role,
      os: { id: role === 'base' ? 'rescue' : 'debian', version: '12', family: 'linux', netFormat: 'ifupdown' },
      blob: { digest, size: blob.length, compression: 'none', encryption: 'none' },
      publishedAt: new Date().toISOString(),
    },
    key,
  );
  await origin.client.putManifest(m);
  return m;
}

/** Deletes every key under a prefix. */
export async function deletePrefix(redis: Redis, prefix: string): Promise<void> {
  let cursor = '0';
  do {
    const [next, found] = await redis.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', 1000);
    cursor = next;
    if (found.length) await redis.del(...found);
  } while (cursor !== '0');
}

/** Polls `fn` until it returns a truthy value or `ms` pass (then throws with `what`). */
export async function until<T>(what: string, fn: () => Promise<T | undefined | null | false> | T | undefined | null | false, ms = 20_000, every = 50): Promise<T> {
  const deadline = Date.now() + ms;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v as T;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

/** Everything a control test needs. */
export interface ControlFixture {
  dir: string;
  prefix: string;
  redis: Redis;
  origin: TestOrigin;
  release: ReturnType<typeof keyPair>;
  control: ReturnType<typeof keyPair>;
  /** Write tokens ops and ci; read-only token viewer. */
  tokens: { ops: string; ci: string; viewer: string };
  tokenFile: string;
  base: Manifest;
  target: Manifest;
  /** Config used for (re)starting control; override per test. */
  config(extra?: Partial<ControlConfigInput>): ControlConfigInput;
  start(extra?: Partial<ControlConfigInput>, opts?: { now?: () => number }): Promise<RunningControl>;
  /** Writes a host registration the way an agent's presence does (for API tests without agents). */
  register(hostId: string, colo: string, extra?: Record<string, unknown>): Promise<void>;
  /**
   * JSON request against a control URL; never throws on HTTP status. A GET without `token` sends
   * the viewer's read token; `token: null` sends none.
   */
  // biome-ignore lint/suspicious/noExplicitAny: tests read arbitrary JSON answers
  call(url: string, method: string, path: string, opts?: { token?: string | null; body?: unknown; actor?: string }): Promise<{ status: number; body: any }>;
  cleanup(): Promise<void>;
}

/** Builds the fixture (origin, keys, bundles `rescue@1.0` base and `debian@12.1` target). */
export async function controlFixture(): Promise<ControlFixture> {
  const dir = mkdtempSync(join(tmpdir(), 'sc-control-'));
  const prefix = `t-${randomUUID().slice(0, 8)}`;
  const redis = new Redis(REDIS_URL, { maxRetriesPerRequest: 3 });
  const release = keyPair(dir, 'release');
  const control = keyPair(dir, 'control');
  const origin = await startTestOrigin();
  const base = await publishDummy(origin, release.priv, 'rescue', '1.0', 'base');
  const target = await publishDummy(origin, release.priv, 'debian', '12.1', 'target');
  const tokens = { ops: randomBytes(16).toString('hex'), ci: randomBytes(16).toString('hex'), viewer: randomBytes(16).toString('hex') };
  const tokenFile = join(dir, 'tokens');
  writeFileSync(tokenFile, `# control write tokens\nops:${tokens.ops}\nci:${tokens.ci}\n`, { mode: 0o600 });
  const readTokenFile = join(dir, 'read-tokens');
  writeFileSync(readTokenFile, `viewer:${tokens.viewer}\n`, { mode: 0o600 });
  const running: RunningControl[] = [];
  const config = (extra: Partial<ControlConfigInput> = {}): ControlConfigInput => ({
    listen: '127.0.0.1:0',
    redis: REDIS_URL,
    origin: origin.url,
    tokenFile,
    readTokenFile,
    signingKey: control.privPath,
    prefix,
    trustKey: [release.pubPath],
    tickMs: 50,
    logLevel: 'silent',
    ...extra,
  });
  return {
    dir,
    prefix,
    redis,
    origin,
    release,
    control,
    tokens,
    tokenFile,
    base,
    target,
    config,
    async start(extra, opts = {}) {
      const c = await startControl(config(extra), { logger: silentLogger, ...opts });
      running.push(c);
      return c;
    },
    async register(hostId, colo, extra = {}) {
      const k = keys(prefix);
      const now = Date.now();
      await redis
        .multi()
        .hset(
          k.agent(hostId),
          encodeHostRecord({
            hostId,
            colo,
            ip: '10.0.0.1/24',
            running: { id: 'debian', version: '11', device: 'disk1p1' },
            bootDevice: 'disk1p1',
            agentVersion: 'test',
            lastSeen: now,
            state: 'idle',
            rollout: null,
            step: null,
            ...extra,
          }),
        )
        .zadd(k.agents, now, hostId)
        .exec();
    },
    async call(url, method, path, opts = {}) {
      const headers: Record<string, string> = {};
      const token = opts.token === undefined && method === 'GET' ? tokens.viewer : opts.token;
      if (token) headers.authorization = `Bearer ${token}`;
      if (opts.actor) headers['x-actor'] = opts.actor;
      const res = await got(`${url}${path}`, {
        method: method as 'GET',
        headers,
        ...(opts.body !== undefined ? { json: opts.body } : {}),
        throwHttpErrors: false,
        retry: { limit: 0 },
        responseType: 'text',
      });
      let body: unknown = res.body;
      try {
        body = JSON.parse(res.body);
      } catch {
        /* not JSON */
      }
      return { status: res.statusCode, body };
    },
    async cleanup() {
      for (const c of running) await c.close().catch(() => {});
      await origin.close();
      await deletePrefix(redis, prefix);
      redis.disconnect();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
