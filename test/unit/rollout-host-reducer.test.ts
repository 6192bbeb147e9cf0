// Table tests of the host state machine (services/control/rollouts/host-reducer.ts): every report
// event on a rollout host, its rescue run and a host operation, confirmed and unconfirmed finals,
// terminal states, the failure rules (point of no return, abort) and the log tail.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { CONVERT_STEPS, POINT_OF_NO_RETURN, type StepReport } from '../../shared/protocol/index.js';
import type { JobOutcome } from '../../services/control/queues.js';
import { applyOpReport, applyReport, failHost, failOp, isConfirmed, isIgnoredFinal, LOG_TAIL } from '../../services/control/rollouts/host-reducer.js';
import { enqueuedRoute, type HostOp, type HostState, type HostStatus } from '../../services/control/rollouts/model.js';
import { RECONCILE_MAX_MS, RECONCILE_QUIET_MS, reconcileDue, settleHost } from '../../services/control/rollouts/reconcile.js';
import { settleOp } from '../../services/control/rollouts/host-ops.js';

const NOW = 1_700_000_000_000;
const TS = NOW - 5000;
const LAST = CONVERT_STEPS.length - 1;
const PONR = CONVERT_STEPS.indexOf(POINT_OF_NO_RETURN as (typeof CONVERT_STEPS)[number]);

const done: JobOutcome = { state: 'completed', byHost: true };
const doneByOther: JobOutcome = { state: 'completed', byHost: false };
const failed = (failedReason?: string): JobOutcome => ({ state: 'failed', byHost: true, failedReason });
const other: JobOutcome = { state: 'other', byHost: false };

function deepFreeze<T>(o: T): T {
  if (o && typeof o === 'object') {
    for (const v of Object.values(o)) deepFreeze(v);
    Object.freeze(o);
  }
  return o;
}

function host(over: Partial<HostState> = {}): HostState {
  return deepFreeze({
    host: 'h1',
    colo: 'c1',
    wave: 0,
    status: 'running' as HostStatus,
    step: 'fetch',
    seq: 0,
    steps: { fetch: { state: 'running' as const, startedAt: TS - 1000 } },
    enqueued: true,
    queuedAt: TS - 2000,
    startedAt: TS - 1000,
    finishedAt: null,
    lastEventAt: TS - 1000,
    error: null,
    rescue: null,
    log: [],
    ...over,
  });
}

const rep = (seq: number, event: string, over: Partial<StepReport> = {}): StepReport => ({ host: 'h1', rollout: 'r-1', seq, step: CONVERT_STEPS[seq], event, ts: TS, ...over });

describe('rollout host reducer: confirmation of final reports', () => {
  const cases: [string, StepReport, JobOutcome | undefined, boolean, boolean][] = [
    // name, report, outcome, confirmed, ignored entirely
    ['completed, job completed by the host', rep(1, 'completed'), done, true, false],
    ['completed, job completed by someone else', rep(1, 'completed'), doneByOther, false, true],
    ['completed, job not settled', rep(1, 'completed'), other, false, true],
    ['completed, no outcome', rep(1, 'completed'), undefined, false, true],
    ['failed, job failed', rep(1, 'failed'), failed(), true, false],
    ['failed, job not failed (retrying)', rep(1, 'failed'), other, false, false],
    ['refused, job failed', rep(1, 'refused'), failed(), true, false],
    ['refused, job not failed', rep(1, 'refused'), other, false, true],
    ['started is not final', rep(1, 'started'), undefined, false, false],
  ];
  for (const [name, r, o, confirmed, ignored] of cases) {
    it(name, () => {
      assert.equal(isConfirmed(r, o), confirmed);
      assert.equal(isIgnoredFinal(r, o), ignored);
      const h = host();
      const after = applyReport(h, r, { now: NOW, outcome: o });
      if (ignored) assert.equal(after, h);
      else assert.equal(after.lastEventAt, NOW);
    });
  }

  it('an ignored final report returns the very same host (not even lastEventAt changes)', () => {
    const h = host();
    assert.equal(applyReport(h, rep(LAST, 'completed'), { now: NOW, outcome: doneByOther }), h);
    assert.equal(applyReport(h, rep(1, 'refused'), { now: NOW }), h);
  });
});

