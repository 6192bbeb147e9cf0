/**
 * Who may speak for a host (shared/protocol/records.ts, keys.ts, and control's reader,
 * services/control/rollouts/report-stream.ts) against real Redis, a unique prefix per test:
 * - a host's route follows from who wrote its registration: a relay's record routes it to that
 *   relay's colo, whatever the record says; two live claims are a conflict, and the producer
 *   refuses to enqueue for such a host; a claim gone quiet for the window yields to the live one;
 * - control's reader takes a host's reports only from the host's own stream and a relay's only
 *   about hosts that relay registered, and finds reports whose bell ring was lost at its next sweep;
 * - control looks a job up in the queue its sequence was put in when it knows it, whatever the
 *   host's registration says later.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import { afterEach, beforeEach, describe, it } from 'node:test';
import type { Redis } from 'ioredis';
import { silentLogger } from '../../shared/log.js';
import {
  AgentProducer,
  hostLockToken,
  keys,
  queuePresence,
  queueReport,
  RECORD_CONFLICT_WINDOW_MS,
  readHosts,
  readHostSources,
  readRoutes,
  type Source,
  sourceName,
  StepQueueConsumer,
  type StepReport,
} from '../../shared/protocol/index.js';
import { createRedis } from '../../shared/redis.js';
import express from 'express';
import { Board, jobOutcomes } from '../../services/control/queues.js';
import { listen } from '../../shared/http.js';
import { finalOutcomes, ReportStream } from '../../services/control/rollouts/report-stream.js';
import { deletePrefix, until } from '../helpers/fleet.js';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const host = (h: string): Source => ({ kind: 'host', host: h });
const relay = (c: string): Source => ({ kind: 'relay', colo: c });

describe('report and registration sources', () => {
  let redis: Redis;
  let reader: Redis;
  let prefix: string;
  const closers: (() => Promise<unknown>)[] = [];

  beforeEach(async () => {
    prefix = `t-sources-${randomUUID()}`;
    redis = createRedis(REDIS_URL, { name: 'sources-test' });
    reader = createRedis(REDIS_URL, { forBullmq: true, name: 'sources-test-reader' });
  });
  afterEach(async () => {
    for (const c of closers.splice(0)) await c().catch(() => {});
    await deletePrefix(redis, prefix);
    redis.disconnect();
    reader.disconnect();
  });

  const register = async (src: Source, h: string, fields: Record<string, unknown>, at = Date.now()) => {
    const res = await queuePresence(redis.multi(), prefix, src, h, { ip: '10.0.0.1/24', state: 'idle', ...fields }, at).exec();
    assert.ok(res?.every(([e]) => !e));
  };
  const say = async (src: Source, r: Partial<StepReport> & { host: string }, ring = true) => {
    const full: StepReport = { rollout: 'r1', seq: 0, step: 'fetch', event: 'started', ts: Date.now(), ...r };
    const m = queueReport(redis.multi(), prefix, src, full);
    await m.exec();
    if (!ring) await redis.del(keys(prefix).bell);
  };

  it("routes a host by who registered it, never by what the record says", async () => {
    await register(host('d1'), 'd1', { colo: 'east', transport: 'relay' });
    await register(relay('c1'), 'r1', { colo: 'elsewhere', transport: 'direct' });
    const routes = await readRoutes(redis, prefix, ['d1', 'r1', 'nobody']);
    assert.deepEqual(routes.get('d1'), { transport: 'direct', queue: 'host.d1' }, "a host's own record cannot send its jobs to a colo queue");
    assert.deepEqual(routes.get('r1'), { transport: 'relay', queue: 'colo.c1' }, "a relay's record routes to that relay's colo");
    assert.deepEqual(routes.get('nobody'), { transport: 'direct', queue: 'host.nobody' });
    const hosts = new Map((await readHosts(redis, prefix)).map((h) => [h.hostId, h]));
    assert.equal(hosts.get('d1')?.transport, 'direct');
    assert.equal(hosts.get('d1')?.source, 'host.d1');
    assert.equal(hosts.get('r1')?.colo, 'c1', "the colo is the relay's");
    assert.equal(hosts.get('r1')?.transport, 'relay');
    assert.equal(hosts.get('r1')?.source, 'relay.c1');
  });

  it('holds a host two sources claim at once, and lets a claim gone quiet yield', async () => {
    const now = Date.now();
    await register(host('h1'), 'h1', { colo: 'east' }, now);
    await register(relay('c2'), 'h1', {}, now - 1000);
    const [rec] = await readHosts(redis, prefix);
    assert.deepEqual(rec.conflict, ['host.h1', 'relay.c2']);
    const route = (await readRoutes(redis, prefix, ['h1'])).get('h1')!;
    assert.deepEqual(route.conflict, ['host.h1', 'relay.c2']);

    const { privateKey } = generateKeyPairSync('ed25519');
    const producer = new AgentProducer({ connection: redis, prefix, signingKey: privateKey });
    closers.push(() => producer.close());
    await assert.rejects(producer.enqueueSequence('h1', 'r1', [{ step: 'fetch' }]), (e: Error & { code?: string }) => e.code === 'SC_ERR_HOST_CONFLICT');
    assert.equal(await redis.exists(`${prefix}:host.h1:r1.0.fetch`), 0, 'no job anywhere');
    assert.equal(await redis.exists(`${prefix}:colo.c2:r1.0.fetch.h1`), 0);

    // The relay's claim goes quiet for longer than the window: the host's own record is the host.
    await register(relay('c2'), 'h1', {}, now - RECORD_CONFLICT_WINDOW_MS - 1000);
    const [after] = await readHosts(redis, prefix);
    assert.equal(after.conflict, undefined);
    assert.equal(after.source, 'host.h1');
    assert.deepEqual((await readRoutes(redis, prefix, ['h1'])).get('h1'), { transport: 'direct', queue: 'host.h1' });
    await producer.enqueueSequence('h1', 'r1', [{ step: 'fetch' }]);
    assert.equal(await redis.exists(`${prefix}:host.h1:r1.0.fetch`), 1);
  });

  it("control's reader takes each source's word only about its own hosts", async () => {
    await register(host('h1'), 'h1', { colo: 'east' });
    await register(host('h2'), 'h2', { colo: 'east' });
    await register(relay('c1'), 'r1', {});
    const rs = new ReportStream({ redis, readerRedis: reader, prefix, consumer: 'test', blockMs: 200, sweepMs: 60_000, log: silentLogger });
    await rs.ensureGroup();
    // The first read sweeps (no stream exists yet) and waits on the bell.
    assert.deepEqual(await rs.read(), []);

    await say(host('h1'), { host: 'h1', event: 'started' });
    await say(host('h1'), { host: 'h2', event: 'completed' }); // h1 speaking for h2
    await say(relay('c1'), { host: 'r1', event: 'started' });
    await say(relay('c1'), { host: 'h2', event: 'completed' }); // the relay speaking for a host it did not register
    const got: StepReport[] = [];
    const entries: Awaited<ReturnType<ReportStream['read']>> = [];
    await until(async () => {
      const e = await rs.read();
      entries.push(...e);
      got.push(...(await rs.decode(e)));
      return entries.length >= 4;
    }, 10_000, 'four entries read');
    assert.deepEqual(
      got.map((r) => `${r.host}:${r.event}`).sort(),
      ['h1:started', 'r1:started'],
      'what h1 said of h2 and what c1 said of h2 are dropped',
    );
    await rs.ack(entries);
    const pending = await redis.xpending(keys(prefix).hostReports('h1'), 'control');
    assert.equal((pending as unknown[])[0], 0, 'acknowledged');
  });

  it('finds a report whose bell ring was lost at its next sweep', async () => {
    await register(host('h1'), 'h1', { colo: 'east' });
    await say(host('h1'), { host: 'h1', event: 'started' }, false);
    const rs = new ReportStream({ redis, readerRedis: reader, prefix, consumer: 'test', blockMs: 100, sweepMs: 300, discoverMs: 1000, log: silentLogger });
    await rs.ensureGroup();
    const first = await rs.decode(await rs.read());
    assert.deepEqual(first.map((r) => r.event), ['started'], 'the start sweep reads streams that exist');
    await say(host('h1'), { host: 'h1', event: 'completed' }, false);
    assert.equal(await redis.llen(keys(prefix).bell), 0, 'no ring');
    const later: StepReport[] = [];
    await until(async () => {
      later.push(...(await rs.decode(await rs.read())));
      return later.length > 0;
    }, 10_000, 'the completed report is read without a ring');
    assert.deepEqual(later.map((r) => r.event), ['completed']);

    // A host whose very first report lost its ring: its stream is found by the next discovery.
    await register(host('h2'), 'h2', { colo: 'east' });
    await say(host('h2'), { host: 'h2', event: 'started' }, false);
    const found: StepReport[] = [];
    await until(async () => {
      found.push(...(await rs.decode(await rs.read())));
      return found.length > 0;
    }, 10_000, "h2's first report is read without a ring");
    assert.deepEqual(found.map((r) => `${r.host}:${r.event}`), ['h2:started']);
  });
  it('looks a job up in the queue its sequence was put in, not where the registration routes the host now', async () => {
    await register(host('h1'), 'h1', { colo: 'east' });
    const { privateKey } = generateKeyPairSync('ed25519');
    const producer = new AgentProducer({ connection: redis, prefix, signingKey: privateKey });
    closers.push(() => producer.close());
    await producer.enqueueSequence('h1', 'r1', [{ step: 'fetch' }]);
    const queued = { transport: 'direct' as const, queue: 'host.h1' };
    // The host takes and completes its job, as its agent does.
    const consumer = new StepQueueConsumer({ queue: 'host.h1', token: hostLockToken('h1'), connection: reader, prefix, lockDurationMs: 30_000, stalledIntervalMs: 30_000, maxStalledCount: 10, logger: silentLogger });
    closers.push(() => consumer.close());
    await consumer.open();
    const job = await consumer.next();
    assert.equal(job?.id, 'r1.0.fetch');
    await consumer.complete(job!, {});

    // Then it moves behind colo c1's relay: its own record goes quiet, the relay's is live.
    await register(host('h1'), 'h1', { colo: 'east' }, Date.now() - RECORD_CONFLICT_WINDOW_MS - 1000);
    await register(relay('c1'), 'h1', {});
    assert.deepEqual((await readRoutes(redis, prefix, ['h1'])).get('h1'), { transport: 'relay', queue: 'colo.c1' });

    const [now, remembered] = await jobOutcomes(redis, prefix, [
      { host: 'h1', jobId: 'r1.0.fetch' },
      { host: 'h1', jobId: 'r1.0.fetch', route: queued },
    ]);
    assert.deepEqual(now, { state: 'other', byHost: false }, 'the relay colo\'s queue never had the job');
    assert.deepEqual(remembered, { state: 'completed', byHost: true }, 'the job is where it was put, completed by the host');

    const report: StepReport = { host: 'h1', rollout: 'r1', seq: 0, step: 'fetch', event: 'completed', ts: Date.now() };
    const outcomes = await finalOutcomes(redis, prefix, [report], () => ({ route: queued }));
    assert.deepEqual(outcomes.get(report), { state: 'completed', byHost: true });
    assert.equal((await finalOutcomes(redis, prefix, [report], () => false)).size, 0, 'reports nobody follows are not looked up');
  });
  it("names each host's source as readHosts does without reading every record, and the board lists the queues it gives", async () => {
    const now = Date.now();
    await register(host('d1'), 'd1', { colo: 'east' }, now);
    await register(relay('c1'), 'r1', {}, now);
    await register(relay('c1'), 'r2', {}, now);
    // Moved from direct mode to relay c2: the newer record wins.
    await register(host('m1'), 'm1', { colo: 'east' }, now - RECORD_CONFLICT_WINDOW_MS - 1000);
    await register(relay('c2'), 'm1', {}, now);
    // Moved the other way.
    await register(relay('c3'), 'm2', {}, now - RECORD_CONFLICT_WINDOW_MS - 1000);
    await register(host('m2'), 'm2', { colo: 'east' }, now);
    const sources = await readHostSources(redis, prefix);
    const byRecords = new Map((await readHosts(redis, prefix)).map((h) => [h.hostId, h.source]));
    assert.deepEqual(new Map([...sources].map(([h, s]) => [h, sourceName(s)])), byRecords);
    assert.equal(sourceName(sources.get('m1')!), 'relay.c2');
    assert.equal(sourceName(sources.get('m2')!), 'host.m2');

    const board = new Board({ redis, prefix, basePath: '/queues', limit: 10, log: silentLogger });
    closers.push(() => board.close());
    const app = express();
    app.use('/queues', board.adapter.getRouter());
    const l = await listen(createServer(app), '127.0.0.1', 0);
    closers.push(() => l.close());
    await board.refresh(sources);
    const listed = async () => {
      const r = await fetch(`${l.url}/queues/api/queues?page=1&jobsPerPage=1`);
      assert.equal(r.status, 200);
      return ((await r.json()) as { queues: { name: string }[] }).queues.map((q) => q.name).sort();
    };
    assert.deepEqual(await listed(), ['colo.c1', 'colo.c2', 'host.d1', 'host.m2'], "relay hosts by their colo's queue, direct hosts by their own");
    await board.refresh(new Map([['d1', host('d1')]]));
    assert.deepEqual(await listed(), ['host.d1'], 'queues no longer wanted are dropped');
  });
});
