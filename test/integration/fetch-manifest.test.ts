import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { sha256Of } from '../../shared/digest.js';
import { fetchManifest } from '../../shared/fetch.js';
import { keyId, manifestDigest } from '../../shared/manifest.js';
import { deadPort, makeManifest, type ReadServer, releaseKey, startReadServer } from './fetch-fixture.js';

const key = releaseKey();
const stranger = releaseKey();
const blob = { digest: sha256Of('bundle bytes'), size: 12 };
const good = makeManifest(key.privateKey, blob);
const tampered = { ...good, blob: { ...good.blob, size: 13 } };
const foreign = makeManifest(stranger.privateKey, blob);
const otherVersion = makeManifest(key.privateKey, blob, 'rescue-os', '0.9.0');

let a: ReadServer;
let b: ReadServer;
let dead: string;

before(async () => {
  a = await startReadServer();
  b = await startReadServer();
  dead = `http://127.0.0.1:${await deadPort()}`;
});
after(async () => {
  await Promise.all([a.close(), b.close()]);
});

test('returns the first manifest that verifies, with its source and key id', async () => {
  a.setManifest('rescue-os', '1.0.0', good);
  b.setManifest('rescue-os', '1.0.0', good);
  const r = await fetchManifest([dead, a.url], 'rescue-os', '1.0.0', [key.publicKey], { origin: b.url });
  assert.equal(r.source, a.url);
  assert.equal(r.keyId, keyId(key.publicKey));
  assert.equal(r.manifestDigest, manifestDigest(good));
  assert.deepEqual(r.manifest, good);
});

test('a tampered manifest on one source is passed over for a good one', async () => {
  a.setManifest('rescue-os', '1.0.0', tampered);
  b.setManifest('rescue-os', '1.0.0', good);
  const r = await fetchManifest([a.url, b.url], 'rescue-os', '1.0.0', [key.publicKey]);
  assert.equal(r.source, b.url);
});

test('when every source fails, the signature failure is reported, not a generic one', async () => {
  const m3 = makeManifest(key.privateKey, blob, 'rescue-os', '3.0.0');
  a.setManifest('rescue-os', '3.0.0', { ...m3, role: 'target' }); // b has no 3.0.0: 404
  await assert.rejects(fetchManifest([b.url, a.url, dead], 'rescue-os', '3.0.0', [key.publicKey]), { code: 'SC_ERR_BAD_SIGNATURE' });
});

test('a manifest signed only by an unknown key is SC_ERR_UNTRUSTED_KEY', async () => {
  a.setManifest('rescue-os', '1.0.0', foreign);
  await assert.rejects(fetchManifest([a.url], 'rescue-os', '1.0.0', [key.publicKey]), { code: 'SC_ERR_UNTRUSTED_KEY' });
});

test('a validly signed manifest for another version is refused (no replay)', async () => {
  a.setManifest('rescue-os', '1.0.0', otherVersion);
  await assert.rejects(fetchManifest([a.url], 'rescue-os', '1.0.0', [key.publicKey]), { code: 'SC_ERR_BAD_MANIFEST' });
});

test('a document that is not a manifest is SC_ERR_BAD_MANIFEST', async () => {
  a.setManifest('rescue-os', '1.0.0', { hello: 'world' });
  await assert.rejects(fetchManifest([a.url], 'rescue-os', '1.0.0', [key.publicKey]), { code: 'SC_ERR_BAD_MANIFEST' });
});

test('not found anywhere is SC_ERR_MANIFEST_NOT_FOUND; nothing reachable is SC_ERR_UPSTREAM', async () => {
  await assert.rejects(fetchManifest([a.url, b.url], 'nothing', '1.0.0', [key.publicKey]), { code: 'SC_ERR_MANIFEST_NOT_FOUND' });
  await assert.rejects(fetchManifest([dead], 'rescue-os', '1.0.0', [key.publicKey]), { code: 'SC_ERR_UPSTREAM' });
});

test('bad input is refused before any request', async () => {
  await assert.rejects(fetchManifest([a.url], '../etc', '1.0.0', [key.publicKey]), { code: 'SC_ERR_BAD_NAME' });
  await assert.rejects(fetchManifest([a.url], 'rescue-os', '1.0.0/../x', [key.publicKey]), { code: 'SC_ERR_BAD_VERSION' });
  await assert.rejects(fetchManifest([a.url], 'rescue-os', '1.0.0', []), { code: 'SC_ERR_BAD_CONFIG' });
  await assert.rejects(fetchManifest([], 'rescue-os', '1.0.0', [key.publicKey]), { code: 'SC_ERR_NO_UPSTREAM' });
});
