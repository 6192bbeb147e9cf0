/**
 * Replay: a host converted by a real rollout (control, stage, in-process agent) is handed every
 * signed job of that finished rollout again, and runs none of them.
 * - through a malicious relay (an HTTP server speaking the relay wire) that marks each job
 *   re-adopted and first taken long ago;
 * - through Redis in direct mode: the old signed jobs re-added to the host's queue, one of them
 *   left active under the host's lock token as if the host had held it before a restart.
 * Each job is refused with SC_ERR_JOB_REPLAYED; the machine (inspect, action log) is unchanged.
 */
import assert from 'node:assert/strict';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { Queue, Worker } from 'bullmq';
import { CONVERT_STEPS, hostQueueName, type SignedStepJob } from '../../shared/protocol/index.js';
import { startFleetAgents } from '../../services/demo/fleet.js';
import { readActionLog, SimMachine } from '../../services/agent/machine/sim.js';
import { type AgentHandle, startAgent } from '../../services/agent/runtime.js';
import type { StepJob } from '../../shared/protocol/transport.js';
import { hostToken } from '../../services/agent/transport-direct.js';
import { silentLogger } from '../../shared/log.js';
import { until } from './control-fixture.js';
import { type ControlFleet, startControlFleet } from './control-fleet-fixture.js';

/** What the malicious relay was told by the host. */
interface RelaySeen {
  polls: number;
  handed: string[];
  fails: { id: string; code: string; permanent: boolean; event?: string }[];
  completes: string[];
  started: string[];
}

