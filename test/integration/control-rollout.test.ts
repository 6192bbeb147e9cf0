/**
 * A 2-colo, 6-host rollout of real sim hosts converges: canary first, waves in order, never
 * more hosts in flight than maxInFlight globally or per colo (tracked from the agents' own
 * reports), preheat of every colo's stage, every machine ends running C; then a rescue and a
 * reinstall of one host through the API, the CLI's `rollout show|list|watch` and `hosts`, and
 * `host install` of another OS D from the CLI.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { publishSampleBundle } from '../../services/demo/fleet.js';
import { readSimRunning } from '../../services/agent/machine/sim.js';
import { type ControlFleet, hostSpans, maxInFlight, startControlFleet } from './control-fleet-fixture.js';
import { until } from './control-fixture.js';

describe('control: rollout over a sim fleet', () => {
  let cf: ControlFleet;
  let rid: string;
  before(async () => {
    cf = await startControlFleet({
      colos: [
        { name: 'east', hosts: 3 },
        { name: 'west', hosts: 3 },
      ],
    });
  });
  after(async () => {
    await cf?.cleanup();
  });

  it('converges in waves within the in-flight limits, canary first', async () => {
    const created = await cf.client.createRollout({
      base: `${cf.fleet.base.name}@${cf.fleet.base.version}`,
      target: `${cf.fleet.target.name}@${cf.fleet.target.version}`,
      colos: ['east', 'west'],
      plan: { canary: 1, waves: [3, '100%'], maxInFlight: 2, maxInFlightPerColo: 1 },
    });
    rid = created.spec.id;
    assert.deepEqual(created.spec.waves, [['east-h1'], ['west-h1', 'east-h2'], ['west-h2', 'east-h3', 'west-h3']]);
    const end = await cf.waitRollout(rid);
    assert.equal(end.status.state, 'completed', JSON.stringify(end.hosts.map((h) => [h.host, h.status, h.error])));
    assert.equal(end.status.counts.converted, 6);
    for (const h of end.hosts) {
      assert.equal(h.status, 'converted');
      assert.equal(h.steps.verify.state, 'completed');
      assert.ok(h.finishedAt! >= h.startedAt!);
      assert.deepEqual(h.route, { transport: 'direct', queue: `host.${h.host}` }, 'the queue its sequence was put in');
    }
    // Every machine runs C from disk1p1.
    for (const h of cf.fleet.hosts) {
      const run = await readSimRunning(h.dir);
      assert.equal(run.state, 'running');
      assert.equal(run.state === 'running' && run.id, cf.fleet.target.os.id, h.hostId);
      assert.equal(run.state === 'running' && run.device, 'disk1p1');
    }
    // Preheat ran for both colos and the stages hold B and C.
    assert.equal(end.preheat.east.state, 'done');
    assert.equal(end.preheat.west.state, 'done');

    // From the agents' reports: limits, canary first, waves in order.
    const reports = await cf.reports();
    const spans = hostSpans(reports, rid);
    assert.equal(spans.size, 6);
    const colo = (h: string) => h.split('-')[0];
    const m = maxInFlight(spans, colo);
    assert.ok(m.global <= 2, `global in flight ${m.global}`);
    assert.ok(m.perColo.east <= 1 && m.perColo.west <= 1, JSON.stringify(m.perColo));
    const waveOf = new Map(created.spec.waves.flatMap((w, i) => w.map((h) => [h, i] as const)));
    for (const [h, s] of spans) {
      for (const [h2, s2] of spans) {
        if (waveOf.get(h2)! < waveOf.get(h)!) assert.ok(s2.end! < s.start, `${h2} (wave ${waveOf.get(h2)}) ended before ${h} started`);
      }
    }
  });

  it('rescues and reinstalls one host through the API', async () => {
    const host = cf.fleet.hosts.find((h) => h.hostId === 'west-h2')!;
    const lastOf = async (id: string) => (await cf.reader.hosts()).find((h) => h.hostId === id)?.last;
    // Control's record of each host's newest result: the rollout converted it.
    const before = await lastOf(host.hostId);
    assert.equal(before?.kind, 'rollout');
    assert.equal(before?.id, rid);
    assert.equal(before?.outcome, 'converted');
    const op = await cf.client.rescue(host.hostId);
    const done = await until('rescue op', async () => {
      const x = await cf.reader.op(op.id);
      return x.status === 'done' || x.status === 'failed' ? x : null;
    }, 120_000, 100);
    assert.equal(done.status, 'done', JSON.stringify(done));
    assert.deepEqual(done.route, { transport: 'direct', queue: `host.${host.hostId}` }, 'the queue its sequence was put in');
    let run = await readSimRunning(host.dir);
    assert.equal(run.state === 'running' && run.device, 'disk2p1', 'the host runs B');
    assert.equal(run.state === 'running' && run.id, cf.fleet.base.os.id);
    assert.deepEqual(
      { ...(await lastOf(host.hostId)), at: 0 },
      { kind: 'op', id: op.id, op: 'rescue', outcome: 'done', error: null, at: 0 },
      'the rescue is now its newest result',
    );

    const re = await cf.client.reinstall(host.hostId);
    const redone = await until('reinstall op', async () => {
      const x = await cf.reader.op(re.id);
      return x.status === 'done' || x.status === 'failed' ? x : null;
    }, 120_000, 100);
    assert.equal(redone.status, 'done', JSON.stringify(redone));
    run = await readSimRunning(host.dir);
    assert.equal(run.state === 'running' && run.device, 'disk1p1', 'the host runs C again');
    assert.equal(run.state === 'running' && run.id, cf.fleet.target.os.id);
    assert.equal((await lastOf(host.hostId))?.id, re.id);
    assert.equal((await lastOf('west-h1'))?.id, rid, "another host's result is its own");
    // A host's operations, and only its own.
    assert.deepEqual((await cf.reader.ops(50, host.hostId)).map((o) => o.id), [re.id, op.id]);
    assert.deepEqual(await cf.reader.ops(50, 'west-h1'), []);
    // Control restarted: the record is read back from Redis.
    await cf.restartControl();
    assert.equal((await lastOf(host.hostId))?.id, re.id);

    const audit = await cf.reader.audit();
    assert.deepEqual(
      audit.map((a) => `${a.action} ${a.target}`).reverse(),
      [`rollout.create ${rid}`, 'host.rescue west-h2', 'host.reinstall west-h2'],
    );
  });

  it('the CLI shows rollouts and hosts', async () => {
    // Asynchronous: control runs in this process and must keep answering. Reads with the
    // read-only token.
    const readTokens = join(cf.root, 'control.read-tokens');
    const run = (...args: string[]) =>
      new Promise<{ status: number | null; stdout: string; stderr: string }>((resolve) => {
        execFile(process.execPath, ['services/cli/bin.js', ...args, '--control', cf.control.url, ...(args.includes('--token-file') ? [] : ['--token-file', readTokens])], { encoding: 'utf8', timeout: 60_000 }, (err, stdout, stderr) =>
          resolve({ status: err ? ((err as { code?: number }).code ?? null) : 0, stdout, stderr }),
        );
      });
    const show = await run('rollout', 'show', rid, '--json');
    assert.equal(show.status, 0, show.stderr);
    assert.equal(JSON.parse(show.stdout).status.state, 'completed');
    const list = await run('rollout', 'list');
    assert.equal(list.status, 0, list.stderr);
    assert.match(list.stdout, new RegExp(`${rid}\\s+completed`));
    const hosts = await run('hosts', '--colo', 'east', '--json');
    assert.equal(hosts.status, 0, hosts.stderr);
    assert.deepEqual(
      JSON.parse(hosts.stdout).map((h: { hostId: string }) => h.hostId),
      ['east-h1', 'east-h2', 'east-h3'],
    );
    const watch = await run('rollout', 'watch', rid);
    assert.equal(watch.status, 0, watch.stderr);
    assert.match(watch.stderr, /converted 6\/6/);
    const nowrite = await run('rollout', 'pause', rid);
    assert.equal(nowrite.status, 1);
    assert.match(nowrite.stderr, /SC_ERR_FORBIDDEN: token viewer is read-only/);
    const anon = await new Promise<{ status: number | null; stderr: string }>((resolve) => {
      execFile(process.execPath, ['services/cli/bin.js', 'hosts', '--control', cf.control.url], { encoding: 'utf8', timeout: 60_000 }, (err, _o, stderr) =>
        resolve({ status: err ? ((err as { code?: number }).code ?? null) : 0, stderr }),
      );
    });
    assert.equal(anon.status, 1);
    assert.match(anon.stderr, /^error SC_ERR_UNAUTHORIZED: .*\nhint: give a control token with --token-file/);
  });

  it('installs another OS D on one host from the CLI (--wait)', async () => {
    const work = join(cf.root, 'publish-d');
    mkdirSync(work, { recursive: true });
    const d = await publishSampleBundle(cf.fleet.origin.client, cf.fleet.keys, {
      name: 'other-os',
      version: '3.0.0',
      role: 'target',
      os: { id: 'fedora', version: '40', netFormat: 'networkd' },
      workDir: work,
    });
    const tokenFile = join(cf.root, 'cli.token');
    writeFileSync(tokenFile, `${cf.token}\n`);
    const out = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
      execFile(
        process.execPath,
        ['services/cli/bin.js', 'host', 'install', 'east-h3', `${d.name}@${d.version}`, '--wait', '--json', '--control', cf.control.url, '--token-file', tokenFile, '--actor', 'dana'],
        { encoding: 'utf8', timeout: 120_000 },
        (err, stdout, stderr) => resolve({ code: err ? Number((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
      );
    });
    assert.equal(out.code, 0, out.stderr);
    const op = JSON.parse(out.stdout);
    assert.equal(op.status, 'done');
    assert.equal(op.bundle, 'other-os@3.0.0');
    const host = cf.fleet.hosts.find((h) => h.hostId === 'east-h3')!;
    const run = await readSimRunning(host.dir);
    assert.equal(run.state === 'running' && `${run.id} ${run.version} ${run.device}`, 'fedora 40 disk1p1');
    const audit = await cf.reader.audit(1);
    assert.equal(`${audit[0].action} ${audit[0].actor} ${audit[0].target}`, 'host.install dana east-h3');
  });
});
