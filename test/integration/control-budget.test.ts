/**
 * Failure handling over a sim fleet: two hosts whose boot into B fails exceed a failure budget
 * of 1 and pause the rollout with the other hosts untouched; after resume the failed hosts stay
 * failed (on A) and the others finish; a host whose boot into C fails (past the point of no
 * return) is sent back to B with the rescue sequence. Abort mid-wave: no new host starts, the host in flight
 * finishes its current step and stops at a step boundary, on a bootable OS.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Queue } from 'bullmq';
import { keys, type StepReport, decodeReport } from '../../shared/protocol/index.js';
import { readSimRunning, simFault } from '../../services/agent/machine/sim.js';
import { type ControlFleet, startControlFleet } from './control-fleet-fixture.js';
import { until } from './control-fixture.js';

const ref = (m: { name: string; version: string }) => `${m.name}@${m.version}`;

describe('control: failure budget', () => {
  let cf: ControlFleet;
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

  it('pauses past the budget, leaves the rest untouched, and finishes the others after resume', async () => {
    const failing = ['east-h1', 'west-h1'];
    for (const h of cf.fleet.hosts.filter((x) => failing.includes(x.hostId))) await simFault(h.dir, 'fail-boot', 'disk2p1');
    // east-h3 fails after the point of no return (its boot into C fails): it must end on B.
    const late = cf.fleet.hosts.find((x) => x.hostId === 'east-h3')!;
    await simFault(late.dir, 'fail-boot', 'disk1p1');
    const created = await cf.client.createRollout({
      base: ref(cf.fleet.base),
      target: ref(cf.fleet.target),
      colos: ['east', 'west'],
      plan: { waves: [2, '100%'], maxInFlight: 2, failureBudget: 1 },
    });
    const id = created.spec.id;
    assert.deepEqual(created.spec.waves[0], failing);
    const paused = await cf.waitRollout(id, (r) => r.status.state !== 'running');
    assert.equal(paused.status.state, 'paused');
    assert.equal(paused.status.pauseReason, 'failure-budget');
    for (const h of paused.hosts) {
      if (failing.includes(h.host)) {
        assert.equal(h.status, 'failed');
        assert.equal(h.error?.step, 'boot-base');
        assert.equal(h.error?.code, 'SC_ERR_BOOT_FAILED');
        assert.equal(h.rescue, null, 'a failure before the point of no return needs no rescue');
        assert.ok(h.log.length > 0);
      } else assert.equal(h.status, 'pending', h.host);
    }
    // The rest is untouched: no job in their queues, still running A.
    for (const h of cf.fleet.hosts.filter((x) => !failing.includes(x.hostId))) {
      const q = new Queue(`host.${h.hostId}`, { connection: cf.redis, prefix: cf.fleet.prefix });
      assert.equal(await q.count(), 0, h.hostId);
      await q.close();
      const run = await readSimRunning(h.dir);
      assert.equal(run.state === 'running' && run.device, 'disk1p1');
    }
    // The failed hosts fell back to A, on disk 1.
    for (const h of cf.fleet.hosts.filter((x) => failing.includes(x.hostId))) {
      const run = await readSimRunning(h.dir);
      assert.equal(run.state === 'running' && `${run.id} ${run.device}`, 'debian disk1p1');
    }
    // The failure shows with the agent's log tail from BullMQ.
    const detail = await cf.reader.rollout(id);
    assert.ok(detail.hosts.find((h) => h.host === 'east-h1')!.jobLog!.length > 0);

    await cf.client.resume(id);
    const end = await cf.waitRollout(id);
    assert.equal(end.status.state, 'failed', 'finished, with failures');
    assert.equal(end.status.counts.converted, 3);
    assert.equal(end.status.counts.failed, 3);
    assert.equal(end.status.counts.rescued, 1);
    for (const h of end.hosts) assert.equal(h.status, [...failing, 'east-h3'].includes(h.host) ? 'failed' : 'converted', h.host);
    // Past the point of no return: the failure sent the host back to B through the rescue sequence.
    const h3 = end.hosts.find((h) => h.host === 'east-h3')!;
    assert.equal(h3.error?.step, 'boot-target');
    assert.equal(h3.rescue?.state, 'done');
    const run = await readSimRunning(late.dir);
    assert.equal(run.state === 'running' && `${run.id} ${run.device}`, `${cf.fleet.base.os.id} disk2p1`);
    const q3 = new Queue('host.east-h3', { connection: cf.redis, prefix: cf.fleet.prefix });
    assert.equal(await q3.getJobState(`${id}-rescue.0.rescue`), 'completed', 'the rescue runs under its own id, out of reach of an abort');
    await q3.close();
  });
});

describe('control: abort mid-wave', () => {
  let cf: ControlFleet;
  before(async () => {
    cf = await startControlFleet({ colos: [{ name: 'north', hosts: 4 }] });
  });
  after(async () => {
    await cf?.cleanup();
  });

  it('starts no new host; the host in flight stops at a step boundary', async (t) => {
    const k = keys(cf.fleet.prefix);
    const reader = cf.redis.duplicate();
    let abortAt = '';
    try {
      const created = await cf.client.createRollout({ base: ref(cf.fleet.base), target: ref(cf.fleet.target), colos: ['north'], plan: { maxInFlight: 1 } });
      const id = created.spec.id;
      // Abort as soon as the first host is inside its sequence (it has started capture-config).
      let last = '0';
      const stream = k.hostReports('north-h1');
      for (;;) {
        const res = (await reader.xread('COUNT', 100, 'BLOCK', 30_000, 'STREAMS', stream, last)) as [string, [string, string[]][]][] | null;
        assert.ok(res, 'reports keep coming');
        let hit = false;
        for (const [eid, f] of res[0][1]) {
          last = eid;
          const r = decodeReport(f);
          if (r.rollout === id && r.step === 'capture-config' && r.event === 'started') hit = true;
        }
        if (hit) break;
      }
      const ab = await cf.client.abort(id);
      abortAt = last;
      assert.ok(['aborting', 'aborted'].includes(ab.status.state));
      const end = await cf.waitRollout(id);
      assert.equal(end.status.state, 'aborted');
      const first = end.hosts[0];
      assert.equal(first.host, 'north-h1');
      assert.ok(['aborted', 'converted'].includes(first.status), first.status);
      t.diagnostic(`north-h1 ended ${first.status} after ${first.step}`);
      for (const h of end.hosts.slice(1)) assert.equal(h.status, 'skipped', h.host);

      // After the abort, the host in flight started at most one more step (the one the abort
      // raced with) and every started step completed: it stopped on a boundary.
      const after = (await cf.redis.xrange(stream, `(${abortAt}`, '+')).map(([, f]) => decodeReport(f)).filter((r: StepReport) => r.rollout === id);
      const others = (await cf.reports()).filter((r) => r.rollout === id && r.host !== 'north-h1');
      assert.deepEqual(others, [], 'no other host ever started');
      const started = after.filter((r) => r.event === 'started').map((r) => r.step);
      assert.ok(new Set(started).size <= 1, `steps started after the abort: ${started}`);
      for (const s of started) assert.ok(after.some((r) => r.step === s && r.event === 'completed'), `${s} completed`);
      if (first.status === 'aborted') {
        assert.equal(first.error?.code, 'SC_ERR_ABORTED');
        assert.ok(after.some((r) => r.event === 'failed' && r.code === 'SC_ERR_ABORTED'));
      }
      // The machine runs an OS (A, or B once past boot-base) from a bootable device.
      const m = cf.fleet.hosts[0];
      const run = await until('north-h1 running', async () => {
        const x = await readSimRunning(m.dir);
        return x.state === 'running' ? x : null;
      });
      assert.ok(['disk1p1', 'disk2p1'].includes(run.device));
      for (const h of cf.fleet.hosts.slice(1)) {
        const q = new Queue(`host.${h.hostId}`, { connection: cf.redis, prefix: cf.fleet.prefix });
        assert.equal(await q.count(), 0, h.hostId);
        await q.close();
      }
    } finally {
      reader.disconnect();
    }
  });
});