describe('rollout host reducer: events on a host in flight', () => {
  type Case = { name: string; before?: Partial<HostState>; report: StepReport; outcome?: JobOutcome; expect: (h: HostState) => void };
  const cases: Case[] = [
    {
      name: 'started: running at the step, start times kept once set',
      before: { status: 'queued', step: null, seq: 0, steps: {}, startedAt: null },
      report: rep(0, 'started'),
      expect: (h) => {
        assert.equal(h.status, 'running');
        assert.equal(h.startedAt, TS);
        assert.equal(h.step, 'fetch');
        assert.equal(h.seq, 0);
        assert.deepEqual(h.steps.fetch, { state: 'running', startedAt: TS });
      },
    },
    {
      name: 'started again: first start times stay',
      report: rep(0, 'started'),
      expect: (h) => {
        assert.equal(h.startedAt, TS - 1000);
        assert.equal(h.steps.fetch.startedAt, TS - 1000);
      },
    },
    {
      name: 'started without ts: the time is `now`',
      before: { status: 'queued', step: null, steps: {}, startedAt: null },
      report: rep(0, 'started', { ts: 0 }),
      expect: (h) => {
        assert.equal(h.startedAt, NOW);
        assert.equal(h.steps.fetch.startedAt, NOW);
      },
    },
    {
      name: 'progress: percent and bytes, no log line',
      report: rep(0, 'progress', { percent: 42, bytes: 1234 }),
      expect: (h) => {
        assert.equal(h.steps.fetch.percent, 42);
        assert.equal(h.steps.fetch.bytes, 1234);
        assert.deepEqual(h.log, []);
        assert.equal(h.status, 'running');
      },
    },
    {
      name: 'rebooting: a note on the step',
      report: rep(0, 'rebooting'),
      expect: (h) => {
        assert.equal(h.steps.fetch.note, 'rebooting');
        assert.equal(h.status, 'running');
      },
    },
    {
      name: 'confirmed completed before the last step: step done, host still running',
      report: rep(0, 'completed'),
      outcome: done,
      expect: (h) => {
        assert.deepEqual(h.steps.fetch, { state: 'completed', startedAt: TS - 1000, finishedAt: TS, percent: 100 });
        assert.equal(h.status, 'running');
        assert.equal(h.finishedAt, null);
      },
    },
    {
      name: 'confirmed completed of the last step (LAST_SEQ): converted',
      before: { step: CONVERT_STEPS[LAST], seq: LAST, steps: {} },
      report: rep(LAST, 'completed'),
      outcome: done,
      expect: (h) => {
        assert.equal(h.status, 'converted');
        assert.equal(h.finishedAt, TS);
        assert.equal(h.seq, LAST);
      },
    },
    {
      name: 'unconfirmed failed: the step is retrying, nothing final',
      report: rep(0, 'failed', { code: 'SC_ERR_X', message: 'boom' }),
      outcome: other,
      expect: (h) => {
        assert.equal(h.steps.fetch.state, 'retrying');
        assert.equal(h.status, 'running');
        assert.equal(h.error, null);
        assert.equal(h.rescue, null);
      },
    },
    {
      name: 'confirmed failed before the point of no return: failed, no rescue',
      before: { step: CONVERT_STEPS[PONR], seq: PONR },
      report: rep(PONR, 'failed', { code: 'SC_ERR_X', message: 'boom' }),
      outcome: failed('whatever'),
      expect: (h) => {
        assert.equal(h.status, 'failed');
        assert.deepEqual(h.error, { step: CONVERT_STEPS[PONR], seq: PONR, code: 'SC_ERR_X', message: 'boom' });
        assert.equal(h.steps[CONVERT_STEPS[PONR]].state, 'failed');
        assert.equal(h.finishedAt, TS);
        assert.equal(h.rescue, null);
      },
    },
    {
      name: 'confirmed failed past the point of no return: failed with a queued rescue',
      before: { step: CONVERT_STEPS[PONR + 1], seq: PONR + 1 },
      report: rep(PONR + 1, 'failed'),
      outcome: failed('SC_ERR_DISK: no disk'),
      expect: (h) => {
        assert.equal(h.status, 'failed');
        assert.deepEqual(h.error, { step: CONVERT_STEPS[PONR + 1], seq: PONR + 1, code: 'SC_ERR_DISK', message: 'SC_ERR_DISK: no disk' });
        assert.deepEqual(h.rescue, { state: 'queued', enqueued: false, at: TS });
      },
    },
    {
      name: 'confirmed failed without code or reason: SC_ERR_STEP_FAILED',
      report: rep(0, 'failed'),
      outcome: failed(),
      expect: (h) => assert.deepEqual(h.error, { step: 'fetch', seq: 0, code: 'SC_ERR_STEP_FAILED', message: 'failed' }),
    },
    {
      name: 'confirmed failed with SC_ERR_ABORTED: aborted, never rescued',
      before: { step: CONVERT_STEPS[LAST], seq: LAST },
      report: rep(LAST, 'failed', { code: 'SC_ERR_ABORTED' }),
      outcome: failed(),
      expect: (h) => {
        assert.equal(h.status, 'aborted');
        assert.equal(h.rescue, null);
      },
    },
    {
      name: 'confirmed refused: failed with SC_ERR_JOB_REJECTED',
      report: rep(0, 'refused'),
      outcome: failed(),
      expect: (h) => {
        assert.equal(h.status, 'failed');
        assert.equal(h.error?.code, 'SC_ERR_JOB_REJECTED');
      },
    },
    {
      name: 'an unknown event only logs (and records the step)',
      report: rep(0, 'frobnicated'),
      expect: (h) => {
        assert.equal(h.status, 'running');
        assert.equal(h.log.length, 1);
      },
    },
  ];
  for (const c of cases) {
    it(c.name, () => {
      const before = host(c.before);
      const after = applyReport(before, c.report, { now: NOW, outcome: c.outcome });
      assert.notEqual(after, before);
      assert.equal(after.lastEventAt, NOW);
      if (c.report.event !== 'progress') assert.match(after.log.at(-1)!, new RegExp(` ${c.report.step} ${c.report.event}`));
      c.expect(after);
    });
  }

  it('the log keeps the last LOG_TAIL lines, with code and message', () => {
    let h = host();
    for (let i = 0; i < LOG_TAIL + 5; i++) h = applyReport(h, rep(0, 'rebooting', { message: `n${i}` }), { now: NOW });
    assert.equal(h.log.length, LOG_TAIL);
    assert.match(h.log.at(-1)!, /fetch rebooting n24$/);
    assert.match(h.log[0], /fetch rebooting n5$/);
    const f = applyReport(host(), rep(0, 'failed', { code: 'SC_ERR_X', message: 'boom' }), { now: NOW, outcome: other });
    assert.match(f.log[0], /^\d\d:\d\d:\d\d fetch failed SC_ERR_X: boom$/);
  });
});

