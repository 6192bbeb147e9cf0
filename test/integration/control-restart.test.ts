/**
 * Restart safety: a rollout survives a control restart mid-rollout (the new instance resumes
 * from Redis and the reports it missed) and a Redis restart (a private redis-server with AOF in
 * a temp dir, stopped and started again on the same port): it completes, nothing lost.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Redis } from 'ioredis';
import { CONVERT_STEPS } from '../../shared/protocol/index.js';
import type { RolloutDetail } from '../../services/control/client.js';
import { haveRedisServer, freePort } from '../../shared/redis.js';
import { type ControlFleet, startControlFleet } from './control-fleet-fixture.js';
import { until } from './control-fixture.js';

const ref = (m: { name: string; version: string }) => `${m.name}@${m.version}`;

function assertAllConverted(end: RolloutDetail, n: number): void {
  assert.equal(end.status.state, 'completed', JSON.stringify(end.hosts.map((h) => [h.host, h.status, h.error])));
  assert.equal(end.status.counts.converted, n);
  for (const h of end.hosts) {
    assert.equal(h.status, 'converted', h.host);
    for (const s of CONVERT_STEPS) assert.equal(h.steps[s]?.state, 'completed', `${h.host} ${s}`);
  }
}

describe('control: restart control mid-rollout', () => {
  let cf: ControlFleet;
  before(async () => {
    cf = await startControlFleet({ colos: [{ name: 'east', hosts: 3 }, { name: 'west', hosts: 2 }] });
  });
  after(async () => {
    await cf?.cleanup();
  });

  it('a new control instance continues where the old one stopped', async () => {
    const created = await cf.client.createRollout({ base: ref(cf.fleet.base), target: ref(cf.fleet.target), colos: ['east', 'west'], plan: { maxInFlight: 2 } });
    const id = created.spec.id;
    await cf.waitRollout(id, (r) => r.hosts.some((h) => h.status === 'running'));
    const old = cf.control.url;
    await cf.control.close();
    // Agents go on without control: their reports wait in the stream for the consumer group.
    await until('reports while control is down', async () => (await cf.reports()).some((r) => r.rollout === id && r.step === 'verify' && r.event === 'completed'), 60_000);
    await cf.restartControl();
    assert.notEqual(cf.control.url, old);
    const end = await cf.waitRollout(id);
    assertAllConverted(end, 5);
    const audit = await cf.reader.audit();
    assert.deepEqual(
      audit.map((a) => a.action),
      ['rollout.create'],
    );
  });
});


describe('control: restart Redis mid-rollout', { skip: !haveRedisServer() && 'redis-server is not installed' }, () => {
  let dir: string;
  let port: number;
  let child: ChildProcess | null = null;
  let cf: ControlFleet;

  const startRedis = async () => {
    child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--appendonly', 'yes', '--appendfsync', 'everysec', '--save', ''], {
      stdio: 'ignore',
    });
    const probe = new Redis(`redis://127.0.0.1:${port}`, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
    probe.on('error', () => {});
    try {
      await until('redis up', async () => {
        try {
          if (probe.status !== 'ready') await probe.connect();
          return (await probe.ping()) === 'PONG';
        } catch {
          probe.disconnect();
          return false;
        }
      });
    } finally {
      probe.disconnect();
    }
  };
  const stopRedis = async () => {
    const c = child;
    child = null;
    if (c && c.exitCode === null) {
      const exited = new Promise((r) => c.once('exit', r));
      c.kill('SIGTERM');
      await exited;
    }
  };

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'sc-redis-aof-'));
    port = await freePort();
    await startRedis();
    cf = await startControlFleet({ colos: [{ name: 'east', hosts: 2 }, { name: 'west', hosts: 2 }], redisUrl: `redis://127.0.0.1:${port}` });
  });
  after(async () => {
    if (!child) await startRedis().catch(() => {});
    await cf?.cleanup();
    await stopRedis();
    rmSync(dir, { recursive: true, force: true });
  });

  it('the rollout completes across a Redis restart', async () => {
    const created = await cf.client.createRollout({ base: ref(cf.fleet.base), target: ref(cf.fleet.target), colos: ['east', 'west'], plan: { maxInFlight: 1 } });
    const id = created.spec.id;
    const mid = await cf.waitRollout(id, (r) => r.status.counts.converted >= 1 && r.status.counts.converted < 4);
    assert.equal(mid.status.state, 'running');
    await stopRedis();
    await until('control reports Redis down', async () => (await cf.anon.health()).ok === false);
    await startRedis();
    const end = await cf.waitRollout(id);
    assertAllConverted(end, 4);
    assert.equal((await cf.anon.health()).ok, true);
  });
});
