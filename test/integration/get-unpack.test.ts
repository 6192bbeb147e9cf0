// End to end: publish a real bundle (sample rootfs → tar → zstd → age) to a real origin, put a
// real stage in front, then `stagecoach get --unpack` through the stage, and with the stage dead.
import assert from 'node:assert/strict';
import { createWriteStream, existsSync } from 'node:fs';
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { after, before, test } from 'node:test';
import { generateAgeIdentity } from '../../shared/bundle/age.js';
import { makeSampleRootfs, packBundle } from '../../shared/bundle/index.js';
import { signManifest } from '../../shared/manifest.js';
import { digestFile } from '../../shared/digest.js';
import { startStage, type RunningStage } from '../../services/stage/main.js';
import { silentLogger } from '../../shared/log.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';
import { deadPort, makeManifest, releaseKey, tempDir } from './fetch-fixture.js';
import { cli } from '../helpers/cli.js';



const key = releaseKey();
let dir: string;
let cleanup: () => Promise<void>;
let origin: TestOrigin;
let stage: RunningStage;
let keyPath: string;
let idPath: string;
let wrongIdPath: string;
let blobDigest: string;

before(async () => {
  ({ dir, cleanup } = await tempDir('sc-get-unpack-'));
  const rootfs = join(dir, 'rootfs');
  await makeSampleRootfs(rootfs, { id: 'debian', name: 'Debian GNU/Linux', version: '12', netFormat: 'ifupdown', sizeMiB: 3 });
  const fleet = await generateAgeIdentity();
  const other = await generateAgeIdentity();
  idPath = join(dir, 'fleet.age');
  wrongIdPath = join(dir, 'other.age');
  await writeFile(idPath, `# public key: ${fleet.recipient}\n${fleet.identity}\n`);
  await writeFile(wrongIdPath, `${other.identity}\n`);
  keyPath = join(dir, 'release.pub');
  await writeFile(keyPath, key.publicPem);

  const packed = join(dir, 'bundle.bin');
  await pipeline(packBundle({ dir: rootfs }, { compression: 'zstd', recipients: [fleet.recipient] }), createWriteStream(packed));
  const { digest, size } = await digestFile(packed);
  blobDigest = digest;

  origin = await startTestOrigin();
  await origin.client.putBlob(packed, digest, size);
  await origin.client.putManifest(makeManifest(key.privateKey, { digest, size, compression: 'zstd', encryption: 'age' }, 'debian', '12.0'));
  // The same blob under a manifest whose signed unpackedSize is far below the real plaintext.
  const small = makeManifest(key.privateKey, { digest, size, compression: 'zstd', encryption: 'age' }, 'debian', '12.0-small');
  await origin.client.putManifest(signManifest({ ...small, blob: { ...small.blob, unpackedSize: 1 << 20 } }, key.privateKey));
  stage = await startStage({ listen: '127.0.0.1:0', upstreams: [origin.url], cache: join(dir, 'stage-cache'), colo: 'test' }, { log: silentLogger });
});
after(async () => {
  await stage?.close();
  await origin?.close();
  await cleanup();
});

test('get --identity --unpack through a stage: the tree appears in DIR', async () => {
  const out = join(dir, 'via-stage.bundle');
  const into = join(dir, 'unpacked');
  const dead = `http://127.0.0.1:${await deadPort()}`;
  const r = await cli([
    'get', 'debian@12.0', '--from', `${dead},${stage.url}`, '--origin', origin.url, '-o', out,
    '--trust-key', keyPath, '--identity', idPath, '--unpack', into, '--json',
  ]);
  assert.equal(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  assert.equal(j.digest, blobDigest);
  assert.deepEqual(j.sources, [stage.url]);
  assert.equal(j.manifestSource, stage.url);
  assert.ok(j.unpacked.entries > 10);
  assert.match(await readFile(join(into, 'etc/os-release'), 'utf8'), /ID=debian/);
  assert.equal((await stat(join(into, 'usr/bin/passwd'))).mode & 0o7777, 0o4755);
  // Unpacked beside the tree while it downloaded, then moved up: no unverified directory is left.
  assert.deepEqual((await readdir(into)).filter((n) => n.startsWith('.stagecoach-unverified-')), []);
});

test('get falls back to origin when the only stage is down, and unpacks', async () => {
  const out = join(dir, 'via-origin.bundle');
  const into = join(dir, 'unpacked2');
  const dead = `http://127.0.0.1:${await deadPort()}`;
  const r = await cli(['get', 'debian@12.0', '--from', dead, '--origin', origin.url, '-o', out, '--trust-key', keyPath, '--identity', idPath, '--unpack', into, '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout).sources, [origin.url]);
  assert.match(await readFile(join(into, 'etc/os-release'), 'utf8'), /VERSION_ID="?12/);
});

test('get --unpack with the wrong identity fails with SC_ERR_DECRYPT and reports no success', async () => {
  const out = join(dir, 'wrong-id.bundle');
  const into = join(dir, 'unpacked3');
  const r = await cli(['get', 'debian@12.0', '--origin', origin.url, '-o', out, '--trust-key', keyPath, '--identity', wrongIdPath, '--unpack', into]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^error SC_ERR_DECRYPT: /m);
  assert.equal(r.stdout, '');
  assert.equal(existsSync(join(into, 'etc/os-release')), false);
});

test('get --unpack of an encrypted bundle without --identity is refused before downloading', async () => {
  const out = join(dir, 'no-id.bundle');
  const r = await cli(['get', 'debian@12.0', '--origin', origin.url, '-o', out, '--trust-key', keyPath, '--unpack', join(dir, 'x')]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /SC_ERR_BAD_CONFIG: .*needs --identity/);
  assert.equal(existsSync(out), false);
});

test('get --unpack stops at the manifest\'s signed unpackedSize with SC_ERR_BUNDLE_TOO_LARGE', async () => {
  const out = join(dir, 'small.bundle');
  const into = join(dir, 'unpacked-small');
  const r = await cli(['get', 'debian@12.0-small', '--origin', origin.url, '-o', out, '--trust-key', keyPath, '--identity', idPath, '--unpack', into]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^error SC_ERR_BUNDLE_TOO_LARGE: /m);
  assert.equal(r.stdout, '');
  // DIR was empty: what the failed unpack wrote is gone with its staging directory.
  assert.deepEqual(await readdir(into), []);
});
