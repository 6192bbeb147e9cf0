/** The host's journal: the admission rules, the merge of its two copies, and its writes on a sim machine. */
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import type { StepPayload } from '../../shared/protocol/index.js';
import { admit, Journal, type JournalDoc, mergeJournals } from '../../services/agent/journal.js';
import { initSimMachine, SimMachine } from '../../services/agent/machine/sim.js';
import { DISK2_LAYOUT } from '../../services/agent/steps/partition.js';

const p = (seq: number, over: Partial<StepPayload> = {}): StepPayload => ({
  host: 'h1',
  rollout: 'r1',
  seq,
  total: 11,
  step: 'fetch',
  args: {},
  exp: Date.now() + 3_600_000,
  nonce: `nonce-${seq}-xxxxxxxxxxxx`,
  ...over,
});
const doc = (rollouts: JournalDoc['rollouts']): JournalDoc => ({ v: 1, host: 'h1', rollouts });

test('admit: replays, re-adoption of exactly the started job, the next step only', () => {
  const empty = doc({});
  assert.equal(admit(empty, p(0), 'j0', 'd0').kind, 'fresh');
  assert.equal(admit(empty, p(3), 'j3', 'd3').kind, 'out-of-order');
  const mid = doc({ r1: { done: 2, total: 11, exp: 0, started: { job: 'j3', digest: 'd3', seq: 3, step: 'capture-config', at: 42 } } });
  assert.equal(admit(mid, p(0), 'j0', 'd0').kind, 'replayed');
  assert.equal(admit(mid, p(2), 'j2', 'd2').kind, 'replayed');
  assert.deepEqual(admit(mid, p(3), 'j3', 'd3'), { kind: 'readopt', since: 42 });
  assert.equal(admit(mid, p(3), 'j3', 'other-digest').kind, 'fresh', 'another signing of the next step is new, not a re-adoption');
  assert.equal(admit(mid, p(3), 'other-id', 'd3').kind, 'fresh');
  assert.equal(admit(mid, p(4), 'j4', 'd4').kind, 'out-of-order', 'not past a step that did not run to its end');
  const ran = doc({ r1: { done: 2, total: 11, exp: 0, started: { job: 'j3', digest: 'd3', seq: 3, step: 'capture-config', at: 42, ran: true } } });
  assert.equal(admit(ran, p(4), 'j4', 'd4').kind, 'fresh', 'the step after one that ran (its finish was not written)');
  assert.deepEqual(admit(ran, p(3), 'j3', 'd3'), { kind: 'readopt', since: 42 });
  assert.equal(admit(mid, p(5), 'j5', 'd5').kind, 'out-of-order');
  const finished = doc({ r1: { done: 10, total: 11, exp: 0, ended: 'finished' } });
  for (let seq = 0; seq < 11; seq++) assert.equal(admit(finished, p(seq), `j${seq}`, `d${seq}`).kind, 'replayed');
  const failed = doc({ r1: { done: 4, total: 11, exp: 0, ended: 'failed' } });
  assert.equal(admit(failed, p(5), 'j5', 'd5').kind, 'replayed');
  assert.equal(admit(finished, p(0, { rollout: 'r2' }), 'j', 'd').kind, 'fresh', 'other rollouts are not affected');
});

test('mergeJournals: highest finished step, latest start above it, any end; torn copies count as empty', () => {
  const a = doc({
    r1: { done: 1, total: 11, exp: 5, started: { job: 'j2', digest: 'd2', seq: 2, step: 'install-base', at: 1 } },
    r2: { done: 0, total: 1, exp: 5, ended: 'finished' },
  });
  const b = doc({ r1: { done: 3, total: 11, exp: 9, started: { job: 'j4', digest: 'd4', seq: 4, step: 'apply-config-base', at: 2 } } });
  const m = mergeJournals('h1', [a, null, b, { v: 2 } as unknown as JournalDoc]);
  assert.deepEqual(m.rollouts.r1, { done: 3, total: 11, exp: 9, started: { job: 'j4', digest: 'd4', seq: 4, step: 'apply-config-base', at: 2 } });
  assert.equal(m.rollouts.r2.ended, 'finished');
  const stale = mergeJournals('h1', [a, doc({ r1: { done: 2, total: 11, exp: 5 } })]);
  assert.equal(stale.rollouts.r1.started, undefined, 'a start at or below the finished mark is dropped');
});

test('Journal on a sim machine: the state dir before disk 2 exists, both copies after, merged on read', async () => {
  const root = await mkdtemp(join(tmpdir(), 'sc-journal-'));
  try {
    const dir = join(root, 'm');
    await initSimMachine(dir, { hostId: 'h1', ip: '10.0.0.5/24', gateway: '10.0.0.1' });
    const sim = new SimMachine(dir);
    const j = new Journal({ driver: sim, hostId: 'h1', now: () => 1000 });
    await j.begin(p(0), 'j0', 'd0');
    const stateCopy = join(dir, 'disks/disk1/p1/var/lib/stagecoach/journal.json');
    assert.equal(JSON.parse(await readFile(stateCopy, 'utf8')).rollouts.r1.started.job, 'j0');
    await j.finish(p(0));
    await j.begin(p(1), 'j1', 'd1');
    await sim.partition('disk2', DISK2_LAYOUT);
    await sim.mkfs('disk2p2');
    await j.finish(p(1));
    const keptCopy = join(dir, 'disks/disk2/p2/stagecoach/journal.json');
    assert.equal(JSON.parse(await readFile(keptCopy, 'utf8')).rollouts.r1.done, 1, 'the record moved onto disk2p2');
    const merged = await j.read();
    assert.equal(merged.rollouts.r1.done, 1);
    for (let seq = 2; seq < 11; seq++) {
      await j.begin(p(seq), `j${seq}`, `d${seq}`);
      await j.finish(p(seq));
    }
    assert.equal((await j.read()).rollouts.r1.ended, 'finished');
    assert.equal((await j.admit(p(10), 'j10', 'd10')).kind, 'replayed');
    // Failed runs: a retry is a re-adoption until the job used up its attempts (by the host's count).
    const r2 = (seq: number) => p(seq, { rollout: 'r2' });
    await j.begin(r2(0), 'k0', 'e0');
    assert.equal(await j.failed(r2(0), 'k0', 'e0', false, 3), false);
    assert.equal((await j.admit(r2(0), 'k0', 'e0')).kind, 'readopt');
    assert.equal(await j.failed(r2(0), 'k0', 'e0', false, 3), false);
    assert.equal(await j.failed(r2(0), 'k0', 'e0', false, 3), true);
    assert.equal((await j.admit(r2(0), 'k0', 'e0')).kind, 'replayed');
    await j.begin(p(0, { rollout: 'r3' }), 'm0', 'f0');
    assert.equal(await j.failed(p(0, { rollout: 'r3' }), 'm0', 'f0', true, 3), true, 'a permanent failure ends the rollout at once');
  } finally {
    await rm(root, { recursive: true, force: true });
  }
});
