// Table tests of the wave scheduler (services/control/rollouts/waves.ts): preheat and canary
// gates, wave sizes, global and per-colo in-flight limits, the failure budget, bake time (time is
// an argument), silent hosts, pause and abort, and how a rollout ends. No clock, no Redis.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { type HostState, type HostStatus, type PreheatColo, pendingHost, type RolloutStatus } from '../../services/control/rollouts/model.js';
import { HostTable } from '../../services/control/rollouts/host-table.js';
import { advance, applyWaveIntent, type WaveIntent, type WaveRollout } from '../../services/control/rollouts/waves.js';

const NOW = 1_700_000_000_000;

interface Setup {
  /** Waves of `host:colo` (colo defaults to c1). */
  waves: string[][];
  /** Host statuses by id (default pending). */
  hosts?: Record<string, HostStatus | Partial<HostState>>;
  plan?: Partial<WaveRollout['spec']['plan']>;
  budget?: number;
  status?: Partial<RolloutStatus>;
  /** Preheat state per colo; default every colo `done`. */
  preheat?: Record<string, PreheatColo['state'] | undefined>;
}

function setup(s: Setup): { rollout: WaveRollout; hosts: HostTable } {
  const hosts = new HostTable();
  s.waves.forEach((w, wave) => {
    for (const spec of w) {
      const [host, colo = 'c1'] = spec.split(':');
      const over = s.hosts?.[host];
      const fields = typeof over === 'string' ? { status: over } : (over ?? {});
      hosts.set(host, { ...pendingHost(host, colo, wave), ...fields });
    }
  });
  const colos = [...new Set([...hosts.values()].map((h) => h.colo))];
  const preheat: Record<string, PreheatColo> = {};
  for (const c of colos) {
    const state = s.preheat && c in s.preheat ? s.preheat[c] : 'done';
    if (state) preheat[c] = { colo: c, wave: 0, state, startedAt: 0, finishedAt: null, stages: [] };
  }
  const rollout: WaveRollout = {
    spec: {
      waves: s.waves.map((w) => w.map((x) => x.split(':')[0])),
      plan: { canary: 0, waves: ['100%'], maxInFlight: 10, maxInFlightPerColo: 10, failureBudget: 0, bakeSeconds: 0, ...s.plan },
      budget: s.budget ?? 0,
    },
    status: {
      state: 'running',
      pauseReason: null,
      wave: 0,
      phase: 'rolling',
      phaseSince: 0,
      bakeUntil: null,
      failuresAtResume: 0,
      canaryAccepted: false,
      counts: { pending: 0, queued: 0, running: 0, converted: 0, failed: 0, aborted: 0, skipped: 0, inFlight: 0, rescued: 0 },
      updatedAt: 0,
      finishedAt: null,
      ...s.status,
    },
    preheat,
  };
  return { rollout, hosts };
}

const enqueued = (intents: WaveIntent[]) => intents.flatMap((i) => (i.kind === 'enqueue' ? [i.host] : []));
const kinds = (intents: WaveIntent[]) => intents.map((i) => i.kind);

interface Case {
  name: string;
  setup: Setup;
  now?: number;
  hostTimeoutMs?: number;
  expect: WaveIntent[] | ((intents: WaveIntent[]) => void);
}

function run(cases: Case[]): void {
  for (const c of cases) {
    it(c.name, () => {
      const { rollout, hosts } = setup(c.setup);
      const before = structuredClone({ rollout, hosts: new Map(hosts), counts: hosts.counts() });
      const intents = advance(rollout, hosts, c.now ?? NOW, { hostTimeoutMs: c.hostTimeoutMs });
      assert.deepEqual({ rollout, hosts: new Map(hosts), counts: hosts.counts() }, before, 'advance must not change its arguments');
      if (typeof c.expect === 'function') c.expect(intents);
      else assert.deepEqual(intents, c.expect);
    });
  }
}

describe('waves: finished rollouts', () => {
  run(
    (['completed', 'failed', 'aborted'] as const).map((state) => ({
      name: `${state}: nothing happens`,
      setup: { waves: [['a', 'b']], status: { state } },
      expect: [],
    })),
  );
});

