/**
 * `stagecoach bundles prune` against a real origin and a real control plane (control-fixture:
 * unique Redis prefix, deleted afterwards): it keeps the newest N versions per name and every
 * bundle a rollout in flight uses, refuses to run without control unless forced, and what it
 * removes is then freed by `origin gc`.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { RunningControl } from '../../services/control/main.js';
import type { Manifest } from '../../shared/manifest.js';
import { cli } from '../helpers/cli.js';
import { controlFixture, type ControlFixture, publishDummy } from './control-fixture.js';

describe('bundles prune', () => {
  let f: ControlFixture;
  let c: RunningControl;
  let readTokenFile: string;
  const published: Manifest[] = [];
  const refs = async () => (await f.origin.client.listBundles()).map((b) => `${b.name}@${b.version}`).sort();
  const prune = (...extra: string[]) => cli(['bundles', 'prune', '--origin', f.origin.url, '--token-file', f.origin.tokenFile, ...extra]);
  const withControl = () => ['--control', c.url, '--control-token-file', readTokenFile];

  before(async () => {
    f = await controlFixture(); // publishes rescue@1.0 (base) and debian@12.1 (target)
    for (const [name, version, role] of [
      ['rescue', '1.1', 'base'],
      ['debian', '12.2', 'target'],
      ['debian', '12.3', 'target'],
      ['rescue', '1.2', 'base'],
      ['debian', '12.4', 'target'],
    ] as const) {
      published.push(await publishDummy(f.origin, f.release.priv, name, version, role));
    }
    readTokenFile = join(f.dir, 'viewer.token');
    writeFileSync(readTokenFile, `viewer:${f.tokens.viewer}\n`, { mode: 0o600 });
    await f.register('h1', 'east');
    c = await f.start();
    // A rollout in flight (no agent takes its jobs) on the oldest base and target.
    const r = await f.call(c.url, 'POST', '/v1/rollouts', { token: f.tokens.ops, body: { base: 'rescue@1.0', target: 'debian@12.1', hosts: ['h1'] } });
    assert.equal(r.status, 201, JSON.stringify(r.body));
  });
  after(async () => {
    await f?.cleanup();
  });

  it('refuses to run without control unless forced, and says how in its hint', async () => {
    const before = await refs();
    const r = await prune('--keep-last', '1');
    assert.equal(r.code, 1);
    assert.match(r.stderr, /error SC_ERR_IN_USE_UNKNOWN: /);
    assert.match(r.stderr, /hint: .*--control URL.*--force-without-control/);
    assert.deepEqual(await refs(), before);
    // Forced (dry run): only the newest per name is kept, in use or not.
    const forced = await prune('--keep-last', '1', '--force-without-control', '--dry-run', '--json', '--name', 'debian');
    assert.equal(forced.code, 0, forced.stderr);
    assert.deepEqual(JSON.parse(forced.stdout).removed.sort(), ['debian@12.1', 'debian@12.2', 'debian@12.3']);
    assert.deepEqual(await refs(), before, 'a dry run removes nothing');
  });

  it('keeps the newest N per name and every bundle control says is in use', async () => {
    const dry = await prune('--keep-last', '1', ...withControl(), '--dry-run', '--json');
    assert.equal(dry.code, 0, dry.stderr);
    const plan = JSON.parse(dry.stdout);
    assert.deepEqual(plan.removed.sort(), ['debian@12.2', 'debian@12.3', 'rescue@1.1']);
    const why = Object.fromEntries(plan.bundles.map((b: { name: string; version: string; reasons: string[] }) => [`${b.name}@${b.version}`, b.reasons]));
    assert.match(why['debian@12.1'].join(' '), /rollout r-\S+ is running/);
    assert.match(why['rescue@1.0'].join(' '), /rollout r-\S+ is running/);
    assert.deepEqual(why['debian@12.4'], ['newest']);

    const r = await prune('--keep-last', '1', ...withControl());
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^removed {6}debian@12\.2$/m);
    assert.match(r.stdout, /^kept {9}debian@12\.1 {2}\(rollout r-\S+ is running\)$/m);
    assert.match(r.stdout, /removed 3 of 7 bundle\(s\); run 'stagecoach origin gc'/);
    assert.deepEqual(await refs(), ['debian@12.1', 'debian@12.4', 'rescue@1.0', 'rescue@1.2']);
    for (const ref of ['debian@12.2', 'debian@12.3', 'rescue@1.1']) {
      const [name, version] = ref.split('@');
      assert.equal(await f.origin.client.lookupManifest(name, version), 'removed', ref);
    }
    // Keeping more than there is removes nothing.
    const more = await prune('--keep-last', '5', ...withControl(), '--json');
    assert.deepEqual(JSON.parse(more.stdout).removed, []);

    // gc (no grace) frees exactly the removed bundles' blobs; the rest still verifies.
    const gc = await cli(['origin', 'gc', '--origin', f.origin.url, '--token-file', f.origin.tokenFile, '--grace', '0', '--json']);
    assert.equal(gc.code, 0, gc.stderr);
    const removedBlobs = published.filter((m) => ['12.2', '12.3', '1.1'].includes(m.version)).map((m) => m.blob.digest);
    assert.deepEqual(JSON.parse(gc.stdout).removed.digests.sort(), removedBlobs.sort());
    for (const m of [f.base, f.target, ...published.filter((p) => ['12.4', '1.2'].includes(p.version))]) {
      assert.deepEqual(await f.origin.client.statBlob(m.blob.digest), { size: m.blob.size });
    }
  });

  it('validates --keep-last', async () => {
    const r = await prune('--keep-last', '0', ...withControl());
    assert.equal(r.code, 1);
    assert.match(r.stderr, /SC_ERR_BAD_REQUEST: --keep-last/);
  });
});
