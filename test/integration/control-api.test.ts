/**
 * Control API without agents: tokens (401/403), validation (400 with codes), manifest checks at
 * the origin (404/422), the audit log, inventory, preheat against a real stage, the jobs a
 * rollout enqueues (signed, in order, within maxInFlight), pause/resume/abort and host ops.
 * Hosts are registrations written the way agents write them; no step ever runs here.
 */
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Queue } from 'bullmq';
import { keys, verifyStepJob } from '../../shared/protocol/index.js';
import type { RunningControl } from '../../services/control/main.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import { isScError } from '../../shared/errors.js';
import { silentLogger } from '../../shared/log.js';
import { controlFixture, type ControlFixture, deletePrefix, keyPair, publishDummy, until } from './control-fixture.js';

describe('control API', () => {
  let f: ControlFixture;
  let c: RunningControl;
  let stage: RunningStage;
  const stageToken = 'stage-secret-token';

  before(async () => {
    f = await controlFixture();
    writeFileSync(join(f.dir, 'stage-token'), `${stageToken}\n`);
    mkdirSync(join(f.dir, 'stage-cache'));
    stage = await startStage(
      { listen: '127.0.0.1:0', upstreams: [f.origin.url], cache: join(f.dir, 'stage-cache'), colo: 'east', token: stageToken, logLevel: 'silent' },
      { log: silentLogger },
    );
    for (const [h, colo] of [
      ['h1', 'east'],
      ['h2', 'east'],
      ['h3', 'west'],
      ['h4', 'west'],
    ]) {
      await f.register(h, colo);
    }
    c = await f.start({ stages: [`east=${stage.url}`], stageTokenFile: join(f.dir, 'stage-token') });
  });
  after(async () => {
    await f?.cleanup();
    await stage?.close();
  });

  const create = (body: unknown, token?: string, actor?: string) => f.call(c.url, 'POST', '/v1/rollouts', { token: token ?? f.tokens.ops, body, actor });

  it('refuses writes without a token (401) or with a wrong one (403)', async () => {
    const body = { base: 'rescue@1.0', target: 'debian@12.1', hosts: ['h1'] };
    let r = await f.call(c.url, 'POST', '/v1/rollouts', { body });
    assert.equal(r.status, 401);
    assert.equal(r.body.error.code, 'SC_ERR_UNAUTHORIZED');
    r = await f.call(c.url, 'POST', '/v1/rollouts', { body, token: 'nope' });
    assert.equal(r.status, 403);
    assert.equal(r.body.error.code, 'SC_ERR_FORBIDDEN');
    for (const p of ['/v1/rollouts/r-x/pause', '/v1/rollouts/r-x/resume', '/v1/rollouts/r-x/abort', '/v1/hosts/h1/rescue', '/v1/hosts/h1/reinstall', '/v1/hosts/h1/install']) {
      assert.equal((await f.call(c.url, 'POST', p, {})).status, 401, p);
      assert.equal((await f.call(c.url, 'POST', p, { token: `${f.tokens.ops}x` })).status, 403, p);
    }
    assert.equal((await f.call(c.url, 'GET', '/v1/whoami', { token: f.tokens.ci })).body.token, 'ci');
    assert.equal((await f.call(c.url, 'GET', '/v1/audit')).body.entries.length, 0, 'refused writes are not audited');
  });

  it('reads need a token: a read-only token reads everything and writes nothing', async () => {
    for (const p of ['/v1/hosts', '/v1/hosts/h1', '/v1/colos', '/v1/rollouts', '/v1/ops', '/v1/audit', '/v1/whoami', '/v1/events', '/queues']) {
      const r = await f.call(c.url, 'GET', p, { token: null });
      assert.equal(r.status, 401, p);
      assert.equal((await f.call(c.url, 'GET', p, { token: 'nope' })).status, 403, p);
    }
    const hosts = await f.call(c.url, 'GET', '/v1/hosts', { token: f.tokens.viewer });
    assert.equal(hosts.status, 200);
    assert.equal(hosts.body.hosts.length, 4);
    assert.equal((await f.call(c.url, 'GET', '/v1/hosts', { token: f.tokens.ops })).status, 200, 'a write token reads too');
    assert.deepEqual((await f.call(c.url, 'GET', '/v1/whoami', { token: f.tokens.viewer })).body, { token: 'viewer', role: 'read', actor: 'viewer' });
    assert.equal((await f.call(c.url, 'GET', '/v1/whoami', { token: f.tokens.ops })).body.role, 'write');
    const w = await create({ base: 'rescue@1.0', target: 'debian@12.1', hosts: ['h1'] }, f.tokens.viewer);
    assert.equal(w.status, 403);
    assert.match(w.body.error.message, /read-only/);
    assert.equal((await f.call(c.url, 'POST', '/v1/hosts/h1/rescue', { token: f.tokens.viewer })).status, 403);
    assert.equal((await f.call(c.url, 'GET', '/v1/audit')).body.entries.length, 0, 'refused writes are not audited');
    // bull-board: HTTP Basic with the token as password (a browser sends it with the board's own requests).
    const basic = (t: string) => `Basic ${Buffer.from(`anyone:${t}`).toString('base64')}`;
    let r = await fetch(`${c.url}/queues`);
    assert.equal(r.status, 401);
    assert.match(r.headers.get('www-authenticate') ?? '', /^Basic realm=/);
    r = await fetch(`${c.url}/queues/api/queues?page=1&jobsPerPage=1`, { headers: { authorization: basic(f.tokens.viewer) } });
    assert.equal(r.status, 200);
    r = await fetch(`${c.url}/queues/api/queues/host.h1/clean/completed`, { method: 'PUT', headers: { authorization: basic(f.tokens.viewer) } });
    assert.equal(r.status, 403, "a read token cannot use the board's job actions");
    // The page itself, health and metrics stay open by default.
    for (const p of ['/', '/healthz', '/metrics']) assert.equal((await f.call(c.url, 'GET', p, { token: null })).status, 200, p);
  });

  it('openReads opens the reads and metricsToken closes /metrics', async () => {
    // Its own prefix: one control runs per prefix.
    const lab = await f.start({ openReads: true, metricsToken: true, prefix: `${f.prefix}-lab` });
    assert.equal((await f.call(lab.url, 'GET', '/v1/hosts', { token: null })).status, 200);
    assert.equal((await f.call(lab.url, 'POST', '/v1/hosts/h1/rescue', { token: null })).status, 401, 'writes still need a token');
    assert.equal((await f.call(lab.url, 'GET', '/metrics', { token: null })).status, 401);
    assert.equal((await f.call(lab.url, 'GET', '/metrics', { token: f.tokens.viewer })).status, 200);
    await lab.close();
    await deletePrefix(f.redis, `${f.prefix}-lab`);
  });

  it('validates rollout requests with codes', async () => {
    let r = await create({ base: 'rescue@1.0', target: 'debian@12.1' });
    assert.equal(r.status, 400);
    assert.equal(r.body.error.code, 'SC_ERR_BAD_REQUEST');
    r = await create({ base: 'rescue@1.0', target: 'debian@12.1', hosts: ['h1'], plan: { waves: ['150%'] } });
    assert.equal(r.status, 400);
    assert.match(JSON.stringify(r.body.error.details.issues), /waves/);
    r = await f.call(c.url, 'POST', '/v1/rollouts', { token: f.tokens.ops, body: undefined });
    assert.equal(r.status, 400);
    r = await create({ base: 'rescue@1.0', target: 'debian@12.1', hosts: ['h1', 'ghost'] });
    assert.equal(r.status, 400);
    assert.deepEqual(r.body.error.details.unknownHosts, ['ghost']);
    r = await create({ base: 'rescue@1.0', target: 'debian@12.1', colos: ['nowhere'] });
    assert.equal(r.status, 400);
    r = await create({ base: 'rescue@9.9', target: 'debian@12.1', hosts: ['h1'] });
    assert.equal(r.status, 404);
    assert.equal(r.body.error.code, 'SC_ERR_MANIFEST_NOT_FOUND');
    r = await create({ base: 'debian@12.1', target: 'debian@12.1', hosts: ['h1'] });
    assert.equal(r.status, 400, 'a target bundle is not a base');
    // Signed by a key control does not trust.
    const other = keyPair(f.dir, 'other');
    await publishDummy(f.origin, other.priv, 'debian', '13.0', 'target');
    r = await create({ base: 'rescue@1.0', target: 'debian@13.0', hosts: ['h1'] });
    assert.equal(r.status, 422);
    assert.equal(r.body.error.code, 'SC_ERR_UNTRUSTED_KEY');
    assert.equal((await f.call(c.url, 'GET', '/v1/rollouts')).body.rollouts.length, 0);
  });

  it('shows inventory: hosts with liveness and colos with their stage', async () => {
    const hosts = (await f.call(c.url, 'GET', '/v1/hosts')).body.hosts;
    assert.deepEqual(
      hosts.map((h: { hostId: string }) => h.hostId),
      ['h1', 'h2', 'h3', 'h4'],
    );
    assert.equal(hosts[0].stale, false);
    assert.equal(hosts[0].running.id, 'debian');
    const west = (await f.call(c.url, 'GET', '/v1/hosts?colo=west')).body.hosts;
    assert.equal(west.length, 2);
    assert.equal((await f.call(c.url, 'GET', '/v1/hosts?colo=../x')).status, 400);
    assert.equal((await f.call(c.url, 'GET', '/v1/hosts/h9')).status, 404);
    const colos = (await f.call(c.url, 'GET', '/v1/colos')).body.colos;
    assert.deepEqual(
      colos.map((x: { colo: string; hosts: number }) => [x.colo, x.hosts]),
      [
        ['east', 2],
        ['west', 2],
      ],
    );
    assert.equal(colos[0].stages[0].url, stage.url);
    assert.equal(colos[0].stages[0].ok, true);
    assert.deepEqual(colos[1].stages, []);
  });

  let rid: string;
  it('accepts a rollout, preheats the stage, enqueues signed jobs within maxInFlight', async () => {
    const r = await create(
      { base: 'rescue@1.0', target: 'debian@12.1', colos: ['east', 'west'], plan: { maxInFlight: 1, canary: 1, failureBudget: '25%' } },
      f.tokens.ops,
      'alice',
    );
    assert.equal(r.status, 201, JSON.stringify(r.body));
    rid = r.body.spec.id;
    assert.match(rid, /^r-[a-z0-9]+-[0-9a-f]{6}$/);
    assert.deepEqual(r.body.spec.waves, [['h1'], ['h3', 'h2', 'h4']]);
    assert.equal(r.body.spec.budget, 1);
    assert.equal(r.body.spec.blobs.base, f.base.blob.digest);

    // Preheat: east has a stage (fills B and C), west has none (skipped).
    const v = await until('preheat of east', async () => {
      const x = (await f.call(c.url, 'GET', `/v1/rollouts/${rid}`)).body;
      return x.preheat.east?.state === 'done' ? x : null;
    });
    assert.deepEqual(v.preheat.east.stages[0].digests[f.base.blob.digest].state, 'committed');
    assert.deepEqual(v.preheat.east.stages[0].digests[f.target.blob.digest].state, 'committed');
    const fills = stage.fills();
    assert.ok(fills.some((x) => x.digest === f.target.blob.digest && x.state === 'committed'));

    // The canary h1 has its whole signed sequence, in order; nobody else has anything.
    const q1 = new Queue('host.h1', { connection: f.redis, prefix: f.prefix });
    const q2 = new Queue('host.h2', { connection: f.redis, prefix: f.prefix });
    try {
      const first = await until('h1 fetch job', () => q1.getJob(`${rid}.0.fetch`));
      const p = verifyStepJob(first.data, 'h1', f.control.pub, Date.now());
      assert.equal(p.step, 'fetch');
      assert.deepEqual(p.args.target, { name: 'debian', version: '12.1' });
      assert.equal(await first.getState(), 'waiting');
      assert.equal(await (await q1.getJob(`${rid}.10.verify`))!.getState(), 'waiting-children');
      assert.equal(await q2.count(), 0);
    } finally {
      await q1.close();
      await q2.close();
    }
    const h = v.hosts.find((x: { host: string }) => x.host === 'h1');
    assert.equal(h.status, 'queued');
    assert.equal(v.status.counts.inFlight, 1);
    assert.equal(v.status.counts.pending, 3);

    // Colos now show the stage's numbers from /v1/fills and /metrics.
    const colos = await until('stage numbers', async () => {
      const x = (await f.call(c.url, 'GET', '/v1/colos')).body.colos;
      return x[0].stages[0].fillsCommitted >= 2 ? x : null;
    });
    assert.ok(colos[0].stages[0].upstreamBytes >= f.base.blob.size + f.target.blob.size);

    // Hosts show control's view of their work.
    const hosts = (await f.call(c.url, 'GET', '/v1/hosts')).body.hosts;
    assert.deepEqual(hosts[0].work, { kind: 'rollout', id: rid, status: 'queued', step: null });
  });

  it('refuses a second rollout or a host op on hosts already in work (409)', async () => {
    let r = await create({ base: 'rescue@1.0', target: 'debian@12.1', hosts: ['h2'] });
    assert.equal(r.status, 409);
    assert.equal(r.body.error.code, 'SC_ERR_CONFLICT');
    r = await f.call(c.url, 'POST', '/v1/hosts/h1/rescue', { token: f.tokens.ops });
    assert.equal(r.status, 409);
  });

  it('pauses, resumes and aborts (abort flags in-flight hosts, skips the rest)', async () => {
    let r = await f.call(c.url, 'POST', `/v1/rollouts/${rid}/pause`, { token: f.tokens.ops });
    assert.equal(r.status, 200);
    assert.equal(r.body.status.state, 'paused');
    assert.equal(r.body.status.pauseReason, 'operator');
    r = await f.call(c.url, 'POST', `/v1/rollouts/${rid}/pause`, { token: f.tokens.ops });
    assert.equal(r.status, 409);
    r = await f.call(c.url, 'POST', `/v1/rollouts/${rid}/resume`, { token: f.tokens.ci, actor: 'bob' });
    assert.equal(r.body.status.state, 'running');
    r = await f.call(c.url, 'POST', `/v1/rollouts/${rid}/abort`, { token: f.tokens.ops });
    assert.equal(r.status, 200);
    assert.equal(r.body.status.state, 'aborting');
    assert.equal(await f.redis.hget(keys(f.prefix).hostctl('h1'), 'abort'), rid);
    const v = (await f.call(c.url, 'GET', `/v1/rollouts/${rid}`)).body;
    assert.deepEqual(
      v.hosts.map((h: { host: string; status: string }) => `${h.host}:${h.status}`),
      ['h1:queued', 'h3:skipped', 'h2:skipped', 'h4:skipped'],
    );
    assert.equal((await f.call(c.url, 'POST', '/v1/rollouts/r-nope-000000/pause', { token: f.tokens.ops })).status, 404);
    assert.equal((await f.call(c.url, 'GET', '/v1/rollouts/r-nope-000000')).status, 404);
    assert.equal((await f.call(c.url, 'GET', '/v1/rollouts/..%2f')).status, 404);
  });

  it('starts host operations (rescue, install) and refuses bad ones', async () => {
    let r = await f.call(c.url, 'POST', '/v1/hosts/h9/rescue', { token: f.tokens.ops });
    assert.equal(r.status, 404);
    r = await f.call(c.url, 'POST', '/v1/hosts/h3/install', { token: f.tokens.ops, body: {} });
    assert.equal(r.status, 400);
    r = await f.call(c.url, 'POST', '/v1/hosts/h3/install', { token: f.tokens.ops, body: { bundle: 'debian@99' } });
    assert.equal(r.status, 404);
    r = await f.call(c.url, 'POST', '/v1/hosts/BAD!/rescue', { token: f.tokens.ops });
    assert.equal(r.status, 400);
    r = await f.call(c.url, 'POST', '/v1/hosts/h3/rescue', { token: f.tokens.ops, actor: 'carol' });
    assert.equal(r.status, 202);
    assert.equal(r.body.kind, 'rescue');
    assert.deepEqual(r.body.steps, ['rescue']);
    const opId = r.body.id;
    const q3 = new Queue('host.h3', { connection: f.redis, prefix: f.prefix });
    try {
      const job = await until('rescue job', () => q3.getJob(`${opId}.0.rescue`));
      assert.equal(verifyStepJob(job.data, 'h3', f.control.pub, Date.now()).step, 'rescue');
    } finally {
      await q3.close();
    }
    r = await f.call(c.url, 'POST', '/v1/hosts/h4/install', { token: f.tokens.ops, body: { bundle: 'debian@12.1' } });
    assert.equal(r.status, 202);
    assert.deepEqual(r.body.steps, ['rescue', 'fetch-other', 'wipe-target-disk', 'install-target', 'boot-target', 'verify']);
    assert.equal((await f.call(c.url, 'GET', `/v1/ops/${opId}`)).body.host, 'h3');
    assert.equal((await f.call(c.url, 'GET', '/v1/ops')).body.ops.length, 2);
  });

  it('records every accepted write in the audit log', async () => {
    const entries = (await f.call(c.url, 'GET', '/v1/audit')).body.entries;
    const summary = entries.map((e: { action: string; actor: string; token: string }) => `${e.action} ${e.actor} ${e.token}`).reverse();
    assert.deepEqual(summary, [
      'rollout.create alice ops',
      'rollout.pause ops ops',
      'rollout.resume bob ci',
      'rollout.abort ops ops',
      'host.rescue carol ops',
      'host.install ops ops',
    ]);
    assert.equal(entries[entries.length - 1].target, rid);
    assert.ok(!JSON.stringify(entries).includes(f.tokens.ops), 'no token in the audit log');
    const older = (await f.call(c.url, 'GET', `/v1/audit?limit=2&before=${entries[1].id}`)).body.entries;
    assert.deepEqual(
      older.map((e: { id: string }) => e.id),
      [entries[2].id, entries[3].id],
    );
    assert.equal((await f.call(c.url, 'POST', '/v1/hosts/h3/rescue', { token: f.tokens.ops, actor: 'bad/actor' })).status, 400);
  });

  it('refuses a second control instance on the same prefix (lease)', async () => {
    await assert.rejects(f.start(), (err) => isScError(err, 'SC_ERR_CONFLICT') && /another control instance/.test(err.message));
    assert.equal((await f.call(c.url, 'GET', '/healthz')).body.ok, true, 'the first one runs on');
  });

  it('serves the dashboard, bull-board, health and metrics', async () => {
    const page = await f.call(c.url, 'GET', '/');
    assert.equal(page.status, 200);
    assert.match(String(page.body), /<title>stagecoach/);
    const board = await f.call(c.url, 'GET', '/queues');
    assert.equal(board.status, 200);
    assert.equal((await f.call(c.url, 'GET', '/healthz')).body.ok, true);
    const metrics = String((await f.call(c.url, 'GET', '/metrics')).body);
    assert.match(metrics, /control_rollouts_active/);
    assert.match(metrics, /control_rollout_hosts{status="skipped",component="control"} 3/);
    assert.equal((await f.call(c.url, 'GET', '/v1/nothing')).status, 404);
  });
});