describe('waves: preheat gate', () => {
  run([
    {
      name: 'a colo without preheat: preheat the wave, start nobody',
      setup: { waves: [['a:c1', 'b:c2'], ['c:c3']], status: { phase: 'preheat' }, preheat: { c2: undefined, c3: undefined } },
      expect: [{ kind: 'preheat', wave: 0, colos: ['c1', 'c2'] }],
    },
    {
      name: 'a colo still filling: preheat again, start nobody',
      setup: { waves: [['a:c1', 'b:c2']], status: { phase: 'preheat' }, preheat: { c2: 'filling' } },
      expect: [{ kind: 'preheat', wave: 0, colos: ['c1', 'c2'] }],
    },
    ...(['done', 'failed', 'timeout', 'skipped'] as const).map((state) => ({
      name: `every colo settled (${state}): rolling, and hosts start in the same tick`,
      setup: { waves: [['a:c1', 'b:c2']], status: { phase: 'preheat' as const }, preheat: { c2: state } },
      expect: [
        { kind: 'phase', phase: 'rolling', wave: 0, bakeUntil: null },
        { kind: 'enqueue', host: 'a' },
        { kind: 'enqueue', host: 'b' },
      ] as WaveIntent[],
    })),
  ]);
});

describe('waves: starting hosts', () => {
  run([
    {
      name: 'only the current wave starts (wave sizes)',
      setup: { waves: [['a', 'b'], ['c', 'd', 'e']] },
      expect: (i) => assert.deepEqual(enqueued(i), ['a', 'b']),
    },
    {
      name: 'the second wave starts whole once it is current',
      setup: { waves: [['a'], ['b', 'c', 'd']], hosts: { a: 'converted' }, status: { wave: 1 } },
      expect: (i) => assert.deepEqual(enqueued(i), ['b', 'c', 'd']),
    },
    {
      name: 'global maxInFlight caps the starts',
      setup: { waves: [['a', 'b', 'c', 'd', 'e']], plan: { maxInFlight: 2 } },
      expect: (i) => assert.deepEqual(enqueued(i), ['a', 'b']),
    },
    {
      name: 'hosts already in flight count against maxInFlight (queued and running)',
      setup: { waves: [['a', 'b', 'c', 'd']], plan: { maxInFlight: 3 }, hosts: { a: 'running', b: 'queued' } },
      expect: (i) => assert.deepEqual(enqueued(i), ['c']),
    },
    {
      name: 'maxInFlight reached: nobody starts',
      setup: { waves: [['a', 'b', 'c']], plan: { maxInFlight: 2 }, hosts: { a: 'running', b: 'running' } },
      expect: [],
    },
    {
      name: 'terminal hosts do not count against maxInFlight',
      setup: { waves: [['a', 'b', 'c']], plan: { maxInFlight: 1 }, hosts: { a: 'failed', b: 'converted' }, budget: 5 },
      expect: (i) => assert.deepEqual(enqueued(i), ['c']),
    },
    {
      name: 'per-colo limit: a full colo is skipped, the next colo still starts',
      setup: { waves: [['a:c1', 'b:c1', 'c:c1', 'd:c2', 'e:c2']], plan: { maxInFlightPerColo: 1 } },
      expect: (i) => assert.deepEqual(enqueued(i), ['a', 'd']),
    },
    {
      name: 'per-colo limit counts hosts in flight',
      setup: { waves: [['a:c1', 'b:c1', 'c:c2']], plan: { maxInFlightPerColo: 1 }, hosts: { a: 'running' } },
      expect: (i) => assert.deepEqual(enqueued(i), ['c']),
    },
    {
      name: 'both limits: the global one stops the scan',
      setup: { waves: [['a:c1', 'b:c1', 'c:c2', 'd:c3']], plan: { maxInFlight: 2, maxInFlightPerColo: 1 } },
      expect: (i) => assert.deepEqual(enqueued(i), ['a', 'c']),
    },
    {
      name: 'a wave with hosts in flight does not end',
      setup: { waves: [['a', 'b'], ['c']], hosts: { a: 'converted', b: 'running' } },
      expect: [],
    },
  ]);
});

