/**
 * The control CLI's errors and token files against a real control plane (real Redis, own
 * prefix, port 0): unknown rollouts are not found (a finished one is a conflict), text mode
 * gives a refused request's reasons, control's own token file works as --token-file, and a
 * listing into a closed pipe ends quietly.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { RunningControl } from '../../services/control/main.js';
import { cli, lines } from '../helpers/cli.js';
import { type ControlFixture, controlFixture, until } from './control-fixture.js';

describe('control CLI errors', () => {
  let f: ControlFixture;
  let c: RunningControl;
  let skew = 0;
  let bare: string; // a file with the bare token: what every version of the CLI reads

  before(async () => {
    f = await controlFixture();
    for (let i = 1; i <= 40; i++) await f.register(`h${i}`, 'east');
    c = await f.start({ hostTimeoutSec: 60 }, { now: () => Date.now() + skew });
    bare = join(f.dir, 'ops.token');
    writeFileSync(bare, `${f.tokens.ops}\n`);
  });
  after(async () => {
    await f?.cleanup();
  });

  const ctl = (args: string[]) => cli([...args, '--control', c.url]);

  it("takes control's own token file (NAME:TOKEN lines, a comment first) as --token-file", async () => {
    const r = await ctl(['rollout', 'create', '--base', 'rescue@1.0', '--target', 'debian@12.1', '--hosts', 'h1', '--token-file', f.tokenFile, '--actor', 'dana']);
    assert.equal(r.code, 0, r.stderr);
    const id = r.stdout.trim();
    assert.match(id, /^r-/);
    const audit = (await f.call(c.url, 'GET', '/v1/audit?limit=5')).body.entries as { action: string; token: string; target: string }[];
    assert.ok(audit.some((e) => e.action === 'rollout.create' && e.target === id && e.token === 'ops'));
  });

  it('pause, resume and abort of an unknown rollout: SC_ERR_NOT_FOUND from the API and the CLI', async () => {
    for (const verb of ['pause', 'resume', 'abort']) {
      const api = await f.call(c.url, 'POST', `/v1/rollouts/r-nope/${verb}`, { token: f.tokens.ops });
      assert.equal(api.status, 404, verb);
      assert.equal(api.body.error.code, 'SC_ERR_NOT_FOUND');
      const r = await ctl(['rollout', verb, 'r-nope', '--token-file', bare]);
      assert.equal(r.code, 1);
      assert.deepEqual(lines(r.stderr), ['error SC_ERR_NOT_FOUND: no rollout r-nope'], `${verb}: ${r.stderr}`);
    }
  });

  it('a rollout that exists but is finished stays a conflict', async () => {
    const r = await f.call(c.url, 'POST', '/v1/rollouts', { token: f.tokens.ops, body: { base: 'rescue@1.0', target: 'debian@12.1', hosts: ['h2'] } });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    const id = r.body.spec.id as string;
    await until('queued', async () => (await f.call(c.url, 'GET', `/v1/rollouts/${id}`)).body.hosts[0].status === 'queued');
    skew = 61_000; // h2 has no agent: it times out, and the rollout fails
    await until('failed', async () => (await f.call(c.url, 'GET', `/v1/rollouts/${id}`)).body.status.state === 'failed');
    const api = await f.call(c.url, 'POST', `/v1/rollouts/${id}/pause`, { token: f.tokens.ops });
    assert.equal(api.status, 409);
    assert.equal(api.body.error.code, 'SC_ERR_CONFLICT');
    const cliRes = await ctl(['rollout', 'resume', id, '--token-file', bare]);
    assert.equal(cliRes.code, 1);
    assert.deepEqual(lines(cliRes.stderr), [`error SC_ERR_CONFLICT: rollout ${id} is failed`]);
  });

  it('rollout create with a bad bundle ref: text mode shows the reasons --json shows', async () => {
    const args = ['rollout', 'create', '--base', 'rescue', '--target', 'Debian@12.1', '--hosts', 'h3', '--token-file', bare];
    const json = await ctl([...args, '--json']);
    assert.equal(json.code, 1);
    const issues = JSON.parse(json.stdout).error.details.issues as string[];
    assert.ok(issues.length >= 1);
    const text = await ctl(args);
    assert.equal(text.code, 1);
    assert.equal(lines(text.stderr).length, 1, text.stderr);
    assert.match(text.stderr, /^error SC_ERR_BAD_REQUEST: invalid rollout request: /);
    for (const i of issues) assert.ok(text.stderr.includes(i), `text mode lacks "${i}": ${text.stderr}`);
  });

  it('hosts into a closed pipe ends quietly with status 0', async () => {
    const r = await cli(['hosts', '--control', c.url, '--token-file', f.tokenFile], { closeStdout: true });
    assert.equal(r.stderr, '');
    assert.equal(r.code, 0);
  });
});
