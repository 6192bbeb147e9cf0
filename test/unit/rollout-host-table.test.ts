// The indexed host table of a rollout (services/control/rollouts/host-table.ts): after any
// sequence of changes its answers equal a recount of its hosts; an overlay answers as the table
// with the overlay's changes would, and leaves the table as it was; where the pending hosts of a
// wave begin follows the hosts. Seeded random changes, no clock, no Redis.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { HostOverlay, type HostIndex, HostTable, needsEnqueue } from '../../services/control/rollouts/host-table.js';
import { type HostState, type HostStatus, IN_FLIGHT_HOST, pendingHost, rescueOpen, TERMINAL_HOST } from '../../services/control/rollouts/model.js';

const STATUSES: HostStatus[] = ['pending', 'queued', 'running', 'converted', 'failed', 'aborted', 'skipped'];
const RESCUES: HostState['rescue'][] = [null, { state: 'queued', enqueued: false, at: 1 }, { state: 'running', enqueued: true, at: 1 }, { state: 'done', enqueued: true, at: 1 }];
const COLOS = ['c1', 'c2', 'c3'];

/** A small deterministic generator (mulberry32). */
function rng(seed: number): () => number {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function host(id: string, over: Partial<HostState> = {}): HostState {
  return { ...pendingHost(id, 'c1', 0), ...over };
}

function randomHost(id: string, r: () => number): HostState {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(r() * xs.length)];
  return host(id, { colo: pick(COLOS), wave: Math.floor(r() * 3), status: pick(STATUSES), enqueued: r() < 0.5, rescue: pick(RESCUES) });
}

/** Every answer of an index, recounted from its hosts. */
function recount(hosts: HostState[]) {
  const count = (p: (h: HostState) => boolean) => hosts.filter(p).length;
  return {
    statuses: Object.fromEntries(STATUSES.map((s) => [s, count((h) => h.status === s)])),
    withStatus: Object.fromEntries(STATUSES.map((s) => [s, hosts.filter((h) => h.status === s).map((h) => h.host).sort()])),
    colos: Object.fromEntries(COLOS.map((c) => [c, count((h) => h.colo === c && IN_FLIGHT_HOST.includes(h.status))])),
    waves: [0, 1, 2].map((w) => count((h) => h.wave === w && !TERMINAL_HOST.includes(h.status))),
    hasWork: hosts.some((h) => IN_FLIGHT_HOST.includes(h.status) || rescueOpen(h)),
  };
}

function answers(ix: HostIndex) {
  return {
    statuses: Object.fromEntries(STATUSES.map((s) => [s, ix.count(s)])),
    withStatus: Object.fromEntries(STATUSES.map((s) => [s, [...ix.withStatus(s)].map((h) => h.host).sort()])),
    colos: Object.fromEntries(COLOS.map((c) => [c, ix.inFlightIn(c)])),
    waves: [0, 1, 2].map((w) => ix.openInWave(w)),
    hasWork: ix.hasWork(),
  };
}

describe('rollouts: the host table', () => {
  it('answers as a recount of its hosts after every change', () => {
    const r = rng(7);
    const t = new HostTable();
    for (let i = 0; i < 40; i++) t.set(`h${i}`, randomHost(`h${i}`, r));
    for (let step = 0; step < 400; step++) {
      const id = `h${Math.floor(r() * 45)}`;
      if (r() < 0.05) t.delete(id);
      else t.set(id, randomHost(id, r));
      const hosts = [...t.values()];
      assert.deepEqual(answers(t), recount(hosts), `after change ${step}`);
      const c = t.counts();
      assert.equal(c.inFlight, hosts.filter((h) => IN_FLIGHT_HOST.includes(h.status)).length);
      assert.equal(c.rescued, hosts.filter((h) => h.rescue?.state === 'done').length);
      assert.deepEqual(t.due().map((h) => h.host).sort(), hosts.filter(needsEnqueue).map((h) => h.host).sort());
      assert.deepEqual(
        [...t.working()].map((h) => h.host).sort(),
        hosts.filter((h) => IN_FLIGHT_HOST.includes(h.status) || rescueOpen(h)).map((h) => h.host).sort(),
      );
    }
    t.clear();
    assert.deepEqual(answers(t), recount([]));
  });

  it('is built from entries like a Map, in their order', () => {
    const t = new HostTable([['b', host('b', { status: 'running' })], ['a', host('a')]]);
    assert.deepEqual([...t.keys()], ['b', 'a']);
    assert.equal(t.count('running'), 1);
    assert.equal(t.inFlightIn('c1'), 1);
  });

  it('an overlay answers as the table with its changes would, and leaves the table as it was', () => {
    const r = rng(11);
    const t = new HostTable();
    for (let i = 0; i < 30; i++) t.set(`h${i}`, randomHost(`h${i}`, r));
    for (let round = 0; round < 20; round++) {
      const before = { hosts: new Map(t), answers: answers(t), counts: t.counts() };
      const o = new HostOverlay(t);
      const expected = new Map(t);
      for (let k = 0; k < 10; k++) {
        const id = `h${Math.floor(r() * 30)}`;
        const h = { ...randomHost(id, r), colo: expected.get(id)!.colo, wave: expected.get(id)!.wave };
        o.set(id, h);
        expected.set(id, h);
        assert.deepEqual(answers(o), recount([...expected.values()]));
        assert.equal(o.get(id), h);
      }
      assert.deepEqual({ hosts: new Map(t), answers: answers(t), counts: t.counts() }, before);
      // The table then takes the same changes, as the engine does with the scheduler's intents
      // (the overlay is done with: it is a view of the table as it was).
      const thought = answers(o);
      for (const [id, h] of expected) if (t.get(id) !== h) t.set(id, h);
      assert.deepEqual(answers(t), thought);
    }
  });

  it('an overlay refuses a host its table does not have', () => {
    assert.throws(() => new HostOverlay(new HostTable()).set('x', host('x')), /only changes hosts of its table/);
  });

  it('where pending hosts of a wave begin moves on as they start, and back when one is pending again', () => {
    const wave = ['a', 'b', 'c', 'd'];
    const t = new HostTable(wave.map((id) => [id, host(id)]));
    assert.equal(t.pendingFrom(0, wave), 0);
    t.set('a', host('a', { status: 'queued' }));
    t.set('b', host('b', { status: 'running' }));
    assert.equal(t.pendingFrom(0, wave), 2);
    t.set('c', host('c', { status: 'skipped' }));
    t.set('d', host('d', { status: 'converted' }));
    assert.equal(t.pendingFrom(0, wave), 4);
    t.set('b', host('b'));
    assert.equal(t.pendingFrom(0, wave), 1);
  });
});
