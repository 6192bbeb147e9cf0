/**
 * Relay mode: hosts without any Redis connection take their step jobs from their colo's relay
 * (a stage started with Redis). A supervised agent process converts through the relay while it is
 * SIGKILLed mid-step and at step boundaries (and reboots twice); a host token cannot take or
 * report another host's job; the relay stage restarted mid-sequence re-adopts the job it held and
 * the sequence continues.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdir, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { createHmac, randomBytes } from 'node:crypto';
import { Queue } from 'bullmq';
import { coloQueueName, convertSequence, formatRelayKeys, keys, parseRelayKeys, relayKeyToken, relayToken, type StepRoute } from '../../shared/protocol/index.js';
import { startFleetAgents } from '../../services/demo/fleet.js';
import { RelayTransport } from '../../services/relay/client.js';
import type { StageConfigInput } from '../../services/stage/config.js';
import { startStage } from '../../services/stage/main.js';
import { silentLogger } from '../../shared/log.js';
import { cli } from '../helpers/cli.js';
import { startTestFleet, type TestFleet, until } from '../helpers/fleet.js';

const BIN = fileURLToPath(new URL('../../services/cli/bin.js', import.meta.url));
const ROUTE: StepRoute = { transport: 'relay', queue: coloQueueName('c1') };

describe('relay mode', () => {
  let f: TestFleet;
  let queue: Queue;
  before(async () => {
    f = await startTestFleet({
      colos: [{ name: 'c1', hosts: 3 }],
      bundleMiB: 2,
      agents: false,
      relayColos: ['c1'],
      relayLockDurationMs: 4000,
      relayStalledIntervalMs: 1000,
      relayWaitSec: 5,
    });
    queue = new Queue(ROUTE.queue, { connection: f.redis, prefix: f.prefix });
  });
  after(async () => {
    await queue?.close();
    await f?.cleanup();
  });

  const seq = () => convertSequence({ name: f.base.name, version: f.base.version }, { name: f.target.name, version: f.target.version });
  const states = async (ids: string[]) => Promise.all(ids.map((id) => queue.getJobState(id)));
  const waitDone = (ids: string[], ms: number, onTick?: () => Promise<void>) =>
    until(
      async () => {
        await onTick?.();
        const s = await states(ids);
        assert.ok(!s.includes('failed'), `no step failed: ${JSON.stringify(s)}`);
        return s.every((x) => x === 'completed');
      },
      ms,
      'the sequence',
    );

  it('converts a host with no Redis connection, through kills and reboots', async (t) => {
    const host = f.hosts[0];
    const hooks = join(f.root, 'hooks');
    await mkdir(hooks, { recursive: true });
    const points = ['install-base:mid', 'capture-config:after', 'boot-base:before', 'install-target:mid'];
    for (const p of points) await writeFile(join(hooks, `${p}.arm`), '');
    const tokenFile = join(f.root, 'relay.token');
    await writeFile(tokenFile, `${relayToken({ kid: '1', secret: f.relaySecret }, 'c1', host.hostId)}\n`);
    const relayUrl = f.stages.c1[0].url;
    const sup: ChildProcess = spawn(
      process.execPath,
      [
        BIN, 'agent', '--supervise',
        '--host-id', host.hostId, '--colo', 'c1',
        '--relay', relayUrl, '--relay-token-file', tokenFile,
        '--machine', `sim:${host.dir}`, '--stages', relayUrl, '--origin', f.origin.url,
        '--trust-key', f.keys.files.releasePub, '--control-key', f.keys.files.controlPub, '--identity', f.keys.files.fleetIdentity,
        '--test-hook-dir', hooks, '--log-level', 'warn',
      ],
      { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, STAGECOACH_AGENT_RELAY_WAIT_SEC: '5' } },
    );
    let logs = '';
    sup.stderr!.on('data', (d: Buffer) => {
      logs += d.toString();
    });
    let ok = false;
    t.after(async () => {
      if (!ok) process.stderr.write(`--- agent logs ---\n${logs.slice(-20_000)}\n`);
      if (sup.exitCode === null && sup.signalCode === null) {
        const gone = new Promise((r) => sup.once('exit', r));
        sup.kill('SIGTERM');
        await gone;
      }
    });
    // The relay registers the host on its behalf, with transport relay.
    await until(async () => (await f.redis.hget(keys(f.prefix).relayAgent('c1', host.hostId), 'transport')) === '"relay"', 30_000, 'relay registration');
    const ids = await f.producer.enqueueSequence(host.hostId, 'rrelay1', seq());
    assert.ok(ids.every((id) => id.endsWith(`.${host.hostId}`)), 'relay job ids name the host');
    const killed: string[] = [];
    await waitDone(ids, 150_000, async () => {
      for (const name of (await readdir(hooks)).filter((n) => n.endsWith('.reached'))) {
        const point = name.slice(0, -'.reached'.length);
        if (killed.includes(point)) continue;
        const pid = Number((await readFile(join(hooks, name), 'utf8')).trim());
        if (!pid) continue;
        process.kill(pid, 'SIGKILL');
        killed.push(point);
      }
    });
    assert.deepEqual([...killed].sort(), [...points].sort(), 'killed at every armed point');
    const ins = await f.inspect(host.hostId);
    assert.deepEqual(ins.running, { id: 'ubuntu', version: '24.04', device: 'disk1p1' });
    assert.equal(ins.reboots, 2);
    const acts = await f.actions(host.hostId);
    const count = (op: string, device?: string) => acts.filter((a) => a.op === op && (device === undefined || a.device === device)).length;
    assert.equal(count('partition'), 1, 'no finished step ran twice');
    assert.equal(count('apply-config', 'disk2p1'), 1);
    assert.equal(count('set-boot-once', 'disk2p1'), 1);
    assert.equal(count('set-default', 'disk1p1'), 1);
    assert.equal(count('reboot'), 2);
    // Reports reached the shared stream through the relay.
    const reps = (await f.reports()).filter((r) => r.host === host.hostId && r.rollout === 'rrelay1');
    assert.equal(reps.filter((r) => r.event === 'completed').length, ids.length);
    // The host never had a Redis connection of its own.
    const clients = (await f.redis.client('LIST')) as string;
    assert.ok(!clients.includes(`name=agent:${host.hostId}`));
    ok = true;
  });

  it("refuses another host's token (401/403), and its jobs", async () => {
    const [, h2, h3] = f.hosts;
    const url = f.stages.c1[0].url;
    const ids = await f.producer.enqueueSequence(h3.hostId, 'rrelay2', seq(), { route: ROUTE });
    await until(async () => (f.stages.c1[0].relay()?.held ?? 0) >= 1, 10_000, 'the relay holds the job');
    const tok2 = relayToken({ kid: '1', secret: f.relaySecret }, 'c1', h2.hostId);
    const hdr = (tok: string | null, host: string) => ({
      ...(tok ? { authorization: `Bearer ${tok}` } : {}),
      'x-stagecoach-host': host,
      'content-type': 'application/json',
    });
    // h2's token for h3's queue: refused; a made-up token for h3: refused; no token: 401.
    let r = await fetch(`${url}/v1/relay/hosts/${h3.hostId}/next?wait=0`, { headers: hdr(tok2, h2.hostId) });
    assert.equal(r.status, 403);
    r = await fetch(`${url}/v1/relay/hosts/${h3.hostId}/next?wait=0`, { headers: hdr(tok2, h3.hostId) });
    assert.equal(r.status, 403);
    r = await fetch(`${url}/v1/relay/hosts/${h3.hostId}/next?wait=0`, { headers: hdr(null, h3.hostId) });
    assert.equal(r.status, 401);
    // h2 reporting h3's job: refused, and the job is untouched.
    for (const what of ['complete', 'fail', 'progress']) {
      r = await fetch(`${url}/v1/relay/jobs/${ids[0]}/${what}`, { method: 'POST', headers: hdr(tok2, h2.hostId), body: JSON.stringify({ result: {} }) });
      assert.equal(r.status, 403, what);
    }
    // h2 polling its own (empty) queue gets nothing of h3's.
    r = await fetch(`${url}/v1/relay/hosts/${h2.hostId}/next?wait=0`, { headers: hdr(tok2, h2.hostId) });
    assert.equal(r.status, 204);
    assert.equal(await queue.getJobState(ids[0]), 'active');
    // h3's own token gets it.
    r = await fetch(`${url}/v1/relay/hosts/${h3.hostId}/next?wait=0`, { headers: hdr(relayToken({ kid: '1', secret: f.relaySecret }, 'c1', h3.hostId), h3.hostId) });
    assert.equal(r.status, 200);
    const body = (await r.json()) as { job: { id: string; data: { payload: { host: string } } } };
    assert.equal(body.job.id, ids[0]);
    assert.equal(body.job.data.payload.host, h3.hostId);
    await queue.obliterate({ force: true }).catch(() => {});
  });

  it("checks a host's registration fields: typed and bounded, unknown keys dropped, nothing written when malformed", async () => {
    // A host of the colo that runs no agent here, so no other test sees its record.
    const id = 'c1-fields';
    const url = f.stages.c1[0].url;
    const headers = { authorization: `Bearer ${relayToken({ kid: '1', secret: f.relaySecret }, 'c1', id)}`, 'x-stagecoach-host': id, 'content-type': 'application/json' };
    const beat = (fields: unknown) => fetch(`${url}/v1/relay/hosts/${id}/heartbeat`, { method: 'POST', headers, body: JSON.stringify({ fields }) });
    const key = keys(f.prefix).relayAgent('c1', id);
    let r = await beat({ state: 'idle', ip: '10.9.9.9', junk: 'x'.repeat(10_000), hostId: 'someone-else' });
    assert.equal(r.status, 204);
    assert.equal(await f.redis.hget(key, 'ip'), '"10.9.9.9"');
    assert.equal(await f.redis.hget(key, 'junk'), null, 'unknown keys are dropped');
    assert.equal(await f.redis.hget(key, 'hostId'), JSON.stringify(id), "the host id is the token's");
    for (const bad of [{ ip: 42 }, { running: 'debian' }, { stages: Array(40).fill('http://s') }, { state: 'x'.repeat(100) }, 'a string']) {
      r = await beat(bad);
      assert.equal(r.status, 400, JSON.stringify(bad).slice(0, 60));
      assert.equal(((await r.json()) as { error: { code: string } }).error.code, 'SC_ERR_BAD_REQUEST');
    }
    assert.equal(await f.redis.hget(key, 'ip'), '"10.9.9.9"', 'a malformed heartbeat writes nothing');
  });

  it("answers bad requests on the relay's paths as the rest of the stage does, and counts them by route", async () => {
    // The relay runs on its own router in front of the stage's express app (services/stage/server.ts):
    // its refusals, malformed bodies and unknown paths must still get the stage's one error shape.
    const id = 'c1-edges';
    const url = f.stages.c1[0].url;
    const auth = { authorization: `Bearer ${relayToken({ kid: '1', secret: f.relaySecret }, 'c1', id)}`, 'x-stagecoach-host': id };
    const refused = async (r: Response, status: number, code: string) => {
      assert.equal(r.status, status, code);
      assert.match(r.headers.get('content-type') ?? '', /^application\/json; charset=utf-8$/);
      assert.equal(r.headers.get('cache-control'), 'no-store');
      assert.equal(((await r.json()) as { error: { code: string } }).error.code, code);
    };
    const beat = (body: string, headers: Record<string, string> = auth) =>
      fetch(`${url}/v1/relay/hosts/${id}/heartbeat`, { method: 'POST', headers: { ...headers, 'content-type': 'application/json' }, body });
    await refused(await beat('{"fields": '), 400, 'SC_ERR_BAD_REQUEST');
    await refused(await beat(JSON.stringify({ fields: { state: 'idle' }, pad: 'x'.repeat(300_000) })), 413, 'SC_ERR_TOO_LARGE');
    await refused(await beat('{}', {}), 401, 'SC_ERR_UNAUTHORIZED');
    await refused(await fetch(`${url}/v1/relay/hosts/c1-other/next?wait=0`, { headers: auth }), 403, 'SC_ERR_FORBIDDEN');
    await refused(await fetch(`${url}/v1/relay/jobs/x/complete`, { method: 'POST', headers: { ...auth, 'content-type': 'application/json' }, body: '{}' }), 409, 'SC_ERR_CONFLICT');
    await refused(await fetch(`${url}/v1/relay/hosts/${id}/nope`, { headers: auth }), 400, 'SC_ERR_BAD_PATH');
    await refused(await fetch(`${url}/v1/relay/HOSTS/${id}/next?wait=0`, { headers: auth }), 400, 'SC_ERR_BAD_PATH');
    // A poll with nothing held answers 204 after its wait; a well-formed heartbeat is written.
    const t0 = Date.now();
    const polled = await fetch(`${url}/v1/relay/hosts/${id}/next?wait=1`, { headers: auth });
    assert.equal(polled.status, 204);
    assert.ok(Date.now() - t0 >= 900, 'the poll waited its second');
    assert.equal((await beat(JSON.stringify({ fields: { state: 'idle' } }))).status, 204);
    assert.equal(await f.redis.hget(keys(f.prefix).relayAgent('c1', id), 'state'), '"idle"');
    // The stage's request counter labels relay requests with their route, as it labels the read API's.
    const metrics = await (await fetch(`${url}/metrics`)).text();
    const count = (route: string, status: string) =>
      Number(new RegExp(`stage_http_requests_total\\{[^}]*method="[A-Z]+",route="${route.replace(/[/:]/g, (c) => `\\${c}`)}",status="${status}"[^}]*\\} (\\d+)`).exec(metrics)?.[1] ?? 0);
    assert.ok(count('/hosts/:id/next', '204') >= 1, 'polls are counted by route');
    assert.ok(count('/hosts/:id/heartbeat', '400') >= 1, 'refused heartbeats are counted by route');
  });

  it('accepts a token only at its own colo, under a key id it knows: two during a rotation', async () => {
    const dir = join(f.root, 'rotation');
    await mkdir(dir, { recursive: true });
    const old = { kid: '1', secret: f.relaySecret };
    const next = { kid: '2', secret: randomBytes(32).toString('hex') };
    const secrets = join(dir, 'relay.secrets');
    await writeFile(secrets, `# current first\n${next.kid}:${next.secret}\n${old.kid}:${old.secret}\n`, { mode: 0o600 });
    // The stage of colo c9 (no hosts, so it takes no one's jobs) gets c9's keys only, from the CLI.
    const file = join(dir, 'c9.keys');
    const made = await cli(['acl', 'relay-key', '--secret-file', secrets, '--colo', 'c9', '--out', file]);
    assert.equal(made.code, 0, made.stderr);
    assert.equal((await stat(file)).mode & 0o777, 0o600);
    const text = await readFile(file, 'utf8');
    assert.equal(text, formatRelayKeys([next, old], 'c9'));
    assert.match(text, /^2:[0-9a-f]{64}\n1:[0-9a-f]{64}\n$/, 'one KID:HEXKEY line per secret, current first');
    assert.ok(!text.includes(next.secret) && !text.includes(old.secret), 'no fleet secret in a key file');
    const printed = await cli(['acl', 'relay-key', '--secret-file', secrets, '--colo', 'c9']);
    assert.equal(printed.stdout, text);
    const stage = await startStage(
      { listen: '127.0.0.1:0', upstreams: [f.origin.url], cache: join(dir, 'cache'), colo: 'c9', logLevel: 'silent', redis: f.redisUrl, prefix: f.prefix, relayKeyFile: file },
      { log: silentLogger },
    );
    try {
      const poll = async (token: string) =>
        (await fetch(`${stage.url}/v1/relay/hosts/h-rot/next?wait=0`, { headers: { authorization: `Bearer ${token}`, 'x-stagecoach-host': 'h-rot' } })).status;
      assert.equal(await poll(relayToken(next, 'c9', 'h-rot')), 204, 'the current key');
      assert.equal(await poll(relayToken(old, 'c9', 'h-rot')), 204, 'the previous key, during the rotation');
      assert.equal(await poll(relayToken(old, 'c1', 'h-rot')), 403, "another colo's token");
      assert.equal(await poll(relayToken(next, 'c1', 'h-rot')), 403, "another colo's token under the current key");
      assert.equal(await poll(relayToken({ kid: '3', secret: next.secret }, 'c9', 'h-rot')), 403, 'an unknown key id');
      assert.equal(await poll(relayToken(next, 'c9', 'h-rot2')), 403, "another host's token");
      const legacy = createHmac('sha256', old.secret).update('h-rot').digest('hex');
      assert.equal(await poll(legacy), 403, 'a token without key id and colo');
      assert.notEqual(relayToken(old, 'c9', 'h-rot'), relayToken(old, 'c1', 'h-rot'));
      // What the c9 stage holds mints c9 tokens and no other colo's.
      const held = parseRelayKeys(text);
      assert.equal(relayKeyToken(held[0], 'h-rot'), relayToken(next, 'c9', 'h-rot'));
      assert.notEqual(relayKeyToken(held[0], 'h-rot'), relayToken(next, 'c1', 'h-rot'));
    } finally {
      await stage.close();
    }
  });

  it('refuses a bad relay key file without echoing key material', async () => {
    const dir = join(f.root, 'badkeys');
    await mkdir(dir, { recursive: true });
    const key = randomBytes(32).toString('hex');
    const bad = [
      { text: `1:${key.slice(0, 62)}\n`, want: /line 1: a relay key must be 64 hex digits/ },
      { text: `# c9\n\n1:${key}zz\n`, want: /line 3: a relay key must be 64 hex digits/ },
      { text: `1:${key}\nbad.kid:${key}\n`, want: /line 2: a key id must be/ },
      { text: `1:${key}\n1:${key}\n`, want: /line 2: key id 1 appears twice/ },
      { text: `${key}\n`, want: /line 1: expected KID:HEXKEY/ },
      { text: `1:${f.relaySecret}-not-hex\n`, want: /line 1: a relay key must be 64 hex digits/ },
      { text: '# nothing\n', want: /holds no relay key/ },
    ];
    for (const [i, b] of bad.entries()) {
      const file = join(dir, `k${i}`);
      await writeFile(file, b.text, { mode: 0o600 });
      await assert.rejects(
        startStage(
          { listen: '127.0.0.1:0', upstreams: [f.origin.url], cache: join(dir, 'cache'), colo: 'c9', logLevel: 'silent', redis: f.redisUrl, prefix: f.prefix, relayKeyFile: file },
          { log: silentLogger },
        ),
        (err: Error & { code?: string }) => {
          assert.equal(err.code, 'SC_ERR_BAD_CONFIG', err.message);
          assert.match(err.message, b.want);
          assert.ok(err.message.includes(file), `names the file: ${err.message}`);
          assert.ok(!err.message.includes(key.slice(0, 16)) && !err.message.includes(f.relaySecret.slice(0, 16)), `no key material: ${err.message}`);
          return true;
        },
      );
    }
    await assert.rejects(
      startStage({ listen: '127.0.0.1:0', upstreams: [f.origin.url], cache: join(dir, 'cache'), colo: 'c9', logLevel: 'silent', redis: f.redisUrl, prefix: f.prefix }, { log: silentLogger }),
      /--relay-key-file/,
    );
  });

  it('refuses the fleet secret (--relay-secret-file, relaySecret) with the way to a colo key file', async () => {
    const dir = join(f.root, 'nosecret');
    await mkdir(dir, { recursive: true });
    const secrets = join(dir, 'relay.secrets');
    await writeFile(secrets, `1:${f.relaySecret}\n`, { mode: 0o600 });
    const r = await cli(
      ['stage', '--listen', '127.0.0.1:0', '--upstream', f.origin.url, '--cache', join(dir, 'cache'), '--colo', 'c9', '--redis', f.redisUrl, '--prefix', f.prefix, '--relay-secret-file', secrets],
      { timeoutMs: 20_000 },
    );
    assert.notEqual(r.code, 0);
    assert.equal(r.timedOut, false, 'refused at once, not started');
    assert.match(r.stderr, /SC_ERR_BAD_CONFIG/);
    assert.match(r.stderr, /stagecoach acl relay-key/);
    assert.match(r.stderr, /--relay-key-file/);
    assert.ok(!r.stderr.includes(f.relaySecret), 'the secret is not echoed');
    const inProcess = { listen: '127.0.0.1:0', upstreams: [f.origin.url], cache: join(dir, 'cache'), colo: 'c9', logLevel: 'silent', redis: f.redisUrl, prefix: f.prefix, relaySecret: f.relaySecret };
    await assert.rejects(startStage(inProcess as unknown as StageConfigInput, { log: silentLogger }), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'SC_ERR_BAD_CONFIG');
      assert.match(err.message, /stagecoach acl relay-key/);
      assert.ok(!err.message.includes(f.relaySecret), 'the secret is not echoed');
      return true;
    });
  });

  it("sends a step's log lines with its completion, not one request each", async () => {
    const [, h2] = f.hosts;
    const stage = f.stages.c1[0];
    const ids = await f.producer.enqueueSequence(h2.hostId, 'rrelay4', seq(), { route: ROUTE });
    const t = new RelayTransport({ hostId: h2.hostId, relays: [stage.url], token: relayToken({ kid: '1', secret: f.relaySecret }, 'c1', h2.hostId), logger: silentLogger, waitSec: 5 });
    try {
      const job = await until(async () => (await t.next()) ?? null, 20_000, 'the first job');
      assert.equal(job.id, ids[0]);
      const posts = async (route: string) => {
        const m = new RegExp(`^stage_http_requests_total\\{[^}]*method="POST"[^}]*route="${route}"[^}]*\\} (\\d+)`, 'gm');
        let n = 0;
        for (const x of (await stage.metrics.metrics()).matchAll(m)) n += Number(x[1]);
        return n;
      };
      const before = await posts('/jobs/:jobId/progress');
      await t.log(job, 'line one');
      await t.log(job, 'line two');
      await t.complete(job, {}, { rollout: 'rrelay4', seq: 0, step: job.name, event: 'completed' });
      assert.equal(await posts('/jobs/:jobId/progress'), before, 'no request of their own for the log lines');
      assert.deepEqual((await queue.getJobLogs(job.id)).logs, ['line one', 'line two']);
      assert.equal(await queue.getJobState(job.id), 'completed');
    } finally {
      await t.close();
      await queue.obliterate({ force: true }).catch(() => {});
    }
  });

  it('continues the sequence when the relay stage restarts with a job in flight', async () => {
    const host = f.hosts[1];
    const start = () =>
      startFleetAgents([host], {
        redisUrl: f.redisUrl,
        prefix: f.prefix,
        keys: f.keys,
        stages: { c1: f.stages.c1.map((s) => s.url) },
        origin: f.origin.url,
        relayColos: ['c1'],
        relaySecret: f.relaySecret,
        relayWaitSec: 5,
      });
    let agents = await start();
    try {
      await until(async () => (await f.redis.hget(keys(f.prefix).relayAgent('c1', host.hostId), 'transport')) === '"relay"', 30_000, 'registration');
      const ids = await f.producer.enqueueSequence(host.hostId, 'rrelay3', seq());
      await until(async () => (await states(ids)).filter((s) => s === 'completed').length >= 3, 60_000, 'three steps done');
      // The host goes away in the middle of its sequence (its step aborted, as in a crash): the
      // relay holds the next job. Then the relay stage restarts.
      await agents.stop();
      await until(async () => (f.stages.c1[0].relay()?.held ?? 0) >= 1, 10_000, 'the relay holds the next job');
      assert.ok((await states(ids)).includes('active'));
      await f.restartStages('c1');
      assert.ok((f.stages.c1[0].relay()?.held ?? 0) >= 1, 'the restarted relay re-adopted the job at once (same colo lock token)');
      agents = await start();
      await waitDone(ids, 120_000);
      const ins = await f.inspect(host.hostId);
      assert.deepEqual(ins.running, { id: 'ubuntu', version: '24.04', device: 'disk1p1' });
      const acts = await f.actions(host.hostId);
      assert.equal(acts.filter((a) => a.op === 'partition').length, 1);
      assert.equal(acts.filter((a) => a.op === 'reboot').length, 2);
      // The step's log lines reached the job (batched onto the host's later requests), in order.
      const { logs } = await queue.getJobLogs(ids[0]);
      const iSources = logs.findIndex((l) => l.startsWith('sources: '));
      const iVerified = logs.findIndex((l) => /bytes verified from/.test(l));
      assert.ok(iSources >= 0 && iVerified > iSources, `fetch logs: ${JSON.stringify(logs)}`);
    } finally {
      await agents.stop();
    }
  });
});