describe('rollout host reducer: terminal hosts', () => {
  for (const status of ['converted', 'failed', 'aborted', 'skipped'] as HostStatus[]) {
    it(`${status}: reports change only lastEventAt`, () => {
      const before = host({ status });
      for (const [r, o] of [
        [rep(0, 'started'), undefined],
        [rep(0, 'completed'), done],
        [rep(0, 'failed'), failed()],
        [rep(0, 'progress', { percent: 5 }), undefined],
      ] as [StepReport, JobOutcome | undefined][]) {
        const after = applyReport(before, r, { now: NOW, outcome: o });
        assert.deepEqual(after, { ...before, lastEventAt: NOW });
      }
    });
  }

  it('failHost on a terminal host changes nothing', () => {
    const h = host({ status: 'converted' });
    assert.equal(failHost(h, { step: 'verify', seq: LAST, code: 'SC_ERR_TIMEOUT', message: 'x', ts: NOW }), h);
  });

  it('failHost keeps an existing rescue and cuts long messages', () => {
    const rescue = { state: 'done' as const, enqueued: true, at: 1 };
    const h = failHost(host({ rescue }), { step: 'verify', seq: LAST, code: 'SC_ERR_X', message: 'y'.repeat(2000), ts: NOW });
    assert.deepEqual(h.rescue, rescue);
    assert.equal(h.error?.message.length, 1000);
  });
});