/** An HTTP server speaking the relay wire (services/relay/client.ts) that hands out `jobs` once each. */
async function maliciousRelay(jobs: StepJob[]): Promise<{ url: string; seen: RelaySeen; close(): Promise<void> }> {
  const seen: RelaySeen = { polls: 0, handed: [], fails: [], completes: [], started: [] };
  let next = 0;
  const json = (res: ServerResponse, status: number, body?: unknown) => {
    if (body === undefined) res.writeHead(status).end();
    else res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
  };
  const server: Server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const path = new URL(req.url ?? '/', 'http://relay').pathname;
      const body = chunks.length ? JSON.parse(Buffer.concat(chunks).toString('utf8')) : {};
      if (req.method === 'GET' && /^\/v1\/relay\/hosts\/[^/]+\/next$/.test(path)) {
        seen.polls++;
        if (next < jobs.length) {
          const job = jobs[next++];
          seen.handed.push(job.id);
          return json(res, 200, { job });
        }
        setTimeout(() => json(res, 204), 200);
        return;
      }
      if (req.method === 'POST' && /^\/v1\/relay\/hosts\/[^/]+\/heartbeat$/.test(path)) return json(res, 204);
      const m = /^\/v1\/relay\/jobs\/([^/]+)\/(progress|complete|fail)$/.exec(path);
      if (req.method === 'POST' && m) {
        const id = decodeURIComponent(m[1]);
        if (body.report?.event === 'started') seen.started.push(id);
        if (m[2] === 'complete') {
          seen.completes.push(id);
          return json(res, 204);
        }
        if (m[2] === 'fail') {
          seen.fails.push({ id, code: body.code, permanent: body.permanent, event: body.report?.event });
          return json(res, 200, { retry: false });
        }
        return json(res, 204);
      }
      json(res, 404, { error: { code: 'SC_ERR_NOT_FOUND', message: 'no route' } });
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    seen,
    close: () =>
      new Promise<void>((r) => {
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}

describe('agent: a converted host runs no job of its finished rollout again', () => {
  let cf: ControlFleet;
  let queue: Queue;
  let host: string;
  let dir: string;
  let rid: string;
  /** The finished rollout's signed jobs, as stored in Redis. */
  const signed: { id: string; name: string; data: SignedStepJob }[] = [];

  before(async () => {
    cf = await startControlFleet({ colos: [{ name: 'c1', hosts: 1 }] });
    host = cf.fleet.hosts[0].hostId;
    dir = cf.fleet.hosts[0].dir;
    queue = new Queue(hostQueueName(host), { connection: cf.redis, prefix: cf.fleet.prefix });
    const created = await cf.client.createRollout({
      base: `${cf.fleet.base.name}@${cf.fleet.base.version}`,
      target: `${cf.fleet.target.name}@${cf.fleet.target.version}`,
      hosts: [host],
    });
    rid = created.spec.id;
    const done = await cf.waitRollout(rid);
    assert.equal(done.status.state, 'completed');
    assert.equal(done.hosts[0].status, 'converted');
    // The host's agent goes away; its machine runs C.
    await cf.agents.stop();
    for (const [seq, step] of CONVERT_STEPS.entries()) {
      const j = await queue.getJob(`${rid}.${seq}.${step}`);
      assert.ok(j, `job ${seq} is in Redis`);
      assert.equal(await j.getState(), 'completed');
      signed.push({ id: j.id!, name: j.name, data: j.data as SignedStepJob });
    }
  });
  after(async () => {
    await queue?.close();
    await cf?.cleanup();
  });

  const machine = async () => ({ inspect: await new SimMachine(dir).inspect(), actions: (await readActionLog(dir)).length });

  it('through a malicious relay: every job, marked re-adopted, is refused with SC_ERR_JOB_REPLAYED', async () => {
    const before = await machine();
    assert.equal(before.inspect.running?.device, 'disk1p1');
    const jobs: StepJob[] = signed.map((s) => ({
      id: s.id,
      name: s.name,
      data: s.data,
      attemptsMade: 0,
      maxAttempts: 3,
      processedOn: 1,
      readopted: true,
    }));
    const relay = await maliciousRelay(jobs);
    let agent: AgentHandle | undefined;
    try {
      agent = await startAgent(
        {
          hostId: host,
          colo: 'c1',
          relay: [relay.url],
          relayTokenFile: '-',
          relayWaitSec: 1,
          machine: `sim:${dir}`,
          stages: [cf.stages.c1.url],
          origin: cf.fleet.origin.url,
          trustKey: [cf.fleet.keys.files.releasePub],
          controlKey: cf.fleet.keys.files.controlPub,
          identity: cf.fleet.keys.files.fleetIdentity,
          prefix: cf.fleet.prefix,
        },
        { logger: silentLogger, keys: cf.fleet.keys.agent, relayToken: 'ab'.repeat(32) },
      );
      // Every job answered, and one more poll after that (nothing else going on). A host that runs
      // the jobs again may never get there (it reboots into a step the relay does not hand back):
      // the assertions below then say what it did.
      await until('every job answered', async () => relay.seen.fails.length + relay.seen.completes.length >= jobs.length, 30_000)
        .then(async () => {
          const polls = relay.seen.polls;
          await until('the host polls again', async () => relay.seen.polls > polls, 10_000);
        })
        .catch(() => {});
    } finally {
      await agent?.stop();
      await relay.close();
    }
    assert.deepEqual(relay.seen.completes, [], 'no job completed');
    assert.deepEqual(relay.seen.started, [], 'no step started');
    assert.deepEqual(
      relay.seen.fails.map((f) => f.id),
      jobs.map((j) => j.id),
    );
    for (const f of relay.seen.fails) {
      assert.equal(f.code, 'SC_ERR_JOB_REPLAYED', f.id);
      assert.equal(f.permanent, true, f.id);
      assert.equal(f.event, 'refused', f.id);
    }
    const afterwards = await machine();
    assert.deepEqual(afterwards.inspect, before.inspect, 'machine unchanged');
    assert.equal(afterwards.actions, before.actions, 'no driver action');
  });

  it('through Redis in direct mode: the old signed jobs re-added to the queue are refused with SC_ERR_JOB_REPLAYED', async () => {
    const before = await machine();
    const startedBefore = (await cf.reports()).filter((r) => r.host === host && r.event === 'started').length;
    const ids = signed.map((_, i) => `replay-${i}`);
    for (const [i, s] of signed.entries()) await queue.add(s.name, s.data, { jobId: ids[i], attempts: 3 });
    // The first one is left active under the host's own lock token, as if the host had held it
    // before a restart: the agent finds it when it starts (the transport calls it re-adopted).
    const w = new Worker(hostQueueName(host), null, { connection: cf.redis, prefix: cf.fleet.prefix, autorun: false, lockDuration: 120_000, name: hostToken(host) });
    const held = await w.getNextJob(hostToken(host), { block: false });
    assert.equal(held?.id, ids[0]);
    await w.close(true);
    const agents = await startFleetAgents([cf.fleet.hosts[0]], {
      redisUrl: cf.config.redis,
      prefix: cf.fleet.prefix,
      keys: cf.fleet.keys,
      stages: { c1: [cf.stages.c1.url] },
      origin: cf.fleet.origin.url,
    });
    try {
      await until(
        'every replayed job failed',
        async () => {
          const states = await Promise.all(ids.map((id) => queue.getJobState(id)));
          return states.every((s) => s === 'failed' || s === 'completed');
        },
        60_000,
      );
    } finally {
      await agents.stop();
    }
    for (const id of ids) {
      const j = await queue.getJob(id);
      assert.equal(await j!.getState(), 'failed', id);
      assert.match(j!.failedReason, /^SC_ERR_JOB_REPLAYED: /, id);
      assert.equal(j!.attemptsMade, 1, `${id} is not retried`);
    }
    const reps = (await cf.reports()).filter((r) => r.host === host && r.rollout === rid);
    const refused = reps.filter((r) => r.event === 'refused' && r.code === 'SC_ERR_JOB_REPLAYED');
    assert.equal(refused.length, ids.length, 'each refusal reported');
    assert.equal((await cf.reports()).filter((r) => r.host === host && r.event === 'started').length, startedBefore, 'no step started again');
    const afterwards = await machine();
    assert.deepEqual(afterwards.inspect, before.inspect, 'machine unchanged');
    assert.equal(afterwards.actions, before.actions, 'no driver action');
    // Control's view of the finished rollout did not move either.
    const r = await cf.client.rollout(rid);
    assert.equal(r.status.state, 'completed');
    assert.equal(r.hosts[0].status, 'converted');
  });
});
