import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { digestHex, sha256Of } from '../../shared/digest.js';
import { isScError } from '../../shared/errors.js';
import { manifestDigest } from '../../shared/manifest.js';
import { FsBlobStore } from '../../services/origin/store.js';
import { chunks, failingAfter, storeContract, testManifest } from '../helpers/store-contract.js';

storeContract('FsBlobStore', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'sc-store-'));
  const store = await FsBlobStore.open(dir);
  return {
    store,
    cleanup: async () => rmSync(dir, { recursive: true, force: true }),
    leftovers: async () => readdirSync(join(dir, 'tmp')).length,
  };
});

describe('FsBlobStore on disk', () => {
  const withDir = (fn: (dir: string) => Promise<void>) => async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sc-store-'));
    try {
      await fn(dir);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  };

  it(
    'lays out blobs by hex prefix and manifests as canonical JSON whose sha256 is the manifest digest',
    withDir(async (dir) => {
      const store = await FsBlobStore.open(dir);
      const data = randomBytes(1000);
      const d = sha256Of(data);
      await store.putBlob(d, chunks(data));
      const hex = digestHex(d);
      const file = join(dir, 'blobs', 'sha256', hex.slice(0, 2), hex);
      assert.equal(store.blobPath(d), file);
      assert.ok(readFileSync(file).equals(data));
      const m = testManifest('rescue-os', '1.0.0', { digest: d, size: 1000 });
      await store.putManifest(m, { fingerprint: sha256Of('fp') });
      const raw = readFileSync(join(dir, 'manifests', 'rescue-os', '1.0.0.json'));
      assert.equal(sha256Of(raw), manifestDigest(m));
      assert.deepEqual(JSON.parse(readFileSync(join(dir, 'meta', 'rescue-os', '1.0.0.json'), 'utf8')), { fingerprint: sha256Of('fp') });
    }),
  );

  it(
    'empties tmp/ when it opens',
    withDir(async (dir) => {
      mkdirSync(join(dir, 'tmp'), { recursive: true });
      writeFileSync(join(dir, 'tmp', 'stale.part'), 'half an upload');
      await FsBlobStore.open(dir);
      assert.deepEqual(readdirSync(join(dir, 'tmp')), []);
    }),
  );

  it(
    'leaves no file behind after a digest mismatch, a size mismatch or a broken source',
    withDir(async (dir) => {
      const store = await FsBlobStore.open(dir);
      const data = randomBytes(200_000);
      const d = sha256Of(data);
      await assert.rejects(store.putBlob(d, chunks(randomBytes(200_000))), (e) => isScError(e, 'SC_ERR_DIGEST_MISMATCH'));
      await assert.rejects(store.putBlob(d, chunks(data), 5), (e) => isScError(e, 'SC_ERR_SIZE_MISMATCH'));
      await assert.rejects(store.putBlob(d, failingAfter(data)), /source broke/);
      assert.deepEqual(readdirSync(join(dir, 'tmp')), []);
      assert.equal(existsSync(store.blobPath(d)), false);
      assert.deepEqual(readdirSync(join(dir, 'blobs', 'sha256')), []);
    }),
  );

  it(
    'creates a blob exactly once under concurrent uploads (one created: true)',
    withDir(async (dir) => {
      const store = await FsBlobStore.open(dir);
      const data = randomBytes(1_000_000);
      const d = sha256Of(data);
      const rs = await Promise.all(Array.from({ length: 8 }, () => store.putBlob(d, chunks(data, 8192))));
      assert.equal(rs.filter((r) => r.created).length, 1);
    }),
  );

  it(
    'serves what another store instance wrote (the index is the disk)',
    withDir(async (dir) => {
      const a = await FsBlobStore.open(dir);
      const m = testManifest('x', '1', { digest: sha256Of('b'), size: 1 });
      await a.putManifest(m);
      const b = await FsBlobStore.open(dir);
      assert.deepEqual(await b.getManifest('x', '1'), m);
      assert.equal((await b.listBundles()).length, 1);
    }),
  );
});
