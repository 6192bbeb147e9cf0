/**
 * How a relay-mode host stays alive in its registration (services/relay/server.ts and client.ts),
 * against a real stage with its relay, real Redis (a unique prefix) and a real origin:
 * - every authenticated request counts as a sign of life: the relay's heartbeat tick writes when
 *   it last saw each host, so a host that only reports (no open poll, no heartbeat request) does
 *   not go stale; a host that sends nothing keeps its old `lastSeen`;
 * - the agent's transport sends a heartbeat request only after `quietMs` without an answered request.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { Redis } from 'ioredis';
import { formatRelayKeys, keys, readHosts, relayToken } from '../../shared/protocol/index.js';
import { RelayTransport } from '../../services/relay/client.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import { silentLogger } from '../../shared/log.js';
import { createRedis } from '../../shared/redis.js';
import { deletePrefix, until } from '../helpers/fleet.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const SECRET = { kid: '1', secret: 'liveness-test-secret-0123456789abcdef' };

describe('relay liveness', () => {
  let redis: Redis;
  let origin: TestOrigin;
  let stage: RunningStage;
  let root: string;
  const prefix = `t-live-${randomUUID()}`;

  before(async () => {
    redis = createRedis(REDIS_URL, { name: 'liveness-test' });
    origin = await startTestOrigin();
    root = await mkdtemp(join(tmpdir(), 'sc-live-'));
    stage = await startStage(
      {
        listen: '127.0.0.1:0',
        upstreams: [origin.url],
        cache: join(root, 'cache'),
        colo: 'c1',
        logLevel: 'silent',
        redis: REDIS_URL,
        prefix,
        relayKeys: formatRelayKeys([SECRET], 'c1'),
        relayHeartbeatMs: 200,
      },
      { log: silentLogger },
    );
  });
  after(async () => {
    await stage?.close();
    await origin?.close();
    await deletePrefix(redis, prefix);
    redis.disconnect();
    await rm(root, { recursive: true, force: true });
  });

  const headers = (host: string) => ({ authorization: `Bearer ${relayToken(SECRET, 'c1', host)}`, 'x-stagecoach-host': host, 'content-type': 'application/json' });
  const register = async (host: string) => {
    const r = await fetch(`${stage.url}/v1/relay/hosts/${host}/heartbeat`, { method: 'POST', headers: headers(host), body: JSON.stringify({ fields: { state: 'idle' } }) });
    assert.equal(r.status, 204);
  };
  const lastSeen = async (host: string) => (await readHosts(redis, prefix)).find((h) => h.hostId === host)?.lastSeen;

  it("writes the time of a host's last request at its heartbeat tick; a silent host keeps its old one", async () => {
    await register('h-live');
    await register('h-quiet');
    const first = (await lastSeen('h-live'))!;
    const quiet = (await lastSeen('h-quiet'))!;
    assert.ok(first > 0 && quiet > 0);
    const indexed = await redis.zscore(keys(prefix).relayAgents('c1'), 'h-live');
    await new Promise((r) => setTimeout(r, 300));
    // A quick poll: no registration fields, and no poll open when the tick comes.
    const before = Date.now();
    const r = await fetch(`${stage.url}/v1/relay/hosts/h-live/next?wait=0`, { headers: headers('h-live') });
    assert.equal(r.status, 204);
    const seen = await until(async () => {
      const t = (await lastSeen('h-live'))!;
      return t > first ? t : null;
    }, 5000, "the relay's tick");
    assert.ok(seen >= before && seen <= Date.now(), `lastSeen ${seen} is the time of the request`);
    // The tick writes the hash alone: the colo's host index keeps its registration time.
    assert.equal(await redis.zscore(keys(prefix).relayAgents('c1'), 'h-live'), indexed);
    await new Promise((r) => setTimeout(r, 500)); // two more ticks
    assert.equal(await lastSeen('h-quiet'), quiet, 'a host that sent nothing is not kept alive');
    assert.equal(await lastSeen('h-live'), seen, 'nor is one after its last request');
  });

  it('sends a heartbeat request only after quietMs without an answered request', async () => {
    const count = async () => {
      const text = await (await fetch(`${stage.url}/metrics`)).text();
      let n = 0;
      for (const m of text.matchAll(/^stage_http_requests_total\{([^}]*)\} (\d+)/gm)) if (m[1].includes('route="/hosts/:id/heartbeat"')) n += Number(m[2]);
      return n;
    };
    const t = new RelayTransport({ hostId: 'h-beat', relays: [stage.url], token: relayToken(SECRET, 'c1', 'h-beat'), logger: silentLogger, quietMs: 400 });
    try {
      const n0 = await count();
      await t.heartbeat({});
      assert.equal(await count(), n0 + 1, 'the first heartbeat goes out');
      await t.heartbeat({});
      assert.equal(await count(), n0 + 1, 'right after an answer, none');
      await new Promise((r) => setTimeout(r, 500));
      await t.heartbeat({});
      assert.equal(await count(), n0 + 2, 'after quietMs, one');
    } finally {
      await t.close();
    }
  });
});