describe('rollout host reducer: the rescue run', () => {
  const rescued = (state: 'queued' | 'running') => host({ status: 'failed', rescue: { state, enqueued: true, at: TS } });
  const rr = (event: string, over: Partial<StepReport> = {}): StepReport => ({ host: 'h1', rollout: 'r-1-rescue', seq: 0, step: 'rescue', event, ts: TS, ...over });
  const cases: [string, HostState, StepReport, JobOutcome | undefined, string, string | undefined][] = [
    ['started: queued → running', rescued('queued'), rr('started'), undefined, 'running', undefined],
    ['started when running: stays', rescued('running'), rr('started'), undefined, 'running', undefined],
    ['confirmed completed: done', rescued('running'), rr('completed'), done, 'done', undefined],
    ['confirmed failed: failed with code and message', rescued('running'), rr('failed', { code: 'SC_ERR_X', message: 'm' }), failed(), 'failed', 'SC_ERR_X: m'],
    ['unconfirmed failed: still running', rescued('running'), rr('failed'), other, 'running', undefined],
  ];
  for (const [name, before, r, o, state, error] of cases) {
    it(name, () => {
      const after = applyReport(before, r, { now: NOW, outcome: o, rescue: true });
      assert.equal(after.rescue?.state, state);
      assert.equal(after.rescue?.error, error);
      assert.equal(after.status, 'failed');
      assert.equal(after.lastEventAt, NOW);
      assert.match(after.log.at(-1)!, new RegExp(`rescue ${r.event}`));
    });
  }

  it('a rescue report for a host without a rescue changes only lastEventAt', () => {
    const before = host({ status: 'failed' });
    assert.deepEqual(applyReport(before, rr('completed'), { now: NOW, outcome: done, rescue: true }), { ...before, lastEventAt: NOW });
  });
});

describe('host operation reducer', () => {
  const op = (over: Partial<HostOp> = {}): HostOp =>
    deepFreeze({
      id: 'op-1',
      kind: 'reinstall',
      host: 'h1',
      bundle: null,
      createdAt: TS - 9000,
      actor: 'ops',
      status: 'queued',
      enqueued: true,
      steps: ['rescue', 'wipe-target-disk', 'install-target', 'boot-target', 'verify'],
      step: null,
      seq: 0,
      error: null,
      finishedAt: null,
      log: [],
      ...over,
    } as HostOp);
  const orep = (seq: number, step: string, event: string, over: Partial<StepReport> = {}): StepReport => ({ host: 'h1', rollout: 'op-1', seq, step, event, ts: TS, ...over });

  const cases: [string, HostOp, StepReport, JobOutcome | undefined, Partial<HostOp>][] = [
    ['started: running', op(), orep(0, 'rescue', 'started'), undefined, { status: 'running', step: 'rescue', seq: 0 }],
    ['completed before the last step: cursor moves', op({ status: 'running' }), orep(1, 'wipe-target-disk', 'completed'), done, { status: 'running', seq: 1 }],
    ['completed of the last step: done', op({ status: 'running' }), orep(4, 'verify', 'completed'), done, { status: 'done', seq: 4, finishedAt: TS }],
    [
      'confirmed failed: failed',
      op({ status: 'running' }),
      orep(2, 'install-target', 'failed', { code: 'SC_ERR_X', message: 'm' }),
      failed(),
      { status: 'failed', error: { step: 'install-target', code: 'SC_ERR_X', message: 'm' }, finishedAt: TS },
    ],
    ['unconfirmed failed: still running', op({ status: 'running' }), orep(2, 'install-target', 'failed'), other, { status: 'running', error: null }],
  ];
  for (const [name, before, r, o, expect] of cases) {
    it(name, () => {
      const after = applyOpReport(before, r, { now: NOW, outcome: o });
      assert.notEqual(after, before);
      for (const [k, v] of Object.entries(expect)) assert.deepEqual(after[k as keyof HostOp], v, k);
      assert.equal(after.log.length, 1);
    });
  }

  it('finished operations and ignored finals change nothing', () => {
    for (const status of ['done', 'failed'] as const) {
      const o = op({ status });
      assert.equal(applyOpReport(o, orep(0, 'rescue', 'started'), { now: NOW }), o);
    }
    const o = op({ status: 'running' });
    assert.equal(applyOpReport(o, orep(4, 'verify', 'completed'), { now: NOW, outcome: doneByOther }), o);
    const finished = op({ status: 'done' });
    assert.equal(failOp(finished, { step: 'x', code: 'y', message: 'z', ts: NOW }), finished);
  });

  it('settleOp: last job completed by the host → done; current job failed → failed', () => {
    const o = op({ status: 'running', seq: 2 });
    assert.deepEqual(settleOp(o, other, done, NOW), { ...o, status: 'done', finishedAt: NOW });
    assert.equal(settleOp(o, other, doneByOther, NOW), o);
    const f = settleOp(o, failed('SC_ERR_DISK: gone'), other, NOW);
    assert.deepEqual([f.status, f.error], ['failed', { step: 'install-target', code: 'SC_ERR_DISK', message: 'SC_ERR_DISK: gone' }]);
  });
});

