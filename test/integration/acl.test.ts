/**
 * The generated Redis ACL against a real private redis-server started with `--aclfile`: agent
 * h1 runs a real BullMQ Worker on its own queue and writes its presence and reports, but can
 * neither read nor write host h2's queue or reports, nor read, trim or remove anything shared,
 * nor write its abort flag, nor list or flush keys. A relay writes only its colo's keys. Control can do
 * its work; the default user can do nothing.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Queue, Worker } from 'bullmq';
import { Redis } from 'ioredis';
import { credentialUrl, generateAcl } from '../../services/cli/acl-gen.js';
import { haveRedisServer, freePort } from '../../shared/redis.js';
import { queuePresence, queueReport, type Source } from '../../shared/protocol/index.js';
import { startControlFleet } from './control-fleet-fixture.js';


const P = 'sc';
const noperm = (err: unknown) => /NOPERM|NOAUTH|WRONGPASS/.test((err as Error).message);
/** True when no command of a MULTI failed (EXEC's per-command errors would otherwise pass silently). */
const noErrors = (res: [Error | null, unknown][] | null) => !!res && res.every(([e]) => !e);

describe('redis ACL', { skip: !haveRedisServer() && 'redis-server is not installed' }, () => {
  let dir: string;
  let child: ChildProcess;
  let base: string;
  const conns: Redis[] = [];
  const closers: (() => Promise<unknown>)[] = [];
  let users: ReturnType<typeof generateAcl>['users'];

  const connect = (user: string, opts: { bullmq?: boolean } = {}) => {
    const u = users.find((x) => x.user === user)!;
    const r = new Redis(credentialUrl(base, u.user, u.password), { maxRetriesPerRequest: opts.bullmq ? null : 1 });
    r.on('error', () => {});
    conns.push(r);
    return r;
  };

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'sc-acl-'));
    const gen = generateAcl({ prefix: P, hosts: ['h1', 'h2', 'acl-h1', 'acl-h2'], secret: 'a-test-secret-of-enough-length', admin: true, relayColos: ['c1', 'c2'] });
    users = gen.users;
    writeFileSync(join(dir, 'users.acl'), gen.acl);
    const port = await freePort();
    // The production redis.conf, with only address, directory and ACL file overridden.
    child = spawn('redis-server', ['infra/redis/redis.conf', '--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--aclfile', join(dir, 'users.acl')], {
      stdio: 'ignore',
    });
    base = `redis://127.0.0.1:${port}`;
    const deadline = Date.now() + 10_000;
    for (;;) {
      const probe = connect('control');
      try {
        await probe.ping();
        break;
      } catch (err) {
        if (Date.now() > deadline) throw err;
        probe.disconnect();
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  });

  after(async () => {
    for (const c of closers.reverse()) await c().catch(() => {});
    for (const c of conns) c.disconnect();
    if (child && child.exitCode === null) {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    }
    rmSync(dir, { recursive: true, force: true });
  });

  it('the file holds no password and disables the default user', () => {
    const acl = generateAcl({ prefix: P, hosts: ['h1'], secret: 'a-test-secret-of-enough-length' });
    for (const u of acl.users) assert.ok(!acl.acl.includes(u.password));
    assert.match(acl.acl, /^user default off/m);
    assert.match(acl.acl, /~sc:host\.h1:\* ~sc:host\.h1 ~sc:agent:h1 %R~sc:hostctl:h1 /);
    assert.match(acl.acl, /\(~sc:agent:h1:reports \+xadd\) \(~sc:agents \+zadd\) \(~sc:report-bell \+lpush\)$/m);
  });

  it('redis.conf turns AOF on and never evicts', async () => {
    const admin = connect('admin');
    assert.deepEqual(await admin.config('GET', 'appendonly'), ['appendonly', 'yes']);
    assert.deepEqual(await admin.config('GET', 'maxmemory-policy'), ['maxmemory-policy', 'noeviction']);
    await assert.rejects(connect('control').config('GET', 'dir'), noperm, 'control is no admin');
  });

  it('control enqueues; agent h1 runs a real BullMQ Worker on its own queue and reports', async () => {
    const ctl = connect('control');
    const q1 = new Queue('host.h1', { connection: ctl, prefix: P });
    const q2 = new Queue('host.h2', { connection: ctl, prefix: P });
    closers.push(() => q1.close(), () => q2.close());
    await q1.add('fetch', { n: 1 }, { jobId: 'r1.0.fetch', attempts: 3 });
    await q2.add('fetch', { n: 2 }, { jobId: 'r1.0.fetch', attempts: 3 });
    await ctl.hset(`${P}:hostctl:h1`, 'abort', 'none');

    const a1 = connect('agent-h1', { bullmq: true });
    const w = new Worker('host.h1', null, { connection: a1, prefix: P, lockDuration: 60_000, maxStalledCount: 1000, autorun: false });
    closers.push(() => w.close());
    await w.waitUntilReady();
    const token = 'agent:h1';
    const job = await w.getNextJob(token, { block: true });
    assert.equal(job?.id, 'r1.0.fetch');
    assert.deepEqual(job!.data, { n: 1 });
    await job!.extendLock(token, 60_000);
    await job!.updateProgress(50);
    await job!.log('half way');
    await job!.moveToCompleted({ ok: true }, token, false);
    assert.equal(await q1.getJobState('r1.0.fetch'), 'completed');
    assert.deepEqual(await q1.getJobLogs('r1.0.fetch'), { logs: ['half way'], count: 1 });

    // Presence: registration, heartbeat, reports (the writers the agent uses); the abort flag is readable.
    const me: Source = { kind: 'host', host: 'h1' };
    assert.ok(noErrors(await queuePresence(a1.multi(), P, me, 'h1', { colo: 'c1' }, Date.now()).exec()));
    assert.ok(noErrors(await queueReport(a1.multi(), P, me, { host: 'h1', rollout: 'r1', seq: 0, step: 'fetch', event: 'started', ts: Date.now() }).exec()));
    assert.equal(await ctl.xlen(`${P}:agent:h1:reports`), 1);
    assert.deepEqual(await ctl.lrange(`${P}:report-bell`, 0, -1), ['host.h1']);
    assert.equal(await a1.hget(`${P}:hostctl:h1`, 'abort'), 'none');
  });

  it('agent h1 can neither read nor write host h2’s queue, nor write control’s keys', async () => {
    const a1 = connect('agent-h1');
    await assert.rejects(a1.lrange(`${P}:host.h2:wait`, 0, -1), noperm);
    await assert.rejects(a1.hgetall(`${P}:host.h2:r1.0.fetch`), noperm);
    await assert.rejects(a1.set(`${P}:host.h2:x`, '1'), noperm);
    await assert.rejects(a1.del(`${P}:host.h2:r1.0.fetch`), noperm);
    await assert.rejects(a1.hset(`${P}:agent:h2`, 'ip', '"x"'), noperm);
    await assert.rejects(a1.hset(`${P}:hostctl:h1`, 'abort', ''), noperm, 'the abort flag is read-only');
    await assert.rejects(a1.hget(`${P}:hostctl:h2`, 'abort'), noperm);
    await assert.rejects(a1.keys('*'), noperm);
    await assert.rejects(a1.scan('0'), noperm);
    await assert.rejects(a1.flushall(), noperm);
    await assert.rejects(a1.call('CONFIG', 'GET', 'dir'), noperm);
    await assert.rejects(a1.get(`${P}:control:audit`), noperm);

    // The shared keys: one command each, nothing that reads, removes or trims.
    await assert.rejects(a1.xrange(`${P}:agent:h2:reports`, '-', '+'), noperm, 'no reading another host’s reports');
    await assert.rejects(a1.xadd(`${P}:agent:h2:reports`, '*', 'r', '{}'), noperm, 'no writing another host’s reports');
    await assert.rejects(a1.xrange(`${P}:agent:h1:reports`, '-', '+'), noperm, 'its own stream is write-only');
    await assert.rejects(a1.xtrim(`${P}:agent:h1:reports`, 'MAXLEN', '0'), noperm);
    await assert.rejects(a1.del(`${P}:agent:h1:reports`), noperm);
    await assert.rejects(a1.xgroup('DESTROY', `${P}:agent:h1:reports`, 'control'), noperm, 'control’s group is not the agent’s');
    await assert.rejects(a1.zrem(`${P}:agents`, 'h2'), noperm, 'no removing another host');
    await assert.rejects(a1.del(`${P}:agents`), noperm);
    await assert.rejects(a1.zrange(`${P}:agents`, '0', '-1'), noperm);
    await assert.rejects(a1.lrange(`${P}:report-bell`, 0, -1), noperm);
    await assert.rejects(a1.lpop(`${P}:report-bell`), noperm);
    await assert.rejects(a1.hset(`${P}:relay:c1:agent:h2`, 'ip', '"x"'), noperm, 'no relay registration');
    await assert.rejects(a1.sadd(`${P}:relays`, 'c9'), noperm);

    // Through BullMQ itself: adding to or taking from h2's queue fails.
    const a1b = connect('agent-h1', { bullmq: true });
    const q2 = new Queue('host.h2', { connection: a1b, prefix: P });
    q2.on('error', () => {});
    closers.push(() => q2.close());
    await assert.rejects(q2.add('x', {}), noperm);
    const w2 = new Worker('host.h2', null, { connection: a1b, prefix: P, autorun: false });
    w2.on('error', () => {});
    closers.push(() => w2.close());
    await assert.rejects(w2.getNextJob('agent:h1'), noperm);

    const ctl = connect('control');
    const q2c = new Queue('host.h2', { connection: ctl, prefix: P });
    closers.push(() => q2c.close());
    assert.equal(await q2c.getJobState('r1.0.fetch'), 'waiting', 'h2’s job is untouched');
  });

  it("relay c1 runs its colo's queue and writes its hosts' presence, and nothing else", async () => {
    const ctl = connect('control');
    const q1 = new Queue('colo.c1', { connection: ctl, prefix: P });
    const q2 = new Queue('colo.c2', { connection: ctl, prefix: P });
    closers.push(() => q1.close(), () => q2.close());
    await q1.add('fetch', { n: 1 }, { jobId: 'r9.0.fetch.h1', attempts: 3 });
    await q2.add('fetch', { n: 2 }, { jobId: 'r9.0.fetch.h2', attempts: 3 });
    await ctl.hset(`${P}:hostctl:h1`, 'abort', 'none');

    const r1 = connect('relay-c1', { bullmq: true });
    const w = new Worker('colo.c1', null, { connection: r1, prefix: P, lockDuration: 30_000, maxStalledCount: 1000, autorun: false });
    closers.push(() => w.close());
    await w.waitUntilReady();
    const token = 'relay:c1';
    const job = await w.getNextJob(token, { block: true });
    assert.equal(job?.id, 'r9.0.fetch.h1');
    await job!.extendLock(token, 30_000);
    await job!.log('relayed');
    await job!.moveToCompleted({ ok: true }, token, false);
    assert.equal(await q1.getJobState('r9.0.fetch.h1'), 'completed');
    const relay: Source = { kind: 'relay', colo: 'c1' };
    assert.ok(noErrors(await queuePresence(r1.multi(), P, relay, 'h1', { transport: 'relay' }, Date.now()).exec()));
    assert.ok(noErrors(await queueReport(r1.multi(), P, relay, { host: 'h1', rollout: 'r9', seq: 0, step: 'fetch', event: 'started', ts: Date.now() }).exec()));
    assert.equal(await ctl.xlen(`${P}:relay:c1:reports`), 1);
    assert.deepEqual(await ctl.smembers(`${P}:relays`), ['c1']);
    assert.equal(await r1.hget(`${P}:hostctl:h1`, 'abort'), 'none');

    // Not: another colo's queue, any host queue, abort flags, control's keys.
    const r1p = connect('relay-c1');
    await assert.rejects(r1p.lrange(`${P}:colo.c2:wait`, 0, -1), noperm);
    await assert.rejects(r1p.hgetall(`${P}:colo.c2:r9.0.fetch.h2`), noperm);
    await assert.rejects(r1p.lrange(`${P}:host.h1:wait`, 0, -1), noperm);
    await assert.rejects(r1p.hset(`${P}:hostctl:h1`, 'abort', ''), noperm);
    await assert.rejects(r1p.get(`${P}:control:audit`), noperm);
    await assert.rejects(r1p.keys('*'), noperm);
    // Registrations and reports: its colo's own keys only.
    await assert.rejects(r1p.hset(`${P}:agent:h1`, 'transport', '"relay"'), noperm, 'no rewriting a direct-mode host');
    await assert.rejects(r1p.hset(`${P}:relay:c2:agent:h2`, 'ip', '"x"'), noperm, 'no rewriting another colo’s host');
    await assert.rejects(r1p.zadd(`${P}:relay:c2:agents`, 1, 'h2'), noperm);
    await assert.rejects(r1p.xadd(`${P}:relay:c2:reports`, '*', 'r', '{}'), noperm);
    await assert.rejects(r1p.xadd(`${P}:agent:h2:reports`, '*', 'r', '{}'), noperm);
    await assert.rejects(r1p.xtrim(`${P}:relay:c1:reports`, 'MAXLEN', '0'), noperm);
    await assert.rejects(r1p.xrange(`${P}:relay:c1:reports`, '-', '+'), noperm);
    await assert.rejects(r1p.srem(`${P}:relays`, 'c2'), noperm);
    await assert.rejects(r1p.zadd(`${P}:agents`, 1, 'h1'), noperm);
    const w2 = new Worker('colo.c2', null, { connection: connect('relay-c1', { bullmq: true }), prefix: P, autorun: false });
    w2.on('error', () => {});
    closers.push(() => w2.close());
    await assert.rejects(w2.getNextJob('relay:c1'), noperm);
    assert.equal(await q2.getJobState('r9.0.fetch.h2'), 'waiting', 'c2’s job is untouched');
  });

  it('a rollout converges with every agent on its own ACL user and control on its own', async () => {
    const url = (user: string) => {
      const u = users.find((x) => x.user === user)!;
      return credentialUrl(base, u.user, u.password);
    };
    const cf = await startControlFleet({
      colos: [{ name: 'acl', hosts: 2 }],
      prefix: P,
      redisUrl: url('admin'),
      agentRedisUrl: (h) => url(`agent-${h}`),
      control: { redis: url('control') },
    });
    try {
      const created = await cf.client.createRollout({
        base: `${cf.fleet.base.name}@${cf.fleet.base.version}`,
        target: `${cf.fleet.target.name}@${cf.fleet.target.version}`,
        colos: ['acl'],
        plan: { maxInFlight: 2 },
      });
      const end = await cf.waitRollout(created.spec.id);
      assert.equal(end.status.state, 'completed', JSON.stringify(end.hosts.map((h) => [h.host, h.status, h.error])));
      assert.equal((await cf.reader.colos())[0].stages[0].ok, true);
      const board = await fetch(`${cf.control.url}/queues/api/queues?activeQueue=host.acl-h1&status=completed&page=1&jobsPerPage=10`, { headers: { authorization: `Bearer ${cf.readToken}` } });
      assert.equal(board.status, 200, 'bull-board works with the control user');
    } finally {
      await cf.cleanup();
    }
  });

  it('the default user and wrong passwords get nothing', async () => {
    // Collects what the server said (rejections and error events) while using a connection.
    const said = async (url: string): Promise<string> => {
      const msgs: string[] = [];
      const r = new Redis(url, { maxRetriesPerRequest: 0, lazyConnect: true, enableReadyCheck: false, retryStrategy: () => null });
      r.on('error', (e) => msgs.push(e.message));
      conns.push(r);
      try {
        await r.connect();
        await r.get(`${P}:host.h1:wait`);
        msgs.push('allowed');
      } catch (err) {
        msgs.push((err as Error).message);
      }
      return msgs.join(' | ');
    };
    assert.match(await said(base), /NOAUTH|NOPERM/);
    assert.doesNotMatch(await said(base), /allowed/);
    assert.match(await said(credentialUrl(base, 'agent-h1', 'not-the-password')), /WRONGPASS/);
  });
});
