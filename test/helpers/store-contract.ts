/**
 * The BlobStore contract suite (services/origin/store.ts). Run it against every implementation:
 * `storeContract('fs', async () => ({ store, cleanup }))`. Implementation-specific checks (files
 * on disk, temp files) belong in that implementation's own test file.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { describe, it } from 'node:test';
import { type Digest, sha256Of } from '../../shared/digest.js';
import { isScError } from '../../shared/errors.js';
import { type Manifest, manifestDigest } from '../../shared/manifest.js';
import type { BlobStore } from '../../services/origin/store.js';

/** A store under test and how to dispose of it. */
export interface StoreUnderTest {
  store: BlobStore;
  cleanup(): Promise<void>;
  /** Number of leftover temporary objects (uploads in progress); 0 when nothing leaked. */
  leftovers?(): Promise<number>;
}

/** Collects a stream into a Buffer (test data only). */
export async function collect(s: Readable): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of s) parts.push(Buffer.from(c as Buffer));
  return Buffer.concat(parts);
}

/** A Readable of `data` in chunks of `chunk` bytes. */
export function chunks(data: Buffer, chunk = 64 * 1024): Readable {
  const parts: Buffer[] = [];
  for (let i = 0; i < data.length; i += chunk) parts.push(data.subarray(i, i + chunk));
  return Readable.from(parts);
}

/** A Readable that yields `data` and then fails. */
export function failingAfter(data: Buffer): Readable {
  return Readable.from(
    (async function* () {
      yield data;
      await new Promise((r) => setImmediate(r));
      throw new Error('source broke');
    })(),
  );
}

/** A valid unsigned manifest for a blob (tests only). */
export function testManifest(name: string, version: string, blob: { digest: Digest; size: number }, extra: Partial<Manifest> = {}): Manifest {
  return {
    schema: 1,
    name,
    version,
    role: 'target',
    os: { id: 'debian', version: '12', family: 'linux', netFormat: 'ifupdown' },
    blob: { digest: blob.digest, size: blob.size, compression: 'zstd', encryption: 'age' },
    publishedAt: '2026-01-02T03:04:05.000Z',
    signatures: [],
    ...extra,
  };
}

async function rejectsWith(p: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(isScError(err), `expected an ScError, got ${String(err)}`);
    assert.equal(err.code, code);
    return true;
  });
}

