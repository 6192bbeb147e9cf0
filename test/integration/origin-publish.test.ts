import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { appendFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { generateAgeIdentity, makeSampleRootfs, packDirStream, unpackBundle } from '../../shared/bundle/index.js';
import { digestFile } from '../../shared/digest.js';
import { manifestDigest, verifyManifest } from '../../shared/manifest.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';
import { cli } from '../helpers/cli.js';



function bytesIn(metrics: string): number {
  const line = metrics.split('\n').find((l) => l.startsWith('origin_bytes_in_total{') && l.includes('route="blob"'));
  return line ? Number(line.split(' ').pop()) : 0;
}

describe('stagecoach publish (spawned CLI against a real origin)', () => {
  let o: TestOrigin;
  let work: string;
  let rootfs: string;
  let identity: string;
  const keys = generateKeyPairSync('ed25519');
  const common = () => [
    '--origin',
    o.url,
    '--token-file',
    o.tokenFile,
    '--signing-key',
    join(work, 'release.key'),
    '--recipients-file',
    join(work, 'fleet.age.pub'),
  ];

  before(async () => {
    o = await startTestOrigin();
    work = mkdtempSync(join(tmpdir(), 'sc-publish-'));
    rootfs = join(work, 'rootfs');
    await makeSampleRootfs(rootfs, { id: 'debian', name: 'Debian GNU/Linux', version: '12', netFormat: 'ifupdown', sizeMiB: 2 });
    writeFileSync(join(work, 'release.key'), keys.privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
    const id = await generateAgeIdentity();
    identity = id.identity;
    writeFileSync(join(work, 'fleet.age.pub'), `# fleet\n${id.recipient}\n`);
  });
  after(async () => {
    await o.close();
    rmSync(work, { recursive: true, force: true });
  });

  it('publishes a signed, encrypted bundle that unpacks to the same tree', async () => {
    const r = await cli(['publish', rootfs, '--name', 'rescue-os', '--version', '1.0.0', '--role', 'base', ...common(), '--json']);
    assert.equal(r.code, 0, r.stderr);
    const out = JSON.parse(r.stdout);
    assert.equal(out.created, true);
    assert.equal(out.blob.compression, 'zstd');
    assert.equal(out.blob.encryption, 'age');

    const m = await o.client.getManifest('rescue-os', '1.0.0');
    assert.equal(manifestDigest(m), out.manifestDigest);
    assert.deepEqual(m.os, { id: 'debian', version: '12', family: 'linux', netFormat: 'ifupdown' });
    assert.equal(m.role, 'base');
    verifyManifest(m, [keys.publicKey]);
    assert.deepEqual(await digestFile(o.store.blobPath!(m.blob.digest)), { digest: m.blob.digest, size: m.blob.size });
    // The signed plaintext size: exactly the tar the tree packs to (the packer is deterministic).
    let plainBytes = 0;
    for await (const c of packDirStream(rootfs)) plainBytes += (c as Buffer).length;
    assert.equal(m.blob.unpackedSize, plainBytes);
    assert.equal(out.blob.unpackedSize, plainBytes);

    const dest = join(work, 'unpacked');
    const { stream } = await o.client.openBlob(m.blob.digest);
    await unpackBundle(stream, { dir: dest, compression: m.blob.compression, encryption: m.blob.encryption, identities: [identity] });
    assert.equal(readFileSync(join(dest, 'etc/os-release'), 'utf8'), readFileSync(join(rootfs, 'etc/os-release'), 'utf8'));
  });

  it('treats re-publishing the same content as a no-op (exit 0, no upload)', async () => {
    const before = bytesIn(await o.client.metricsText());
    const r = await cli(['publish', rootfs, '--name', 'rescue-os', '--version', '1.0.0', '--role', 'base', ...common(), '--json']);
    assert.equal(r.code, 0, r.stderr);
    const out = JSON.parse(r.stdout);
    assert.equal(out.created, false);
    assert.equal(out.manifestDigest, manifestDigest(await o.client.getManifest('rescue-os', '1.0.0')));
    assert.equal(bytesIn(await o.client.metricsText()), before, 'a no-op re-publish uploads nothing');
    const human = await cli(['publish', rootfs, '--name', 'rescue-os', '--version', '1.0.0', '--role', 'base', ...common()]);
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, /already published/);
    assert.match(human.stdout, /manifest sha256:[0-9a-f]{64}/);
  });

  it('refuses changed content at an existing version with SC_ERR_VERSION_EXISTS (exit 1)', async () => {
    appendFileSync(join(rootfs, 'etc/hostname'), 'changed\n');
    const r = await cli(['publish', rootfs, '--name', 'rescue-os', '--version', '1.0.0', '--role', 'base', ...common()]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /error SC_ERR_VERSION_EXISTS: .*rescue-os@1\.0\.0/);
    const role = await cli(['publish', rootfs, '--name', 'rescue-os', '--version', '1.0.0', '--role', 'target', ...common()]);
    assert.equal(role.code, 1);
    assert.match(role.stderr, /SC_ERR_VERSION_EXISTS: .*role/);
  });

  it('publishes a tarball with OS overrides, and lists bundles', async () => {
    const tarball = join(work, 'rootfs.tar.gz');
    const t = spawnSync('tar', ['-czf', tarball, '-C', rootfs, '.']);
    assert.equal(t.status, 0, String(t.stderr));
    const r = await cli([
      'publish',
      tarball,
      '--name',
      'target-os',
      '--version',
      '2024.1',
      '--role',
      'target',
      '--os-id',
      'ubuntu',
      '--os-version',
      '24.04',
      '--compression',
      'gzip',
      ...common(),
      '--json',
    ]);
    assert.equal(r.code, 0, r.stderr);
    const m = await o.client.getManifest('target-os', '2024.1');
    assert.deepEqual(m.os, { id: 'ubuntu', version: '24.04', family: 'linux', netFormat: 'netplan' });
    assert.equal(m.blob.compression, 'gzip');

    const l = await cli(['bundles', '--origin', o.url, '--json']);
    assert.equal(l.code, 0, l.stderr);
    assert.deepEqual(
      JSON.parse(l.stdout).map((b: { name: string; version: string }) => `${b.name}@${b.version}`),
      ['rescue-os@1.0.0', 'target-os@2024.1'],
    );
    const table = await cli(['bundles', '--origin', o.url]);
    assert.match(table.stdout, /^NAME\s+VERSION\s+ROLE\s+PUBLISHED\s+MANIFEST\n/);
    assert.match(table.stdout, /target-os\s+2024\.1\s+target/);
  });

  it('fails cleanly with a wrong token (exit 1, SC_ERR_FORBIDDEN, nothing published)', async () => {
    const bad = join(work, 'bad-token');
    writeFileSync(bad, 'not-the-token\n');
    const args = ['publish', rootfs, '--name', 'other', '--version', '1', '--role', 'base', ...common()];
    args[args.indexOf('--token-file') + 1] = bad;
    const r = await cli(args);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /error SC_ERR_FORBIDDEN/);
    assert.equal(await o.client.findManifest('other', '1'), null);
  });
});
