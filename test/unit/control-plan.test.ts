import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { isScError } from '../../shared/errors.js';
import { cumulativeTargets, orderHosts, parseCreateRollout, planWaves, resolveAmount, resolveBudget } from '../../services/control/plan.js';
import { parseStagesFlag, parseTokens } from '../../services/control/config.js';

const hosts = (spec: Record<string, number>) =>
  Object.entries(spec).flatMap(([colo, n]) => Array.from({ length: n }, (_, i) => ({ host: `${colo}-h${i + 1}`, colo })));

describe('wave planning', () => {
  it('resolves counts and percentages (ceil for waves, floor for budgets)', () => {
    assert.equal(resolveAmount(5, 3, 'ceil'), 3);
    assert.equal(resolveAmount('20%', 10, 'ceil'), 2);
    assert.equal(resolveAmount('20%', 11, 'ceil'), 3);
    assert.equal(resolveAmount('1%', 10, 'ceil'), 1);
    assert.equal(resolveAmount('15%', 10, 'floor'), 1);
    assert.equal(resolveAmount('5%', 10, 'floor'), 0);
    assert.equal(resolveAmount('100%', 7, 'ceil'), 7);
  });

  it('waves are cumulative targets, canary first, duplicates dropped, 100% implied', () => {
    assert.deepEqual(cumulativeTargets({ canary: 0, waves: [1, 5, '20%', '100%'] }, 100), [1, 5, 20, 100]);
    assert.deepEqual(cumulativeTargets({ canary: 1, waves: [1, 5, '20%', '100%'] }, 100), [1, 5, 20, 100]);
    assert.deepEqual(cumulativeTargets({ canary: 2, waves: ['50%'] }, 6), [2, 3, 6]);
    assert.deepEqual(cumulativeTargets({ canary: 0, waves: [3] }, 6), [3, 6]);
    assert.deepEqual(cumulativeTargets({ canary: 0, waves: [5, 2, '10%'] }, 6), [5, 6]);
    assert.deepEqual(cumulativeTargets({ canary: 10, waves: ['100%'] }, 4), [4]);
  });

  it('orders hosts colo round-robin with natural sorting', () => {
    const o = orderHosts([
      { host: 'b-h10', colo: 'b' },
      { host: 'a-h2', colo: 'a' },
      { host: 'b-h2', colo: 'b' },
      { host: 'a-h10', colo: 'a' },
      { host: 'a-h1', colo: 'a' },
    ]);
    assert.deepEqual(
      o.map((h) => h.host),
      ['a-h1', 'b-h2', 'a-h2', 'b-h10', 'a-h10'],
    );
  });

  it('splits a 2-colo selection into waves covering every host once', () => {
    const sel = hosts({ east: 3, west: 3 });
    const waves = planWaves(sel, { canary: 1, waves: [3, '100%'] });
    assert.deepEqual(waves, [['east-h1'], ['west-h1', 'east-h2'], ['west-h2', 'east-h3', 'west-h3']]);
    assert.equal(new Set(waves.flat()).size, 6);
  });

  it('budgets', () => {
    assert.equal(resolveBudget({ failureBudget: 1 }, 6), 1);
    assert.equal(resolveBudget({ failureBudget: '50%' }, 5), 2);
    assert.equal(resolveBudget({ failureBudget: '0%' }, 5), 0);
  });
});

describe('rollout request validation', () => {
  const ok = { base: 'rescue@1.0', target: 'debian@12.1', hosts: ['h1'] };
  const bad = (body: unknown, re: RegExp) => {
    assert.throws(
      () => parseCreateRollout(body),
      (err) => isScError(err, 'SC_ERR_BAD_REQUEST') && re.test(JSON.stringify(err.details ?? err.message) + err.message),
    );
  };

  it('fills plan defaults', () => {
    const r = parseCreateRollout(ok);
    assert.deepEqual(r.plan, { canary: 0, waves: ['100%'], maxInFlight: 10, failureBudget: 0, bakeSeconds: 0 });
  });

  it('refuses malformed requests with the zod issues', () => {
    bad({ ...ok, base: 'nope' }, /base/);
    bad({ ...ok, target: 'UPPER@1' }, /target/);
    bad({ base: ok.base, target: ok.target }, /exactly one/);
    bad({ ...ok, colos: ['a'] }, /exactly one/);
    bad({ ...ok, hosts: ['../x'] }, /host/);
    bad({ ...ok, plan: { waves: ['0%'] } }, /waves/);
    bad({ ...ok, plan: { waves: ['120%'] } }, /waves/);
    bad({ ...ok, plan: { waves: [] } }, /waves/);
    bad({ ...ok, plan: { maxInFlight: 0 } }, /maxInFlight/);
    bad({ ...ok, plan: { failureBudget: -1 } }, /failureBudget/);
    bad({ ...ok, plan: { bakeSeconds: 'x' } }, /bakeSeconds/);
    bad({ ...ok, plan: { surprise: 1 } }, /surprise/);
    bad({ ...ok, extra: 1 }, /extra/);
    bad({ ...ok, hosts: ['h1', 'h1'] }, /twice/);
  });

  it('accepts percentages and counts mixed', () => {
    const r = parseCreateRollout({ ...ok, plan: { canary: 1, waves: [1, 5, '20%', '100%'], failureBudget: '10%', maxInFlightPerColo: 2 } });
    assert.deepEqual(r.plan.waves, [1, 5, '20%', '100%']);
    assert.equal(r.plan.maxInFlightPerColo, 2);
  });
});

describe('control config parsing', () => {
  it('parses named tokens', () => {
    assert.deepEqual(parseTokens('# ops\nalice:abc\n\nbare-token\n'), [
      { name: 'alice', token: 'abc' },
      { name: 'admin', token: 'bare-token' },
    ]);
    assert.throws(() => parseTokens('\n# nothing\n'), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
    assert.throws(() => parseTokens('a:1\na:2'), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
  });

  it('parses --stages', () => {
    const m = parseStagesFlag(['east=http://127.0.0.1:1/', 'east=http://127.0.0.1:2', 'west=https://s.example:8443']);
    assert.deepEqual(m.get('east'), ['http://127.0.0.1:1', 'http://127.0.0.1:2']);
    assert.deepEqual(m.get('west'), ['https://s.example:8443']);
    assert.throws(() => parseStagesFlag(['nocolo']), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
    assert.throws(() => parseStagesFlag(['East=http://x']), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
  });
});
