/**
 * The worker-thread unpack (shared/bundle/unpack-worker.mjs) applies the age STREAM rules itself:
 * it must give the codec's tree for a good bundle and fail closed — SC_ERR_DECRYPT — wherever
 * the payload is damaged or cut, exactly as the single-thread decryptStream does. The damaged
 * files are unpacked `verified` (no digest check), so that the worker's own rules are what
 * refuses them; without it the same files fail as SC_ERR_DIGEST_MISMATCH.
 */
import assert from 'node:assert/strict';
import { createReadStream } from 'node:fs';
import { copyFile, mkdtemp, open, rm, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Transform } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { type FleetKeys, makeFleetKeys, packBundleFile } from '../../services/demo/fleet.js';
import { AGE_CHUNK_SIZE, generateAgeIdentity, makeSampleRootfs, unpackBundle } from '../../shared/bundle/index.js';
import type { Manifest } from '../../shared/manifest.js';
import { unpackFile } from '../../shared/bundle/unpack-file.js';
import { treeSnapshot } from '../helpers/tree.js';

const isDecrypt = (e: { code?: string }) => e.code === 'SC_ERR_DECRYPT';
const isMismatch = (e: { code?: string }) => e.code === 'SC_ERR_DIGEST_MISMATCH';

describe('agent: worker-thread unpack', () => {
  let root: string;
  let keys: FleetKeys;
  let m: Manifest;
  let file: string;
  let n = 0;
  const fresh = () => join(root, `out-${n++}`);
  /** A copy of the bundle, damaged by `damage`. */
  const damaged = async (damage: (f: string) => Promise<void>) => {
    const f = join(root, `bad-${n++}`);
    await copyFile(file, f);
    await damage(f);
    return f;
  };
  const flip = (at: (size: number) => number) => async (f: string) => {
    const fh = await open(f, 'r+');
    try {
      const size = (await fh.stat()).size;
      const b = Buffer.alloc(1);
      const pos = at(size);
      await fh.read(b, 0, 1, pos);
      b[0] ^= 0x01;
      await fh.write(b, 0, 1, pos);
    } finally {
      await fh.close();
    }
  };

  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'sc-unpack-worker-'));
    keys = await makeFleetKeys(join(root, 'keys'));
    const tree = join(root, 'tree');
    // Several MiB across many 1 MiB posts and 64 KiB age chunks, and an odd last chunk.
    await makeSampleRootfs(tree, { id: 'debian', name: 'Debian', version: '12', netFormat: 'ifupdown', sizeMiB: 5 });
    file = join(root, 'bundle');
    m = await packBundleFile(keys, { name: 'x', version: '1', role: 'base', dir: tree, os: { id: 'debian', version: '12', netFormat: 'ifupdown' } }, file);
    assert.equal(m.blob.compression, 'zstd');
    assert.equal(m.blob.encryption, 'age');
  });
  after(async () => {
    await rm(root, { recursive: true, force: true, maxRetries: 20, retryDelay: 50 });
  });

  it('produces the same tree as the single-thread codec, and meters the decrypted bytes', async () => {
    const a = fresh();
    const b = fresh();
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
    assert.ok(seen > m.blob.size * 0.99 && seen <= m.blob.size, `meter saw ${seen} of ${m.blob.size}`);
    assert.deepEqual(await treeSnapshot(b), await treeSnapshot(a));
  });

  it('checks the digest of every byte it read, through the hashing thread and its reused read buffers', async () => {
    // 24 MiB: more 4 MiB reads than the hashing thread has buffers, so each is refilled.
    const tree = join(root, 'big-tree');
    await makeSampleRootfs(tree, { id: 'debian', name: 'Debian', version: '12', netFormat: 'ifupdown', sizeMiB: 24 });
    const big = join(root, 'big-bundle');
    const mb = await packBundleFile(keys, { name: 'y', version: '1', role: 'base', dir: tree, os: { id: 'debian', version: '12', netFormat: 'ifupdown' } }, big);
    assert.ok(mb.blob.size > 20 * 2 ** 20, `bundle of ${mb.blob.size} bytes`);
    const out = fresh();
    await unpackFile(big, mb.blob, { dir: out, identities: keys.agent.identities, workerMinBytes: 0 });
    assert.deepEqual(await treeSnapshot(out), await treeSnapshot(tree));
    // The same good file against another signed digest: refused, and the digest it reports is the file's.
    const other = `sha256:${'0'.repeat(64)}` as const;
    await assert.rejects(unpackFile(big, { ...mb.blob, digest: other }, { dir: fresh(), identities: keys.agent.identities, workerMinBytes: 0 }), (e: { code?: string; details?: { actual?: string } }) => isMismatch(e) && e.details?.actual === mb.blob.digest);
  });

  it('fails with SC_ERR_DECRYPT for an identity the bundle is not encrypted to', async () => {
    const other = await generateAgeIdentity();
    await assert.rejects(unpackFile(file, m.blob, { dir: fresh(), identities: [other.identity], workerMinBytes: 0 }), isDecrypt);
  });

  it('fails closed on a flipped bit in the first, a middle and the last payload chunk', async () => {
    for (const at of [(s: number) => s - 2 * AGE_CHUNK_SIZE - 100, (s: number) => Math.floor(s / 2), (s: number) => s - 5]) {
      const f = await damaged(flip(at));
      await assert.rejects(unpackFile(f, m.blob, { dir: fresh(), identities: keys.agent.identities, workerMinBytes: 0, verified: true }), isDecrypt);
      await assert.rejects(unpackFile(f, m.blob, { dir: fresh(), identities: keys.agent.identities, workerMinBytes: 0 }), isMismatch);
    }
  });

  it('fails closed on a file cut at a chunk boundary or inside a chunk, and on a damaged header', async () => {
    const size = m.blob.size;
    for (const cut of [size - 1, size - 17, size - (AGE_CHUNK_SIZE + 16) * 2, size - (AGE_CHUNK_SIZE + 16) * 2 - 7]) {
      const f = await damaged((p) => truncate(p, cut));
      await assert.rejects(unpackFile(f, { ...m.blob, size: cut }, { dir: fresh(), identities: keys.agent.identities, workerMinBytes: 0, verified: true }), isDecrypt);
    }
    const f = await damaged(flip(() => 40));
    await assert.rejects(unpackFile(f, m.blob, { dir: fresh(), identities: keys.agent.identities, workerMinBytes: 0, verified: true }), isDecrypt);
  });

  it('stops on abort and when the meter throws', async () => {
    const ac = new AbortController();
    ac.abort();
    await assert.rejects(unpackFile(file, m.blob, { dir: fresh(), identities: keys.agent.identities, workerMinBytes: 0, signal: ac.signal }), (e: { code?: string }) => e.code === 'SC_ERR_UNAVAILABLE');
    const meter = () =>
      new Transform({
        transform(_c, _e, cb) {
          cb(new Error('meter says stop'));
        },
      });
    await assert.rejects(unpackFile(file, m.blob, { dir: fresh(), identities: keys.agent.identities, workerMinBytes: 0, meter }), /meter says stop/);
  });
});