describe('reconcile: settling a host from BullMQ records', () => {
  it('last step completed by the host: converted', () => {
    const h = settleHost(host({ status: 'running', seq: 3, step: CONVERT_STEPS[3] }), other, done, NOW);
    assert.deepEqual([h.status, h.seq, h.step, h.finishedAt], ['converted', LAST, CONVERT_STEPS[LAST], NOW]);
  });
  it('current step failed: failed with the code from the reason', () => {
    const h = settleHost(host({ status: 'queued', seq: 0 }), failed('SC_ERR_FETCH: 404'), other, NOW);
    assert.deepEqual([h.status, h.error?.code, h.error?.step], ['failed', 'SC_ERR_FETCH', 'fetch']);
  });
  it('current step completed, next step silent: the cursor moves on', () => {
    const h = settleHost(host({ status: 'running', seq: 2, step: CONVERT_STEPS[2] }), done, other, NOW);
    assert.deepEqual([h.status, h.seq, h.step, h.steps[CONVERT_STEPS[2]].state], ['running', 3, CONVERT_STEPS[3], 'completed']);
  });
  it('nothing new: the same host', () => {
    const h0 = host();
    assert.equal(settleHost(h0, other, other, NOW), h0);
    assert.equal(settleHost(h0, doneByOther, doneByOther, NOW), h0);
  });
  it('a rescue settles to done or failed', () => {
    const h0 = host({ status: 'failed', rescue: { state: 'running', enqueued: true, at: TS } });
    assert.equal(settleHost(h0, done, done, NOW).rescue?.state, 'done');
    assert.deepEqual(settleHost(h0, failed('SC_ERR_X'), failed('SC_ERR_X'), NOW).rescue, { state: 'failed', enqueued: true, at: TS, error: 'SC_ERR_X' });
    assert.equal(settleHost(h0, other, other, NOW), h0);
  });
});

describe('reconcile: when a quiet host is looked up', () => {
  it('not before RECONCILE_QUIET_MS of silence, then at once', () => {
    assert.equal(reconcileDue(NOW - RECONCILE_QUIET_MS + 1, undefined, NOW), false);
    assert.equal(reconcileDue(NOW - RECONCILE_QUIET_MS, undefined, NOW), true);
  });
  it('a host whose progress reports keep coming (every 5 s) is never looked up', () => {
    let checkedAt: number | undefined;
    let since = 0;
    let n = 0;
    for (let t = 0; t <= 600_000; t += 100) {
      if (t % 5000 === 0) since = t;
      if (reconcileDue(since, checkedAt, t)) {
        n++;
        checkedAt = t;
      }
    }
    assert.equal(n, 0);
  });
  it('a lookup from before the last report does not count', () => {
    assert.equal(reconcileDue(NOW - RECONCILE_QUIET_MS, NOW - RECONCILE_QUIET_MS - 1, NOW), true);
  });
  it('again after half the silence: the lookups of a long silence thin out', () => {
    const since = NOW - 60_000;
    assert.equal(reconcileDue(since, NOW - 29_000, NOW), false);
    assert.equal(reconcileDue(since, NOW - 30_000, NOW), true);
    assert.equal(reconcileDue(NOW - 14_000, NOW - 7000 + 1, NOW), false);
    assert.equal(reconcileDue(NOW - 14_000, NOW - 7000, NOW), true);
  });
  it('never more than RECONCILE_MAX_MS apart', () => {
    const since = NOW - 3_600_000;
    assert.equal(reconcileDue(since, NOW - RECONCILE_MAX_MS + 1, NOW), false);
    assert.equal(reconcileDue(since, NOW - RECONCILE_MAX_MS, NOW), true);
  });
  it('a silent minute: three lookups (12, 24, 48 s), where one per RECONCILE_MS pass would be thirty', () => {
    const since = 0;
    let checkedAt: number | undefined;
    let n = 0;
    for (let t = 0; t <= 60_000; t += 100) {
      if (reconcileDue(since, checkedAt, t)) {
        n++;
        checkedAt = t;
      }
    }
    assert.equal(n, 3);
  });
});

describe('the queue a sequence was put in', () => {
  const route = { transport: 'relay' as const, queue: 'colo.c1' };
  it('is known only while that sequence is the one enqueued', () => {
    assert.deepEqual(enqueuedRoute({ enqueued: true, route }), route);
    // A host started again (enqueued: false) has a new sequence to put somewhere: the old queue is not its.
    assert.equal(enqueuedRoute({ enqueued: false, route }), undefined);
    assert.equal(enqueuedRoute({ enqueued: true }), undefined, 'a record written before control kept it');
    assert.equal(enqueuedRoute(null), undefined, 'no rescue');
  });
});
