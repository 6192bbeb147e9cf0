/**
 * install-base in one pass over B: the unpack of B onto disk2p1 follows the copy of B onto
 * disk2p2 while it is written (the worker path, forced for small bundles with
 * `unpackWorkerMinBytes: 0`), and B counts as installed only once the copy's digest check passed.
 * The real fetch, partition and install-base steps run on a sim machine, against a real HTTP
 * upstream on 127.0.0.1.
 */
import assert from 'node:assert/strict';
import { closeSync, openSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { KeptStore } from '../../services/agent/bundles.js';
import { SimMachine } from '../../services/agent/machine/sim.js';
import { fetchStep } from '../../services/agent/steps/fetch.js';
import { installBundle } from '../../services/agent/steps/common.js';
import { installBaseStep } from '../../services/agent/steps/install-base.js';
import { partitionStep } from '../../services/agent/steps/partition.js';
import type { StepContext } from '../../services/agent/steps/step.js';
import { createSimHosts, type FleetKeys, makeFleetKeys, packBundleFile } from '../../services/demo/fleet.js';
import { makeSampleRootfs } from '../../shared/bundle/index.js';
import { unpackFile, WriteMark } from '../../shared/bundle/unpack-file.js';
import { silentLogger } from '../../shared/log.js';
import type { Manifest } from '../../shared/manifest.js';
import { type FaultUpstream, startFaultUpstream } from '../helpers/fault-upstream.js';
import { treeSnapshot } from '../helpers/tree.js';

describe('install-base: B unpacked while it is kept', () => {
  let root: string;
  let keys: FleetKeys;
  let up: FaultUpstream;
  let base: Manifest;
  let target: Manifest;
  let baseTree: Record<string, string>;

  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'sc-install-overlap-'));
    keys = await makeFleetKeys(join(root, 'keys'));
    up = await startFaultUpstream();
    const mk = async (name: string, role: 'base' | 'target', os: { id: string; version: string; netFormat: 'ifupdown' | 'netplan' }) => {
      const dir = join(root, `${name}-tree`);
      await makeSampleRootfs(dir, { id: os.id, name: os.id, version: os.version, netFormat: os.netFormat, sizeMiB: 3 });
      const file = join(root, `${name}.bundle`);
      const m = await packBundleFile(keys, { name, version: '1', role, dir, os }, file);
      await up.addBlobFile(file);
      up.addManifest(m);
      return { m, file };
    };
    const b = await mk('base-os', 'base', { id: 'debian', version: '12', netFormat: 'ifupdown' });
    target = (await mk('target-os', 'target', { id: 'ubuntu', version: '24.04', netFormat: 'netplan' })).m;
    base = b.m;
    const ref = join(root, 'ref');
    await unpackFile(b.file, base.blob, { dir: ref, identities: keys.agent.identities });
    baseTree = await treeSnapshot(ref);
  });
  after(async () => {
    await up?.close();
    await rm(root, { recursive: true, force: true, maxRetries: 20, retryDelay: 50 });
  });

  /** A sim host with fetch and partition done; the context install-base runs in. */
  async function fetchedHost(name: string): Promise<{ ctx: StepContext; driver: SimMachine; lines: string[] }> {
    const [h] = await createSimHosts(join(root, name), [{ name, hosts: 1 }]);
    const driver = new SimMachine(h.dir);
    const lines: string[] = [];
    const args = { base: { name: base.name, version: base.version }, target: { name: target.name, version: target.version } };
    const ctx = (step: StepContext['payload']['step']): StepContext => ({
      hostId: h.hostId,
      payload: { host: h.hostId, rollout: 'r', seq: 0, total: 1, step, args, exp: Date.now() + 3600_000, nonce: 'n'.repeat(16) },
      driver,
      trusted: keys.agent.trusted,
      identities: keys.agent.identities,
      stages: [up.url],
      agentFiles: [],
      signal: new AbortController().signal,
      logger: silentLogger,
      log: async (line) => {
        lines.push(line);
      },
      progress: () => {},
      reboot: async () => {
        throw new Error('no reboot here');
      },
      crashPoint: () => {},
      now: Date.now,
      unpackWorkerMinBytes: 0,
    });
    await fetchStep.apply(ctx('fetch'));
    await partitionStep.apply(ctx('partition'));
    return { ctx: ctx('install-base'), driver, lines };
  }

  it('copies B and C, unpacks B from the copy as it is written, and records B installed', async () => {
    const { ctx, driver, lines } = await fetchedHost('ok');
    const r = await installBaseStep.apply(ctx);
    assert.deepEqual(r.copied, ['base-os@1', 'target-os@1']);
    assert.ok(lines.some((l) => l.includes('while it is kept')), `the overlapped path ran: ${lines.join(' | ')}`);
    const k = await KeptStore.open(driver);
    assert.ok(await k.bundles.find(base, keys.agent.trusted));
    assert.ok(await k.bundles.find(target, keys.agent.trusted));
    assert.ok(await k.installed('disk2p1'));
    const tree = await treeSnapshot(await driver.mountPath('disk2p1'));
    for (const [path, sum] of Object.entries(baseTree)) assert.equal(tree[path], sum, path);
    assert.ok(await installBaseStep.check(ctx), 'the effect check agrees');
  });

  it('a B whose copy fails its digest: the step fails on the digest, disk2p1 is wiped, nothing installed', async () => {
    const { ctx, driver } = await fetchedHost('bad');
    // The state dir's B is replaced after the fetch verified it, by the same tree packed again:
    // authentic to the fleet key, so it decrypts and unpacks completely; only its sha256 differs.
    const twin = join(root, 'twin.bundle');
    const os = { id: 'debian', version: '12', netFormat: 'ifupdown' } as const;
    const t = await packBundleFile(keys, { name: 'base-os', version: '1', role: 'base', dir: join(root, 'base-os-tree'), os }, twin);
    assert.equal(t.blob.size, base.blob.size);
    const file = join(await driver.mountPath('disk1p1'), 'var/lib/stagecoach/bundles', `${base.blob.digest.slice(7)}.bundle`);
    await writeFile(file, await readFile(twin));
    await assert.rejects(installBaseStep.apply(ctx), (e: { code?: string; details?: { permanent?: boolean } }) => e.code === 'SC_ERR_DIGEST_MISMATCH' && e.details?.permanent === true);
    const k = await KeptStore.open(driver);
    assert.equal(await k.installed('disk2p1'), null, 'not recorded installed');
    assert.equal(await driver.installedOs('disk2p1'), null, 'no OS marker');
    assert.equal((await driver.inspect()).disks.disk2.partitions.find((p) => p.device === 'disk2p1')?.empty, true, 'disk2p1 wiped');
    assert.equal(await k.bundles.find(base, keys.agent.trusted), null, 'no kept copy of the bad bytes');
  });

  it('installBundle following a writer: the tree counts only once the writer says its bytes verified', async () => {
    const { ctx, driver } = await fetchedHost('gate');
    const k = await KeptStore.open(driver);
    const file = join(await driver.mountPath('disk1p1'), 'var/lib/stagecoach/bundles', `${base.blob.digest.slice(7)}.bundle`);
    const mark = new WriteMark();
    mark.raise(base.blob.size);
    /** Settles as `settle` says once the whole tree of B is on disk2p1 (the unpack is done), not before. */
    const verdictAfterUnpack = (settle: 'resolve' | 'reject') =>
      (async () => {
        for (;;) {
          // disk2p1 has a filesystem (and a mount path) once installBundle formatted it.
          const root = await driver.mountPath('disk2p1').catch(() => null);
          const tree = root ? await treeSnapshot(root).catch(() => ({}) as Record<string, string>) : {};
          if (Object.entries(baseTree).every(([p, sum]) => tree[p] === sum)) break;
          await new Promise((r) => setTimeout(r, 20));
        }
        if (settle === 'reject') throw Object.assign(new Error('the writer found other bytes'), { code: 'SC_ERR_DIGEST_MISMATCH' });
      })();
    const fd = openSync(file, 'r');
    try {
      await assert.rejects(
        installBundle(ctx, k, k.bundles, base, 'disk2p1', { hookPoint: 'install-base:mid', follow: { file: fd, mark, verifiedBy: verdictAfterUnpack('reject') } }),
        (e: { code?: string }) => e.code === 'SC_ERR_DIGEST_MISMATCH',
      );
      assert.equal(await k.installed('disk2p1'), null, 'not recorded installed');
      assert.equal(await driver.installedOs('disk2p1'), null, 'no OS marker');
      assert.equal((await driver.inspect()).disks.disk2.partitions.find((p) => p.device === 'disk2p1')?.empty, true, 'disk2p1 wiped');

      await installBundle(ctx, k, k.bundles, base, 'disk2p1', { hookPoint: 'install-base:mid', follow: { file: fd, mark, verifiedBy: verdictAfterUnpack('resolve') } });
      assert.ok(await k.installed('disk2p1'), 'recorded installed once the writer verified');
    } finally {
      closeSync(fd);
    }
  });
});
