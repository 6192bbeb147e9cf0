/**
 * The agent's fetch through the colo's stages: when the stage it downloads from dies in the
 * middle of a blob, the download continues from the next stage with a Range request, and the
 * bundle still verifies.
 */
import assert from 'node:assert/strict';
import { mkdir, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { convertSequence } from '../../shared/protocol/index.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import { createSimHosts, type FleetAgents, packBundleFile, startFleetAgents } from '../../services/demo/fleet.js';
import { makeSampleRootfs } from '../../shared/bundle/index.js';
import type { Manifest } from '../../shared/manifest.js';
import { silentLogger } from '../../shared/log.js';
import { startTestFleet, type TestFleet, until } from '../helpers/fleet.js';
import { startTestOrigin, type TestOrigin } from '../helpers/test-origin.js';

describe('agent: fetch through stages', () => {
  let f: TestFleet;
  let up: TestOrigin;
  const stages: RunningStage[] = [];
  let agents: FleetAgents;
  const bundles: Manifest[] = [];
  before(async () => {
    f = await startTestFleet({ agents: false });
    // Both stages fill from one slow upstream, so a download takes a few seconds.
    up = await startTestOrigin({ rateBytesPerSec: 4_000_000 });
    const work = join(f.root, 'work');
    for (const [name, role, id, version, fmt] of [
      ['base-os', 'base', 'debian', '12', 'ifupdown'],
      ['target-os', 'target', 'ubuntu', '24.04', 'netplan'],
    ] as const) {
      const dir = join(work, name);
      await mkdir(dir, { recursive: true });
      await makeSampleRootfs(dir, { id, name: id, version, netFormat: fmt, sizeMiB: 4 });
      const file = join(work, `${name}.bundle`);
      const m = await packBundleFile(f.keys, { name, version: '1', role, dir, os: { id, version, netFormat: fmt } }, file);
      await up.addBlobFile(file);
      up.addManifest(m);
      bundles.push(m);
    }
    for (const n of [1, 2]) {
      stages.push(
        await startStage(
          { listen: '127.0.0.1:0', upstreams: [up.url], cache: join(f.root, `stage-${n}`), colo: 'x', trustKeys: [f.keys.files.releasePub], logLevel: 'silent' },
          { log: silentLogger },
        ),
      );
    }
    const hosts = await createSimHosts(join(f.root, 'more'), [{ name: 'x', hosts: 1 }]);
    f.hosts.push(...hosts);
    agents = await startFleetAgents(hosts, { redisUrl: f.redisUrl, prefix: f.prefix, keys: f.keys, stages: { x: stages.map((s) => s.url) } });
  });
  after(async () => {
    await agents?.stop();
    for (const s of stages) await s.close();
    await up?.close();
    await f?.cleanup();
  });

  it('continues from the next stage with Range when its stage dies mid-blob', async () => {
    const host = 'x-h1';
    const [base, target] = bundles;
    const ref = (m: Manifest) => ({ name: m.name, version: m.version });
    const ids = await f.enqueue(host, convertSequence(ref(base), ref(target)).slice(0, 1));
    const stateDir = join(f.hosts.find((h) => h.hostId === host)!.dir, 'disks/disk1/p1/var/lib/stagecoach/bundles');
    const partial = join(stateDir, `${base.blob.digest.slice(7)}.bundle.partial`);
    // Wait until a good part of B is on the host, then kill the stage serving it.
    await until(async () => ((await stat(partial).catch(() => null))?.size ?? 0) > base.blob.size / 4, 30_000, 'a quarter of B on the host');
    const serving = stages.find((s) => s.fills().some((x) => x.digest === base.blob.digest))!;
    assert.ok(serving, 'one stage is filling B');
    const other = stages.find((s) => s !== serving)!;
    const servingUrl = serving.url;
    await serving.close();

    const o = await f.waitJob(host, ids[0], 60_000);
    assert.equal(o.state, 'completed', o.failedReason);
    const fetched = (o.returnvalue as { fetched: { bundle: string; sources: string[]; downloaded: number; size: number }[] }).fetched;
    const b = fetched.find((x) => x.bundle === 'base-os@1')!;
    assert.deepEqual(b.sources, [servingUrl, other.url], 'B came from the dying stage, then from the other one');
    assert.ok(b.downloaded <= b.size * 1.02, `no restart from byte 0: ${b.downloaded} bytes received for ${b.size}`);
    const kept = await readdir(stateDir);
    assert.ok(kept.includes(`${base.blob.digest.slice(7)}.bundle`));
    assert.ok(kept.includes('base-os@1.manifest.json'));
    assert.ok(!kept.some((n) => n.endsWith('.partial')));
  });
});
