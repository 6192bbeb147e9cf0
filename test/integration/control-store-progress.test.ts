/**
 * The rollout store writes a host changed only by progress reports lazily: the in-memory copy
 * (what the API reads) and the change event are immediate, the Redis write comes with the
 * rollout's next real change or once PROGRESS_PERSIST_MS passed. Real Redis, own prefix.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { Redis } from 'ioredis';
import { type ActiveRollout, type ChangeEvent, type HostState, newRolloutStatus, pendingHost } from '../../services/control/rollouts/model.js';
import { HostTable } from '../../services/control/rollouts/host-table.js';
import { PROGRESS_PERSIST_MS, RolloutStore } from '../../services/control/rollouts/store.js';
import { deletePrefix, REDIS_URL } from './control-fixture.js';

function host(id: string): HostState {
  return { ...pendingHost(id, 'east', 0), status: 'running', step: 'fetch', steps: { fetch: { state: 'running' } }, enqueued: true, queuedAt: 1, startedAt: 1, lastEventAt: 1 };
}

function rollout(id: string, hosts: string[]): ActiveRollout {
  const ref = { name: 'x', version: '1' };
  return {
    spec: {
      id,
      createdAt: 1,
      actor: 'test',
      base: ref,
      target: ref,
      blobs: { base: 'b', target: 't' },
      manifests: { base: 'b', target: 't' },
      selector: { hosts },
      plan: { canary: 0, waves: ['100%'], maxInFlight: 10, maxInFlightPerColo: 10, failureBudget: '0', bakeSeconds: 0 } as ActiveRollout['spec']['plan'],
      waves: [hosts],
      budget: 0,
      hostCount: hosts.length,
    },
    status: { ...newRolloutStatus(1, 0), phase: 'rolling' },
    preheat: {},
    hosts: new HostTable(hosts.map((h) => [h, host(h)])),
    lastPreheatPoll: 0,
    lastReconcile: 0,
    reconciledAt: new Map(),
  };
}

describe('rollout store: progress-only changes', () => {
  const prefix = `sc-test-store-${randomBytes(4).toString('hex')}`;
  let redis: Redis;
  before(() => {
    redis = new Redis(REDIS_URL, { lazyConnect: false });
  });
  after(async () => {
    await deletePrefix(redis, prefix);
    redis.disconnect();
  });

  it('are written with the next real change, or after PROGRESS_PERSIST_MS, and reported at once', async () => {
    let now = 1_000_000;
    const changes: ChangeEvent[] = [];
    const store = new RolloutStore({ redis, prefix, now: () => now, onChange: (c) => changes.push(c) });
    const a = rollout('r-progress-1', ['h1', 'h2']);
    await store.insertRollout(a);
    const stored = async (h: string) => JSON.parse((await redis.hget(store.key('r', a.spec.id, 'hosts'), h)) ?? 'null') as HostState;
    const progress = (h: string, percent: number) => {
      const cur = a.hosts.get(h)!;
      a.hosts.set(h, { ...cur, lastEventAt: now, steps: { ...cur.steps, fetch: { ...cur.steps.fetch, percent } } });
      store.touchProgress(a, h);
    };

    // A progress report: memory has it and a change is reported, Redis does not have it yet.
    progress('h1', 40);
    await store.flush();
    assert.equal((await stored('h1')).steps.fetch.percent, undefined, 'not written at once');
    assert.deepEqual(changes, [{ kind: 'rollout', id: a.spec.id }]);
    assert.equal(store.active.get(a.spec.id)?.hosts.get('h1')?.steps.fetch.percent, 40);

    // A flush with no new progress reports nothing.
    await store.flush();
    assert.equal(changes.length, 1);

    // More progress within the window: still not written.
    now += PROGRESS_PERSIST_MS - 1;
    progress('h1', 60);
    await store.flush();
    assert.equal((await stored('h1')).steps.fetch.percent, undefined);
    assert.equal(changes.length, 2);

    // The window since the first unwritten progress is over: written, with its lastEventAt.
    now += 1;
    await store.flush();
    assert.equal((await stored('h1')).steps.fetch.percent, 60);
    assert.equal((await stored('h1')).lastEventAt, now - 1);

    // Progress rides along with a real change of another host of the rollout.
    now += 1;
    progress('h1', 80);
    a.hosts.set('h2', { ...a.hosts.get('h2')!, status: 'converted', finishedAt: now });
    store.touchHost(a, 'h2');
    await store.flush();
    assert.equal((await stored('h1')).steps.fetch.percent, 80);
    assert.equal((await stored('h2')).status, 'converted');
    assert.equal(changes.length, 4);
  });

  it('writes a rollout\'s preheat only when it was marked changed, not with every status write', async () => {
    const store = new RolloutStore({ redis, prefix, now: () => 1, onChange: () => {} });
    const a = rollout('r-preheat-1', ['h1']);
    await store.insertRollout(a);
    const preheat = async () => JSON.parse((await redis.hget(store.key('r', a.spec.id), 'preheat')) ?? 'null');
    a.preheat.east = { colo: 'east', wave: 0, state: 'done', startedAt: 1, finishedAt: 2, stages: [] };
    a.status.wave = 1;
    store.touchRollout(a.spec.id);
    await store.flush();
    assert.deepEqual(await preheat(), {});
    assert.equal(JSON.parse((await redis.hget(store.key('r', a.spec.id), 'status')) ?? 'null').wave, 1);
    store.touchPreheat(a.spec.id);
    await store.flush();
    assert.equal((await preheat()).east.state, 'done');
  });
});
