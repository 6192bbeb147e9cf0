/**
 * Installing a bundle: the agent's two-thread unpack (services/agent/unpack.ts) gives the same
 * tree as the codec's single-thread unpackBundle, and the same errors for a wrong identity or a
 * damaged blob; the agent's own files are carried into the new OS (linux).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { chmod, lstat, mkdir, mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Transform } from 'node:stream';
import { type FleetKeys, makeFleetKeys, packBundleFile } from '../../infra/fleet.js';
import { generateAgeIdentity, makeSampleRootfs, unpackBundle } from '../../shared/bundle/index.js';
import type { Manifest } from '../../shared/manifest.js';
import { unpackFile } from '../../services/agent/unpack.js';
import { carryAgentFiles } from '../../services/agent/steps/common.js';
import { LinuxMachine } from '../../services/agent/machine/linux.js';
import { SimMachine } from '../../services/agent/machine/sim.js';
import { treeSnapshot } from '../helpers/tree.js';

describe('agent: two-thread unpack', () => {
  let root: string;
  let keys: FleetKeys;
  let m: Manifest;
  let file: string;
  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'sc-unpack-'));
    keys = await makeFleetKeys(join(root, 'keys'));
    const tree = join(root, 'tree');
    await makeSampleRootfs(tree, { id: 'debian', name: 'Debian', version: '12', netFormat: 'ifupdown', sizeMiB: 3 });
    file = join(root, 'bundle');
    m = await packBundleFile(keys, { name: 'x', version: '1', role: 'base', dir: tree, os: { id: 'debian', version: '12', netFormat: 'ifupdown' } }, file);
  });
  after(async () => {
    // A failed extraction may still have file writes in flight when it rejects: retry.
    await rm(root, { recursive: true, force: true, maxRetries: 20, retryDelay: 50 });
  });

  it('unpacks the same tree as unpackBundle, decrypting in a worker thread', async () => {
    const a = join(root, 'a');
    const b = join(root, 'b');
    await unpackBundle(createReadStream(file), { dir: a, compression: 'zstd', encryption: 'age', identities: keys.agent.identities });
    let seen = 0;
    const meter = () =>
      new Transform({
        transform(c: Buffer, _e, cb) {
          seen += c.length;
          cb(null, c);
        },
      });
    const r = await unpackFile(file, m.blob, { dir: b, identities: keys.agent.identities, workerMinBytes: 0, meter });
    assert.ok(r.entries > 10);
    assert.ok(seen > m.blob.size * 0.99 && seen <= m.blob.size, `the meter saw the decrypted bytes (${seen} of ${m.blob.size})`);
    assert.deepEqual(await treeSnapshot(b), await treeSnapshot(a));
  });

  it('fails with SC_ERR_DECRYPT for a wrong identity and for a damaged blob', async () => {
    const other = await generateAgeIdentity();
    await assert.rejects(unpackFile(file, m.blob, { dir: join(root, 'c'), identities: [other.identity], workerMinBytes: 0 }), (e: { code?: string }) => e.code === 'SC_ERR_DECRYPT');
    const fh = await open(file, 'r+');
    await fh.write(randomBytes(16), 0, 16, Math.floor(m.blob.size / 2));
    await fh.close();
    await assert.rejects(unpackFile(file, m.blob, { dir: join(root, 'd'), identities: keys.agent.identities, workerMinBytes: 0 }), (e: { code?: string }) => e.code === 'SC_ERR_DECRYPT');
  });
});

describe('agent: its own files go into the OS it installs', () => {
  it('copies config and keys to the same paths (linux), and nothing for a sim machine', async () => {
    const root = await mkdtemp(join(tmpdir(), 'sc-agentfiles-'));
    try {
      const etc = join(root, 'running-os-etc');
      await mkdir(etc, { recursive: true });
      const key = join(etc, 'fleet.age');
      const cfg = join(etc, 'agent.yaml');
      await writeFile(key, 'AGE-SECRET-KEY-1TEST\n', { mode: 0o600 });
      await chmod(key, 0o600);
      await writeFile(cfg, 'hostId: h1\n', { mode: 0o644 });
      await chmod(cfg, 0o644);
      const newRoot = join(root, 'new-os');
      await mkdir(newRoot);
      const linux = new LinuxMachine({ hostId: 'h1', disks: { disk1: '/dev/sda', disk2: '/dev/sdb' }, bootMode: 'bios-grub', dryRun: true, print: () => {} });
      const done = await carryAgentFiles({ driver: linux, agentFiles: [cfg, key, join(etc, 'missing')] }, newRoot);
      assert.deepEqual(done, [cfg, key]);
      assert.equal(await readFile(join(newRoot, key), 'utf8'), 'AGE-SECRET-KEY-1TEST\n');
      assert.equal((await lstat(join(newRoot, key))).mode & 0o777, 0o600);
      assert.equal((await lstat(join(newRoot, cfg))).mode & 0o777, 0o644);
      const sim = new SimMachine(join(root, 'no-machine'));
      assert.deepEqual(await carryAgentFiles({ driver: sim, agentFiles: [cfg] }, join(root, 'other')), []);
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });
});