describe('waves: canary gate', () => {
  run([
    {
      name: 'canary in flight: the next wave waits',
      setup: { waves: [['a'], ['b', 'c']], plan: { canary: 1 }, hosts: { a: 'running' } },
      expect: [],
    },
    {
      name: 'canary converted: the rollout goes on (bake 0: next wave starts in the same tick)',
      setup: { waves: [['a'], ['b', 'c']], plan: { canary: 1 }, hosts: { a: 'converted' } },
      expect: [
        { kind: 'phase', phase: 'bake', wave: 0, bakeUntil: NOW },
        { kind: 'phase', phase: 'preheat', wave: 1, bakeUntil: null },
        { kind: 'phase', phase: 'rolling', wave: 1, bakeUntil: null },
        { kind: 'enqueue', host: 'b' },
        { kind: 'enqueue', host: 'c' },
      ],
    },
    ...(['failed', 'aborted', 'skipped'] as const).map((status) => ({
      name: `canary ${status}: the rollout pauses (canary-failed), nothing else starts`,
      setup: { waves: [['a'], ['b']], plan: { canary: 1 }, hosts: { a: status }, budget: 5 },
      expect: [{ kind: 'pause-rollout', reason: 'canary-failed' }] as WaveIntent[],
    })),
    {
      name: 'canary failed but accepted by a resume: the next wave starts',
      setup: { waves: [['a'], ['b']], plan: { canary: 1 }, hosts: { a: 'failed' }, budget: 5, status: { canaryAccepted: true } },
      expect: (i) => assert.deepEqual(enqueued(i), ['b']),
    },
    {
      name: 'without a canary, a failed first wave does not pause (within budget)',
      setup: { waves: [['a'], ['b']], hosts: { a: 'failed' }, budget: 1 },
      expect: (i) => assert.deepEqual(enqueued(i), ['b']),
    },
  ]);
});

describe('waves: bake time', () => {
  const after0 = { waves: [['a'], ['b']], hosts: { a: 'converted' as const }, plan: { bakeSeconds: 60 } };
  run([
    {
      name: 'a wave ends: bake until now + bakeSeconds',
      setup: after0,
      expect: [{ kind: 'phase', phase: 'bake', wave: 0, bakeUntil: NOW + 60_000 }],
    },
    {
      name: 'baking, 1 ms before the end: nothing',
      setup: { ...after0, status: { phase: 'bake', bakeUntil: NOW + 1 } },
      expect: [],
    },
    {
      name: 'bake over: next wave preheat (colo not preheated yet)',
      setup: { ...after0, waves: [['a:c1'], ['b:c2']], status: { phase: 'bake', bakeUntil: NOW }, preheat: { c2: undefined } },
      expect: [
        { kind: 'phase', phase: 'preheat', wave: 1, bakeUntil: null },
        { kind: 'preheat', wave: 1, colos: ['c2'] },
      ],
    },
    {
      name: 'bake over, colo already preheated: next wave starts in the same tick',
      setup: { ...after0, status: { phase: 'bake', bakeUntil: NOW - 5 } },
      expect: [
        { kind: 'phase', phase: 'preheat', wave: 1, bakeUntil: null },
        { kind: 'phase', phase: 'rolling', wave: 1, bakeUntil: null },
        { kind: 'enqueue', host: 'b' },
      ],
    },
  ]);
});

describe('waves: the end of a rollout', () => {
  run([
    {
      name: 'last wave converted: done and completed',
      setup: { waves: [['a'], ['b']], hosts: { a: 'converted', b: 'converted' }, status: { wave: 1 } },
      expect: [
        { kind: 'phase', phase: 'done', wave: 1, bakeUntil: null },
        { kind: 'finish-rollout', state: 'completed' },
      ],
    },
    {
      name: 'last wave over with failures within budget: failed',
      setup: { waves: [['a', 'b']], hosts: { a: 'converted', b: 'failed' }, budget: 1 },
      expect: [
        { kind: 'phase', phase: 'done', wave: 0, bakeUntil: null },
        { kind: 'finish-rollout', state: 'failed' },
      ],
    },
    {
      name: 'done but a rescue still running: not finished yet',
      setup: { waves: [['a', 'b']], hosts: { a: 'converted', b: { status: 'failed', rescue: { state: 'running', enqueued: true, at: 1 } } }, budget: 1 },
      expect: [{ kind: 'phase', phase: 'done', wave: 0, bakeUntil: null }],
    },
  ]);
});

