/**
 * The relay's batched record writes (services/relay/record-batch.ts) against real Redis, a unique
 * prefix per test: writes asked for in one turn go out in one pipeline, each lands where it would
 * have alone (registration, colo index, report stream), the bell rings once per batch, and a write
 * Redis refuses fails alone while the rest of its batch is taken.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { afterEach, beforeEach, describe, it } from 'node:test';
import type { Redis } from 'ioredis';
import { keys, readHosts, readAllReports, sourceName, type StepReport } from '../../shared/protocol/index.js';
import { createRedis } from '../../shared/redis.js';
import { RecordBatch } from '../../services/relay/record-batch.js';
import { deletePrefix } from '../helpers/fleet.js';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';

describe('relay record batch', () => {
  let redis: Redis;
  let prefix: string;
  let batch: RecordBatch;
  const report = (host: string, seq: number): StepReport => ({ host, rollout: 'r1', seq, step: 'fetch', event: 'started', ts: 1000 + seq });

  beforeEach(() => {
    prefix = `t-rbatch-${randomUUID()}`;
    redis = createRedis(REDIS_URL, { forBullmq: true, name: 'rbatch-test' });
    batch = new RecordBatch({ redis, prefix, colo: 'c1', reportsMaxLen: 1000, now: () => 5000 });
  });
  afterEach(async () => {
    await deletePrefix(redis, prefix);
    redis.disconnect();
  });

  it('sends the writes of one turn in one pipeline, each where it belongs, with one bell ring', async () => {
    await Promise.all([
      batch.write('h1', { colo: 'c1', state: 'idle', transport: 'relay' }, report('h1', 0)),
      batch.write('h2', { colo: 'c1', state: 'running', transport: 'relay' }, null),
      batch.write('h3', null, report('h3', 1)),
    ]);
    assert.equal(batch.flushes, 1);
    const k = keys(prefix);
    assert.deepEqual(await redis.smembers(k.relays), ['c1']);
    assert.deepEqual((await redis.zrange(k.relayAgents('c1'), '0', '-1', 'WITHSCORES')).join(','), 'h1,5000,h2,5000');
    const hosts = new Map((await readHosts(redis, prefix)).map((h) => [h.hostId, h]));
    assert.equal(hosts.get('h1')?.state, 'idle');
    assert.equal(hosts.get('h2')?.state, 'running');
    assert.equal(hosts.get('h2')?.lastSeen, 5000);
    assert.deepEqual(
      (await readAllReports(redis, prefix)).map((r) => `${r.host}:${r.seq}`),
      ['h1:0', 'h3:1'],
    );
    assert.deepEqual(await redis.lrange(k.bell, 0, -1), [sourceName({ kind: 'relay', colo: 'c1' })], 'one ring for the batch');

    // A later turn is a batch of its own.
    await batch.write('h1', null, report('h1', 2));
    assert.equal(batch.flushes, 2);
    assert.equal(await redis.llen(k.bell), 2);
  });

  it('fails only the write Redis refuses', async () => {
    const k = keys(prefix);
    await redis.set(k.relayAgent('c1', 'bad'), 'not a hash'); // HSET on it: WRONGTYPE
    const [good, bad, rep] = await Promise.allSettled([
      batch.write('good', { colo: 'c1', state: 'idle' }, null),
      batch.write('bad', { colo: 'c1', state: 'idle' }, null),
      batch.write('other', null, report('other', 0)),
    ]);
    assert.equal(batch.flushes, 1);
    assert.equal(good.status, 'fulfilled');
    assert.equal(rep.status, 'fulfilled');
    assert.equal(bad.status, 'rejected');
    assert.match(String((bad as PromiseRejectedResult).reason), /WRONGTYPE/);
    const hosts = await readHosts(redis, prefix);
    assert.deepEqual(hosts.map((h) => `${h.hostId}:${h.state}`), ['good:idle']);
    assert.deepEqual((await readAllReports(redis, prefix)).map((r) => r.host), ['other']);
  });

  it('asks nothing of Redis for an empty write', async () => {
    await batch.write('h1', null, null);
    assert.equal(batch.flushes, 0);
  });
});
