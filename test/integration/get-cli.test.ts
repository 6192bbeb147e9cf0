import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import type { Digest } from '../../shared/digest.js';
import { keyId } from '../../shared/manifest.js';
import { deadPort, makeManifest, pseudoRandom, type ReadServer, releaseKey, startReadServer, tempDir, writeBlob } from './fetch-fixture.js';
import { cli } from '../helpers/cli.js';

const SIZE = 2 * 1024 * 1024 + 77;


const key = releaseKey();
const stranger = releaseKey();
let dir: string;
let cleanup: () => Promise<void>;
let data: Buffer;
let digest: Digest;
let keyPath: string;
let strangerPath: string;
let good: ReadServer;
let bad: ReadServer;
let dead: string;

before(async () => {
  ({ dir, cleanup } = await tempDir('sc-get-'));
  data = pseudoRandom(SIZE, 11);
  const blobPath = join(dir, 'blob');
  digest = await writeBlob(blobPath, data);
  keyPath = join(dir, 'release.pub');
  strangerPath = join(dir, 'stranger.pub');
  await writeFile(keyPath, key.publicPem);
  await writeFile(strangerPath, stranger.publicPem);

  const m = makeManifest(key.privateKey, { digest, size: SIZE });
  good = await startReadServer();
  await good.addBlob(blobPath);
  good.setManifest('rescue-os', '1.0.0', m);

  // `bad` serves: a tampered manifest, a manifest signed by an unknown key, and a tampered blob.
  bad = await startReadServer();
  bad.setManifest('rescue-os', '1.0.0', { ...m, os: { ...m.os, version: '13' } });
  bad.setManifest('rescue-os', '2.0.0', makeManifest(stranger.privateKey, { digest, size: SIZE }, 'rescue-os', '2.0.0'));
  const tampered = Buffer.from(data);
  tampered[SIZE >> 1] ^= 0x40;
  const tamperedPath = join(dir, 'tampered');
  await writeFile(tamperedPath, tampered);
  await bad.addBlob(tamperedPath, digest);
  bad.setManifest('rescue-os', '3.0.0', makeManifest(key.privateKey, { digest, size: SIZE }, 'rescue-os', '3.0.0'));
  dead = `http://127.0.0.1:${await deadPort()}`;
});
after(async () => {
  await Promise.all([good.close(), bad.close()]);
  await cleanup();
});

async function leftovers(prefix: string): Promise<string[]> {
  return (await readdir(dir)).filter((f) => f.startsWith(prefix));
}

test('get: fetches through the sources, verifies, prints JSON', async () => {
  const out = join(dir, 'ok.bundle');
  const r = await cli(['get', 'rescue-os@1.0.0', '--from', `${dead},${good.url}`, '-o', out, '--trust-key', keyPath, '--json']);
  assert.equal(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  assert.equal(j.digest, digest);
  assert.equal(j.size, SIZE);
  assert.equal(j.keyId, keyId(key.publicKey));
  assert.deepEqual(j.sources, [good.url]);
  assert.equal(j.path, out);
  assert.ok((await readFile(out)).equals(data));
  assert.deepEqual(await leftovers('ok.bundle'), ['ok.bundle']);
});

test('get: human output, and a second run finds the file already there', async () => {
  const out = join(dir, 'twice.bundle');
  const args = ['get', 'rescue-os@1.0.0', '--origin', good.url, '-o', out, '--trust-key', keyPath];
  const r1 = await cli(args);
  assert.equal(r1.code, 0, r1.stderr);
  assert.match(r1.stdout, new RegExp(`digest  ${digest} \\(verified\\)`));
  const before = good.blobRequests.length;
  const r2 = await cli(args);
  assert.equal(r2.code, 0, r2.stderr);
  assert.match(r2.stdout, /already present/);
  assert.equal(good.blobRequests.length, before);
});

test('get: a tampered manifest is rejected (exit 1, code printed, no file)', async () => {
  const out = join(dir, 'tm.bundle');
  const r = await cli(['get', 'rescue-os@1.0.0', '--from', bad.url, '-o', out, '--trust-key', keyPath]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^error SC_ERR_BAD_SIGNATURE: /m);
  assert.equal(r.stdout, '');
  assert.deepEqual(await leftovers('tm.bundle'), []);
});

test('get: a manifest signed by an unknown key is rejected', async () => {
  const out = join(dir, 'uk.bundle');
  const r = await cli(['get', 'rescue-os@2.0.0', '--from', bad.url, '-o', out, '--trust-key', keyPath, '--json']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^error SC_ERR_UNTRUSTED_KEY: /m);
  assert.equal(JSON.parse(r.stdout).error.code, 'SC_ERR_UNTRUSTED_KEY');
  assert.deepEqual(await leftovers('uk.bundle'), []);
  // Trusting the signer's key makes the same manifest acceptable (its blob is the tampered one, though).
  const r2 = await cli(['get', 'rescue-os@2.0.0', '--from', bad.url, '-o', out, '--trust-key', strangerPath]);
  assert.match(r2.stderr, /^error SC_ERR_DIGEST_MISMATCH: /m);
});

test('get: a tampered blob is rejected (exit 1, code printed, no file, no partial)', async () => {
  const out = join(dir, 'tb.bundle');
  const r = await cli(['get', 'rescue-os@3.0.0', '--from', bad.url, '-o', out, '--trust-key', keyPath]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^error SC_ERR_DIGEST_MISMATCH: /m);
  assert.equal(r.stdout, '');
  assert.deepEqual(await leftovers('tb.bundle'), []);
});

test('get: a .partial from an earlier run is continued with Range and verifies', async () => {
  const out = join(dir, 'resume.bundle');
  await writeFile(`${out}.partial`, data.subarray(0, 654_321));
  const before = good.blobRequests.length;
  const r = await cli(['get', 'rescue-os@1.0.0', '--from', good.url, '-o', out, '--trust-key', keyPath, '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(
    good.blobRequests.slice(before).map((q) => q.range),
    ['bytes=654321-'],
  );
  assert.equal(JSON.parse(r.stdout).resumedFrom, 654_321);
  assert.ok((await readFile(out)).equals(data));
  assert.equal(existsSync(`${out}.partial`), false);
});

test('get: usage errors exit 1 with a code', async () => {
  const out = join(dir, 'usage.bundle');
  const noKey = await cli(['get', 'rescue-os@1.0.0', '--from', good.url, '-o', out]);
  assert.equal(noKey.code, 1);
  assert.match(noKey.stderr, /SC_ERR_BAD_CONFIG/);
  const badRef = await cli(['get', 'Rescue@1', '--from', good.url, '-o', out, '--trust-key', keyPath]);
  assert.match(badRef.stderr, /SC_ERR_BAD_NAME/);
  const noSource = await cli(['get', 'rescue-os@1.0.0', '-o', out, '--trust-key', keyPath]);
  assert.match(noSource.stderr, /SC_ERR_BAD_CONFIG/);
  const encrypted = await cli(['get', 'rescue-os@1.0.0', '--from', good.url, '-o', out, '--trust-key', keyPath, '--identity', keyPath]);
  assert.match(encrypted.stderr, /SC_ERR_BAD_CONFIG: --identity is only used with --unpack/);
  assert.deepEqual(await leftovers('usage.bundle'), []);
});
