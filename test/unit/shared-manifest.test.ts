import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { test } from 'node:test';
import { isScError } from '../../shared/errors.js';
import {
  canonicalJson,
  keyId,
  loadPrivateKey,
  loadPublicKey,
  type Manifest,
  manifestDigest,
  parseManifest,
  signManifest,
  type UnsignedManifest,
  verifyManifest,
} from '../../shared/manifest.js';
import { parseRef } from '../../shared/names.js';

function keys() {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  return {
    priv: loadPrivateKey(privateKey.export({ type: 'pkcs8', format: 'pem' })),
    pub: loadPublicKey(publicKey.export({ type: 'spki', format: 'pem' })),
  };
}

const base: UnsignedManifest = {
  schema: 1,
  name: 'rescue-os',
  version: '1.0.0',
  role: 'base',
  os: { id: 'debian', version: '12', family: 'linux', netFormat: 'ifupdown' },
  blob: { digest: `sha256:${'a'.repeat(64)}`, size: 123, compression: 'zstd', encryption: 'age' },
  publishedAt: '2026-11-25T08:00:00.000Z',
};

test('canonical JSON sorts keys at every depth and ignores insertion order', () => {
  assert.equal(canonicalJson({ b: 1, a: { d: [2, { z: 1, y: 2 }], c: 'x' } }), '{"a":{"c":"x","d":[2,{"y":2,"z":1}]},"b":1}');
  assert.equal(canonicalJson({ x: 1, y: 2 }), canonicalJson({ y: 2, x: 1 }));
});

test('a signed manifest verifies with its key and survives a JSON round trip', () => {
  const k = keys();
  const m = signManifest(base, k.priv);
  const again = parseManifest(JSON.parse(JSON.stringify(m)));
  assert.equal(verifyManifest(again, [k.pub]), keyId(k.pub));
  assert.equal(manifestDigest(again), manifestDigest(m));
});

test('a tampered manifest fails with SC_ERR_BAD_SIGNATURE', () => {
  const k = keys();
  const m = signManifest(base, k.priv);
  const tampered: Manifest = { ...m, blob: { ...m.blob, size: 124 } };
  assert.throws(() => verifyManifest(tampered, [k.pub]), (e) => isScError(e, 'SC_ERR_BAD_SIGNATURE'));
});

test('a manifest signed by an unknown key fails with SC_ERR_UNTRUSTED_KEY', () => {
  const m = signManifest(base, keys().priv);
  assert.throws(() => verifyManifest(m, [keys().pub]), (e) => isScError(e, 'SC_ERR_UNTRUSTED_KEY'));
  assert.throws(() => verifyManifest({ ...m, signatures: [] }, [keys().pub]), (e) => isScError(e, 'SC_ERR_UNTRUSTED_KEY'));
});

test('the schema rejects unknown keys, bad digests and bad names', () => {
  const ok = signManifest(base, keys().priv);
  assert.doesNotThrow(() => parseManifest(ok));
  for (const bad of [
    { ...ok, extra: 1 },
    { ...ok, name: '../etc' },
    { ...ok, version: '' },
    { ...ok, blob: { ...ok.blob, digest: 'sha256:XYZ' } },
    { ...ok, blob: { ...ok.blob, size: -1 } },
    { ...ok, os: { ...ok.os, netFormat: 'yaml' } },
  ]) {
    assert.throws(() => parseManifest(bad), (e) => isScError(e, 'SC_ERR_BAD_MANIFEST'));
  }
});

test('parseRef splits NAME@VERSION and validates both halves', () => {
  assert.deepEqual(parseRef('target-os@2.0.1+b1'), { name: 'target-os', version: '2.0.1+b1' });
  assert.throws(() => parseRef('Target@1'), (e) => isScError(e, 'SC_ERR_BAD_NAME'));
  assert.throws(() => parseRef('t@../1'), (e) => isScError(e, 'SC_ERR_BAD_VERSION'));
  assert.throws(() => parseRef('nover'), (e) => isScError(e, 'SC_ERR_BAD_NAME'));
});

test('loading a non-ed25519 key is SC_ERR_BAD_KEY', () => {
  const { privateKey } = generateKeyPairSync('x25519');
  assert.throws(() => loadPrivateKey(privateKey.export({ type: 'pkcs8', format: 'pem' })), (e) => isScError(e, 'SC_ERR_BAD_KEY'));
  assert.throws(() => loadPublicKey('not a key'), (e) => isScError(e, 'SC_ERR_BAD_KEY'));
});