describe('control: a silent host times out', () => {
  let f: ControlFixture;
  after(async () => {
    await f?.cleanup();
  });

  it('fails a host in flight that reports nothing for hostTimeoutSec, and flags it to stop', async () => {
    f = await controlFixture();
    await f.register('lost1', 'east');
    let skew = 0;
    const c = await f.start({ hostTimeoutSec: 60 }, { now: () => Date.now() + skew });
    const r = await f.call(c.url, 'POST', '/v1/rollouts', { token: f.tokens.ops, body: { base: 'rescue@1.0', target: 'debian@12.1', hosts: ['lost1'] } });
    assert.equal(r.status, 201);
    const id = r.body.spec.id;
    await until('queued', async () => (await f.call(c.url, 'GET', `/v1/rollouts/${id}`)).body.hosts[0].status === 'queued');
    assert.equal((await f.call(c.url, 'GET', `/v1/rollouts/${id}`)).body.preheat.east.state, 'skipped');
    skew = 61_000;
    const v = await until('timed out', async () => {
      const x = (await f.call(c.url, 'GET', `/v1/rollouts/${id}`)).body;
      return x.status.state === 'failed' ? x : null;
    });
    assert.equal(v.hosts[0].status, 'failed');
    assert.equal(v.hosts[0].error.code, 'SC_ERR_TIMEOUT');
    assert.equal(await f.redis.hget(keys(f.prefix).hostctl('lost1'), 'abort'), id);
  });
});
