/**
 * `stagecoach bundles prune` never removes the base and target a converted host keeps, even when
 * the rollout that converted it is finished and newer versions exist: one real sim host is
 * converted by a real control plane (control-fleet-fixture, unique Redis prefix), then prune
 * runs against that control.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { sha256Of } from '../../shared/digest.js';
import { type Manifest, signManifest } from '../../shared/manifest.js';
import { cli } from '../helpers/cli.js';
import { type ControlFleet, startControlFleet } from './control-fleet-fixture.js';

describe('bundles prune with a converted host', () => {
  let cf: ControlFleet;
  const ref = (m: Pick<Manifest, 'name' | 'version'>) => `${m.name}@${m.version}`;

  before(async () => {
    cf = await startControlFleet({ colos: [{ name: 'east', hosts: 1 }] });
  });
  after(async () => {
    await cf?.cleanup();
  });

  it('keeps what the host keeps after its rollout finished, and removes the older unused rest', async () => {
    const { base, target } = cf.fleet;
    const created = await cf.client.createRollout({ base: ref(base), target: ref(target), hosts: ['east-h1'] });
    const end = await cf.waitRollout(created.spec.id);
    assert.equal(end.status.state, 'completed', JSON.stringify(end.hosts.map((h) => [h.host, h.status, h.error])));

    // Newer versions of both names, then one more of each: the converted pair is now the oldest.
    const origin = cf.fleet.origin.client;
    const newer: Manifest[] = [];
    for (const v of ['90.1', '90.2']) {
      for (const m of [base, target]) {
        const blob = randomBytes(4096);
        await origin.putBlob(Readable.from([blob]), sha256Of(blob), blob.length);
        const next = signManifest({ ...m, version: v, blob: { ...m.blob, digest: sha256Of(blob), size: blob.length }, publishedAt: new Date().toISOString(), signatures: [] }, cf.fleet.keys.releaseKey);
        await origin.putManifest(next);
        newer.push(next);
      }
    }
    const tokenFile = join(cf.root, 'prune-origin.token');
    writeFileSync(tokenFile, `${cf.fleet.origin.token}\n`, { mode: 0o600 });
    const readToken = join(cf.root, 'prune-control.token');
    writeFileSync(readToken, `viewer:${cf.readToken}\n`, { mode: 0o600 });

    const r = await cli([
      'bundles', 'prune', '--origin', cf.fleet.origin.url, '--token-file', tokenFile,
      '--keep-last', '1', '--control', cf.control.url, '--control-token-file', readToken, '--json',
    ]);
    assert.equal(r.code, 0, r.stderr);
    const out = JSON.parse(r.stdout);
    assert.deepEqual(out.removed.sort(), [`${base.name}@90.1`, `${target.name}@90.1`].sort());
    const why = Object.fromEntries(out.bundles.map((b: { name: string; version: string; reasons: string[] }) => [`${b.name}@${b.version}`, b.reasons]));
    for (const m of [base, target]) assert.deepEqual(why[ref(m)], [`host east-h1 keeps it (rollout ${created.spec.id})`], ref(m));
    const left = (await origin.listBundles()).map((b) => `${b.name}@${b.version}`).sort();
    assert.deepEqual(left, [ref(base), ref(target), `${base.name}@90.2`, `${target.name}@90.2`].sort());
  });
});