describe('waves: failure budget', () => {
  run([
    {
      name: 'failures beyond the budget pause the rollout; nothing new starts, pending hosts keep it open',
      setup: { waves: [['a', 'b', 'c', 'd']], hosts: { a: 'failed', b: 'failed' }, budget: 1 },
      expect: [{ kind: 'pause-rollout', reason: 'failure-budget' }],
    },
    {
      name: 'failures equal to the budget: the rollout goes on',
      setup: { waves: [['a', 'b', 'c']], hosts: { a: 'failed' }, budget: 1 },
      expect: (i) => assert.deepEqual(enqueued(i), ['b', 'c']),
    },
    {
      name: 'after a resume only new failures count',
      setup: { waves: [['a', 'b', 'c', 'd']], hosts: { a: 'failed', b: 'failed' }, budget: 1, status: { failuresAtResume: 1 } },
      expect: (i) => assert.deepEqual(enqueued(i), ['c', 'd']),
    },
    {
      name: 'budget exceeded with no host pending and none in flight: paused, then failed in the same tick',
      setup: { waves: [['a', 'b', 'c']], hosts: { a: 'failed', b: 'failed', c: 'converted' }, budget: 1 },
      expect: [
        { kind: 'pause-rollout', reason: 'failure-budget' },
        { kind: 'finish-rollout', state: 'failed' },
      ],
    },
    {
      name: 'aborted hosts do not count against the budget',
      setup: { waves: [['a', 'b', 'c']], hosts: { a: 'aborted', b: 'aborted' }, budget: 0 },
      expect: (i) => assert.deepEqual(enqueued(i), ['c']),
    },
  ]);
});

describe('waves: pause', () => {
  run([
    {
      name: 'paused with pending hosts and free slots: no enqueue, no finish',
      setup: { waves: [['a', 'b']], status: { state: 'paused', pauseReason: 'operator' } },
      expect: [],
    },
    {
      name: 'paused with hosts in flight: waits',
      setup: { waves: [['a', 'b']], hosts: { a: 'running', b: 'converted' }, status: { state: 'paused' } },
      expect: [],
    },
    {
      name: 'paused, nothing pending or in flight, all converted: completed',
      setup: { waves: [['a'], ['b']], hosts: { a: 'converted', b: 'converted' }, status: { state: 'paused' } },
      expect: [{ kind: 'finish-rollout', state: 'completed' }],
    },
    {
      name: 'paused, nothing pending or in flight, a host skipped: failed',
      setup: { waves: [['a', 'b']], hosts: { a: 'converted', b: 'skipped' }, status: { state: 'paused' } },
      expect: [{ kind: 'finish-rollout', state: 'failed' }],
    },
  ]);
});

describe('waves: abort', () => {
  run([
    {
      name: 'aborting: pending hosts are skipped, hosts in flight asked once to stop, nothing starts',
      setup: {
        waves: [['a', 'b', 'c'], ['d']],
        hosts: { a: 'running', b: { status: 'queued', abortRequested: true }, c: 'converted' },
        status: { state: 'aborting' },
      },
      expect: [
        { kind: 'request-abort', host: 'a' },
        { kind: 'skip-host', host: 'd' },
      ],
    },
    {
      name: 'aborting with nothing in flight: aborted',
      setup: { waves: [['a', 'b']], hosts: { a: 'converted' }, status: { state: 'aborting' } },
      expect: [
        { kind: 'skip-host', host: 'b' },
        { kind: 'finish-rollout', state: 'aborted' },
      ],
    },
    {
      name: 'aborting while a rescue runs: waits for it',
      setup: { waves: [['a']], hosts: { a: { status: 'failed', rescue: { state: 'queued', enqueued: false, at: 1 } } }, status: { state: 'aborting' } },
      expect: [],
    },
    {
      name: 'aborting ignores the failure budget and silent hosts',
      setup: { waves: [['a', 'b', 'c']], hosts: { a: 'failed', b: 'failed', c: { status: 'running', abortRequested: true, lastEventAt: 0 } }, status: { state: 'aborting' } },
      hostTimeoutMs: 1000,
      expect: [],
    },
  ]);
});

