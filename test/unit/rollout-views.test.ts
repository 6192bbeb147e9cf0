// What the API reads of an active rollout (services/control/rollouts/views.ts): counts fresh from
// the host table, copies that a caller can change without touching control's state, and one
// frozen copy of the spec shared by every view.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { HostTable } from '../../services/control/rollouts/host-table.js';
import { type ActiveRollout, type HostState, newRolloutStatus, pendingHost, type RolloutSpec } from '../../services/control/rollouts/model.js';
import { viewOf } from '../../services/control/rollouts/views.js';

function host(id: string, over: Partial<HostState> = {}): HostState {
  return { ...pendingHost(id, 'c1', 0), ...over };
}

function rollout(): ActiveRollout {
  const ids = ['a', 'b', 'c'];
  const spec = {
    id: 'r-test',
    createdAt: 1,
    actor: 'me',
    base: { name: 'b', version: '1.0.0' },
    target: { name: 't', version: '2.0.0' },
    blobs: { base: 'sha256:00', target: 'sha256:11' },
    manifests: { base: 'sha256:22', target: 'sha256:33' },
    selector: { colos: ['c1'] },
    plan: { canary: 0, waves: ['100%'], maxInFlight: 10, maxInFlightPerColo: 10, failureBudget: 0, bakeSeconds: 0 },
    waves: [ids],
    budget: 0,
    hostCount: ids.length,
  } as unknown as RolloutSpec;
  const status = { ...newRolloutStatus(1, ids.length), phase: 'rolling' as const };
  return { spec, status, preheat: {}, hosts: new HostTable(ids.map((id) => [id, host(id)])), lastPreheatPoll: 0, lastReconcile: 0, reconciledAt: new Map() };
}

describe('rollouts: views', () => {
  it('counts come from the hosts as they are now, not from the last write', () => {
    const a = rollout();
    a.hosts.set('a', host('a', { status: 'running' }));
    a.hosts.set('b', host('b', { status: 'converted' }));
    const stored = structuredClone(a.status);
    const v = viewOf(a, false);
    assert.deepEqual([v.status.counts.running, v.status.counts.converted, v.status.counts.pending, v.status.counts.inFlight], [1, 1, 1, 1]);
    assert.deepEqual(a.status, stored, 'the live status is not changed by a view');
  });

  it('views share one frozen copy of the spec; their status and hosts are their own', () => {
    const a = rollout();
    const v1 = viewOf(a, true);
    const v2 = viewOf(a, true);
    assert.equal(v1.spec, v2.spec);
    assert.notEqual(v1.spec, a.spec);
    assert.deepEqual(v1.spec, a.spec);
    assert.throws(() => {
      v1.spec.waves[0].push('x');
    }, TypeError);
    assert.throws(() => {
      (v1.spec.plan as { maxInFlight: number }).maxInFlight = 1;
    }, TypeError);
    v1.status.state = 'paused';
    v1.hosts![0].status = 'failed';
    assert.equal(a.status.state, 'running');
    assert.equal(a.hosts.get('a')!.status, 'pending');
    assert.deepEqual(a.spec.waves, [['a', 'b', 'c']]);
  });
});
