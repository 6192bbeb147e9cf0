/**
 * Control believes a host's final states only when the host's BullMQ job agrees, and a source's
 * reports only about itself: `completed` reports that another host's agent writes in the
 * victim's name on its own stream, or that appear on the victim's own stream without its job,
 * change nothing in the rollout.
 */
import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { CONVERT_STEPS, keys, queueReport, reportStreamOf, type Source, type StepReport } from '../../shared/protocol/index.js';
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

    // What can be written in the victim's name: by the liar's agent on its own stream (the only
    // one its Redis user may write), and on the victim's own stream (say, by the victim's agent
    // gone wrong): every step of the victim "completed".
    const k = keys(f.prefix);
    const consumed = async (stream: string, last: string) => {
      const groups = (await f.redis.xinfo('GROUPS', stream)) as unknown[][];
      const asObject = (row: unknown[]) => {
        const o: Record<string, unknown> = {};
        for (let i = 0; i + 1 < row.length; i += 2) o[String(row[i])] = row[i + 1];
        return o;
      };
      const ctl = groups.map(asObject).find((x) => x.name === 'control');
      return !!ctl && String(ctl['last-delivered-id']) === last && Number(ctl.pending) === 0;
    };
    for (const source of [{ kind: 'host', host: 'liar' }, { kind: 'host', host: 'victim' }] as Source[]) {
      let last = '';
      for (const [seq, step] of CONVERT_STEPS.entries()) {
        const rep: StepReport = { host: 'victim', rollout: id, seq, step, event: 'completed', ts: Date.now() };
        const res = await queueReport(f.redis.multi(), f.prefix, source, rep).exec();
        last = res![0][1] as string;
      }
      // Wait until control read and acknowledged them.
      const stream = reportStreamOf(f.prefix, source);
      await until(`control consumed the reports on ${stream}`, () => consumed(stream, last));
    }
    assert.equal(await f.redis.llen(k.bell), 0, 'control took every ring');
    // A few more ticks (reconcile included) for anything the reports might have set off.
    await new Promise((res) => setTimeout(res, 2500));
    const afterwards = await view();
    assert.equal(afterwards.status.state, 'running');
    assert.equal(afterwards.hosts[0].status, 'queued', 'the victim is not converted');
    assert.deepEqual(afterwards.hosts[0], before.hosts[0], 'the victim host state did not change');
    assert.deepEqual(afterwards.status.counts, before.status.counts);
  });
});