describe('waves: silent hosts', () => {
  const silent = (lastEventAt: number | null, queuedAt: number | null = null) => ({ status: 'running' as const, step: 'install-base', seq: 2, lastEventAt, queuedAt });
  run([
    {
      name: 'silent for longer than hostTimeoutMs: timed out at its step',
      setup: { waves: [['a', 'b']], hosts: { a: silent(NOW - 60_001), b: 'converted' }, budget: 1 },
      hostTimeoutMs: 60_000,
      expect: (i) => assert.deepEqual(i[0], { kind: 'time-out-host', host: 'a', step: 'install-base', seq: 2, message: 'no report from the host for 60 s' }),
    },
    {
      name: 'silent for exactly hostTimeoutMs: not yet',
      setup: { waves: [['a']], hosts: { a: silent(NOW - 60_000) } },
      hostTimeoutMs: 60_000,
      expect: [],
    },
    {
      name: 'a queued host never heard of is measured from queuedAt, and defaults to the first step',
      setup: { waves: [['a']], hosts: { a: { status: 'queued', queuedAt: NOW - 5000 } }, budget: 1 },
      hostTimeoutMs: 1000,
      expect: (i) => assert.deepEqual(i[0], { kind: 'time-out-host', host: 'a', step: 'fetch', seq: 0, message: 'no report from the host for 5 s' }),
    },
    {
      name: 'hostTimeoutMs 0: never',
      setup: { waves: [['a']], hosts: { a: silent(0) } },
      hostTimeoutMs: 0,
      expect: [],
    },
    {
      name: 'a timeout counts against the budget in the same tick',
      setup: { waves: [['a', 'b']], hosts: { a: silent(0) }, budget: 0 },
      hostTimeoutMs: 1000,
      expect: (i) => assert.deepEqual(kinds(i), ['time-out-host', 'pause-rollout']),
    },
  ]);
});

describe('waves: applying intents', () => {
  it('each intent writes its effect; host objects are replaced, never changed', () => {
    const { rollout, hosts } = setup({ waves: [['a', 'b', 'c', 'd']], hosts: { b: 'running', c: { status: 'running', step: 'verify', seq: 10 } } });
    const state = { status: { ...rollout.status }, hosts: new HostTable(hosts) };
    const original = structuredClone(new Map(hosts));
    const steps: [WaveIntent, () => void][] = [
      [{ kind: 'enqueue', host: 'a' }, () => assert.deepEqual([state.hosts.get('a')!.status, state.hosts.get('a')!.queuedAt, state.hosts.get('a')!.enqueued], ['queued', NOW, false])],
      [{ kind: 'request-abort', host: 'b' }, () => assert.equal(state.hosts.get('b')!.abortRequested, true)],
      [
        { kind: 'time-out-host', host: 'c', step: 'verify', seq: 10, message: 'm' },
        () => {
          const c = state.hosts.get('c')!;
          assert.deepEqual([c.status, c.error?.code, c.rescue?.state], ['failed', 'SC_ERR_TIMEOUT', 'queued']);
        },
      ],
      [{ kind: 'skip-host', host: 'd' }, () => assert.equal(state.hosts.get('d')!.status, 'skipped')],
      [{ kind: 'phase', phase: 'bake', wave: 0, bakeUntil: NOW + 5 }, () => assert.deepEqual([state.status.phase, state.status.phaseSince, state.status.bakeUntil], ['bake', NOW, NOW + 5])],
      [{ kind: 'pause-rollout', reason: 'operator' }, () => assert.deepEqual([state.status.state, state.status.pauseReason, state.status.updatedAt], ['paused', 'operator', NOW])],
      [{ kind: 'finish-rollout', state: 'failed' }, () => assert.deepEqual([state.status.state, state.status.phase, state.status.finishedAt], ['failed', 'done', NOW])],
    ];
    for (const [intent, check] of steps) {
      applyWaveIntent(state, intent, NOW);
      check();
    }
    assert.deepEqual(new Map(hosts), original);
  });
});
