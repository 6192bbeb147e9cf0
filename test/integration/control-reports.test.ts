/**
 * Control believes a host's final states only when the host's BullMQ job agrees: `completed`
 * reports that anyone with write access to the reports stream (every direct agent, every relay)
 * writes for another host change nothing in the rollout.
 */
import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { CONVERT_STEPS, keys, type StepReport } from '../../shared/protocol/index.js';
import { type ControlFixture, controlFixture, until } from './control-fixture.js';

describe('control: final reports are checked against BullMQ', () => {
  let f: ControlFixture;
  after(async () => {
    await f?.cleanup();
  });

  it('a spoofed completed report for another host changes nothing in the rollout', async () => {
    f = await controlFixture();
    await f.register('victim', 'east');
    await f.register('liar', 'east');
    const c = await f.start();
    const r = await f.call(c.url, 'POST', '/v1/rollouts', { token: f.tokens.ops, body: { base: 'rescue@1.0', target: 'debian@12.1', hosts: ['victim'] } });
    assert.equal(r.status, 201);
    const id = r.body.spec.id;
    const view = async () => (await f.call(c.url, 'GET', `/v1/rollouts/${id}`)).body;
    // The victim's sequence is enqueued; no agent runs it.
    await until('queued and enqueued', async () => {
      const h = (await view()).hosts[0];
      return h.status === 'queued' && h.enqueued;
    });
    const before = await view();

    // What the liar's agent can write: every step of the victim "completed", in its name.
    const k = keys(f.prefix);
    let last = '';
    for (const [seq, step] of CONVERT_STEPS.entries()) {
      const rep: StepReport = { host: 'victim', rollout: id, seq, step, event: 'completed', ts: Date.now() };
      last = (await f.redis.xadd(k.reports, '*', 'r', JSON.stringify(rep))) as string;
    }
    // Wait until control read and acknowledged them.
    await until('control consumed the reports', async () => {
      const groups = (await f.redis.xinfo('GROUPS', k.reports)) as unknown[][];
      const asObject = (row: unknown[]) => {
        const o: Record<string, unknown> = {};
        for (let i = 0; i + 1 < row.length; i += 2) o[String(row[i])] = row[i + 1];
        return o;
      };
      const ctl = groups.map(asObject).find((x) => x.name === 'control');
      return ctl && String(ctl['last-delivered-id']) === last && Number(ctl.pending) === 0;
    });
    // A few more ticks (reconcile included) for anything the reports might have set off.
    await new Promise((res) => setTimeout(res, 2500));
    const afterwards = await view();
    assert.equal(afterwards.status.state, 'running');
    assert.equal(afterwards.hosts[0].status, 'queued', 'the victim is not converted');
    assert.deepEqual(afterwards.hosts[0], before.hosts[0], 'the victim host state did not change');
    assert.deepEqual(afterwards.status.counts, before.status.counts);
  });
});