/** Registers the contract suite for one BlobStore implementation. */
export function storeContract(name: string, makeStore: () => Promise<StoreUnderTest>): void {
  describe(`BlobStore contract: ${name}`, () => {
    const withStore = (fn: (t: StoreUnderTest) => Promise<void>) => async () => {
      const t = await makeStore();
      try {
        await fn(t);
        if (t.leftovers) assert.equal(await t.leftovers(), 0, 'temporary objects left behind');
      } finally {
        await t.cleanup();
      }
    };

    it(
      'stores a blob, reads it back whole and by range, and reports a re-upload as not created',
      withStore(async ({ store }) => {
        const data = randomBytes(300_000);
        const d = sha256Of(data);
        assert.deepEqual(await store.putBlob(d, chunks(data), data.length), { created: true, size: data.length });
        assert.deepEqual(await store.statBlob(d), { size: data.length });
        assert.ok((await collect(await store.openBlob(d))).equals(data));
        assert.ok((await collect(await store.openBlob(d, { start: 1000, end: 1999 }))).equals(data.subarray(1000, 2000)));
        assert.deepEqual(await store.putBlob(d, chunks(data)), { created: false, size: data.length });
        assert.ok((await collect(await store.openBlob(d))).equals(data));
      }),
    );

    it(
      'stores an empty blob',
      withStore(async ({ store }) => {
        const d = sha256Of('');
        assert.deepEqual(await store.putBlob(d, Readable.from([]), 0), { created: true, size: 0 });
        assert.deepEqual(await store.statBlob(d), { size: 0 });
        assert.equal((await collect(await store.openBlob(d))).length, 0);
      }),
    );

    it(
      'throws SC_ERR_BLOB_NOT_FOUND for a missing blob',
      withStore(async ({ store }) => {
        const d = sha256Of('never stored');
        await rejectsWith(store.statBlob(d), 'SC_ERR_BLOB_NOT_FOUND');
        await rejectsWith(store.openBlob(d), 'SC_ERR_BLOB_NOT_FOUND');
      }),
    );

    it(
      'rejects malformed digests, names and versions',
      withStore(async ({ store }) => {
        await rejectsWith(store.statBlob('sha256:../../etc/passwd' as Digest), 'SC_ERR_BAD_DIGEST');
        await rejectsWith(store.openBlob(`sha256:${'A'.repeat(64)}` as Digest), 'SC_ERR_BAD_DIGEST');
        await rejectsWith(store.putBlob('md5:abc' as Digest, Readable.from([Buffer.from('x')])), 'SC_ERR_BAD_DIGEST');
        await rejectsWith(store.getManifest('../x', '1'), 'SC_ERR_BAD_NAME');
        await rejectsWith(store.getManifest('x', '../1'), 'SC_ERR_BAD_VERSION');
      }),
    );

    it(
      'refuses bytes that do not match the digest, storing nothing',
      withStore(async ({ store }) => {
        const data = randomBytes(100_000);
        const d = sha256Of(data);
        const bad = Buffer.from(data);
        bad[50_000] ^= 1;
        await rejectsWith(store.putBlob(d, chunks(bad), bad.length), 'SC_ERR_DIGEST_MISMATCH');
        await rejectsWith(store.statBlob(d), 'SC_ERR_BLOB_NOT_FOUND');
      }),
    );

    it(
      'refuses a body shorter or longer than expectedSize, storing nothing',
      withStore(async ({ store }) => {
        const data = randomBytes(10_000);
        const d = sha256Of(data);
        await rejectsWith(store.putBlob(d, chunks(data), data.length + 1), 'SC_ERR_SIZE_MISMATCH');
        await rejectsWith(store.putBlob(d, chunks(data), data.length - 1), 'SC_ERR_SIZE_MISMATCH');
        await rejectsWith(store.statBlob(d), 'SC_ERR_BLOB_NOT_FOUND');
      }),
    );

    it(
      'keeps the stored blob when a re-upload of it carries wrong bytes',
      withStore(async ({ store }) => {
        const data = randomBytes(10_000);
        const d = sha256Of(data);
        await store.putBlob(d, chunks(data));
        await rejectsWith(store.putBlob(d, chunks(randomBytes(10_000))), 'SC_ERR_DIGEST_MISMATCH');
        assert.ok((await collect(await store.openBlob(d))).equals(data));
      }),
    );

    it(
      'stores nothing when the source fails mid-stream',
      withStore(async ({ store }) => {
        const data = randomBytes(50_000);
        const d = sha256Of(Buffer.concat([data, data]));
        await assert.rejects(store.putBlob(d, failingAfter(data), 100_000), /source broke/);
        await rejectsWith(store.statBlob(d), 'SC_ERR_BLOB_NOT_FOUND');
      }),
    );

    it(
      'accepts concurrent uploads of one blob: all succeed, at least one creates it, the bytes are right',
      withStore(async ({ store }) => {
        const data = randomBytes(2_000_000);
        const d = sha256Of(data);
        const rs = await Promise.all(Array.from({ length: 5 }, () => store.putBlob(d, chunks(data, 16_384), data.length)));
        assert.ok(rs.filter((r) => r.created).length >= 1);
        assert.ok(rs.every((r) => r.size === data.length));
        assert.ok((await collect(await store.openBlob(d))).equals(data));
      }),
    );

    it(
      'stores manifests immutably: identical is not created, different is SC_ERR_VERSION_EXISTS',
      withStore(async ({ store }) => {
        const d = sha256Of('blob');
        const m = testManifest('rescue-os', '1.0.0', { digest: d, size: 4 });
        const r1 = await store.putManifest(m, { fingerprint: sha256Of('fp') });
        assert.deepEqual(r1, { created: true, manifestDigest: manifestDigest(m) });
        assert.deepEqual(await store.getManifest('rescue-os', '1.0.0'), m);
        assert.deepEqual(await store.getManifestMeta('rescue-os', '1.0.0'), { fingerprint: sha256Of('fp') });
        const r2 = await store.putManifest(structuredClone(m), { fingerprint: sha256Of('other') });
        assert.deepEqual(r2, { created: false, manifestDigest: manifestDigest(m) });
        assert.deepEqual(await store.getManifestMeta('rescue-os', '1.0.0'), { fingerprint: sha256Of('fp') }, 'meta is first-writer-wins');
        await rejectsWith(store.putManifest({ ...m, role: 'base' }), 'SC_ERR_VERSION_EXISTS');
        await rejectsWith(store.putManifest({ ...m, publishedAt: '2027-01-01T00:00:00.000Z' }), 'SC_ERR_VERSION_EXISTS');
        assert.deepEqual(await store.getManifest('rescue-os', '1.0.0'), m);
      }),
    );

    it(
      'throws SC_ERR_MANIFEST_NOT_FOUND for a missing manifest and SC_ERR_BAD_MANIFEST for an invalid one',
      withStore(async ({ store }) => {
        await rejectsWith(store.getManifest('nope', '1'), 'SC_ERR_MANIFEST_NOT_FOUND');
        await rejectsWith(store.getManifestMeta('nope', '1'), 'SC_ERR_MANIFEST_NOT_FOUND');
        const m = testManifest('x', '1', { digest: sha256Of('b'), size: 1 });
        await rejectsWith(store.putManifest({ ...m, extra: 1 } as unknown as Manifest), 'SC_ERR_BAD_MANIFEST');
        await rejectsWith(store.putManifest({ ...m, name: '../etc' }), 'SC_ERR_BAD_MANIFEST');
      }),
    );

    it(
      'lets exactly one of two different manifests raced at one version win',
      withStore(async ({ store }) => {
        const base = testManifest('race', '1', { digest: sha256Of('b'), size: 1 });
        const variants = Array.from({ length: 6 }, (_, i) => ({ ...base, publishedAt: `2026-01-0${i + 1}T00:00:00.000Z` }));
        const rs = await Promise.allSettled(variants.map((m) => store.putManifest(m)));
        const ok = rs.filter((r) => r.status === 'fulfilled');
        assert.equal(ok.length, 1);
        for (const r of rs) if (r.status === 'rejected') assert.ok(isScError(r.reason, 'SC_ERR_VERSION_EXISTS'));
        const winner = (ok[0] as PromiseFulfilledResult<{ manifestDigest: Digest }>).value.manifestDigest;
        assert.equal(manifestDigest(await store.getManifest('race', '1')), winner);
      }),
    );

    it(
      'lists bundles sorted by name, then publishedAt',
      withStore(async ({ store }) => {
        const blob = { digest: sha256Of('b'), size: 1 };
        const a2 = testManifest('alpha', '2.0', blob, { publishedAt: '2026-02-01T00:00:00.000Z' });
        const a1 = testManifest('alpha', '10.0', blob, { publishedAt: '2026-01-01T00:00:00.000Z', role: 'base' });
        const b1 = testManifest('beta', '1+build.7', blob);
        assert.deepEqual(await store.listBundles(), []);
        for (const m of [b1, a2, a1]) await store.putManifest(m);
        const list = await store.listBundles();
        assert.deepEqual(
          list.map((e) => `${e.name}@${e.version}`),
          ['alpha@10.0', 'alpha@2.0', 'beta@1+build.7'],
        );
        assert.deepEqual(list[0], {
          name: 'alpha',
          version: '10.0',
          role: 'base',
          manifestDigest: manifestDigest(a1),
          publishedAt: '2026-01-01T00:00:00.000Z',
        });
      }),
    );
  });
}
