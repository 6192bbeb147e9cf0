/**
 * `stagecoach publish` refused before its blob uploads: a signing key the origin does not trust
 * (SC_ERR_UNTRUSTED_KEY with a hint), and a version the origin removed (SC_ERR_VERSION_EXISTS).
 * Zero bytes reach the origin: its blob directory, temp directory and byte counters are checked.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { makeSampleRootfs } from '../../shared/bundle/index.js';
import { keyId } from '../../shared/manifest.js';
import { cli } from '../helpers/cli.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';

function blobBytesIn(text: string): number {
  const line = text.split('\n').find((l) => l.startsWith('origin_bytes_in_total{') && l.includes('route="blob"'));
  return line ? Number(line.split(' ').pop()) : 0;
}

/** Every file under `dir`, recursively. */
function files(dir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...files(p));
    else out.push(p);
  }
  return out;
}

describe('publish refused before its blob uploads', () => {
  let o: TestOrigin;
  let work: string;
  let rootfs: string;
  const trusted = generateKeyPairSync('ed25519');
  const stranger = generateKeyPairSync('ed25519');
  const args = (version: string, key: string) => [
    'publish',
    rootfs,
    '--name',
    'debian',
    '--version',
    version,
    '--role',
    'target',
    '--origin',
    o.url,
    '--token-file',
    o.tokenFile,
    '--signing-key',
    join(work, key),
    '--compression',
    'gzip',
  ];

  before(async () => {
    work = mkdtempSync(join(tmpdir(), 'sc-refused-'));
    writeFileSync(join(work, 'trusted.pub'), trusted.publicKey.export({ type: 'spki', format: 'pem' }));
    writeFileSync(join(work, 'trusted.key'), trusted.privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
    writeFileSync(join(work, 'stranger.key'), stranger.privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
    rootfs = join(work, 'rootfs');
    await makeSampleRootfs(rootfs, { id: 'debian', name: 'Debian GNU/Linux', version: '12', netFormat: 'ifupdown', sizeMiB: 1 });
    o = await startTestOrigin({ trustKey: [join(work, 'trusted.pub')] });
  });
  after(async () => {
    await o?.close();
    rmSync(work, { recursive: true, force: true });
  });

  it('lists the key ids it trusts', async () => {
    const res = await fetch(`${o.url}/v1/trusted-keys`);
    assert.equal(res.status, 200);
    assert.deepEqual(await res.json(), { enforced: true, keyIds: [keyId(trusted.publicKey)] });
    assert.equal((await fetch(`${o.url}/v1/trusted-keys`, { method: 'POST' })).status, 405);
  });

  it('refuses an untrusted signing key with SC_ERR_UNTRUSTED_KEY and a hint, without uploading a byte', async () => {
    const r = await cli(args('12.1', 'stranger.key'));
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, new RegExp(`error SC_ERR_UNTRUSTED_KEY: .*does not trust signing key ${keyId(stranger.privateKey)}; nothing was uploaded`));
    assert.match(r.stderr, new RegExp(`hint: sign with a key the origin trusts \\(${keyId(trusted.publicKey)}\\)`));
    assert.deepEqual(files(join(o.dataDir, 'blobs')), [], 'no blob stored');
    assert.deepEqual(files(join(o.dataDir, 'tmp')), [], 'no upload started');
    assert.equal(blobBytesIn(await o.client.metricsText()), 0, 'no blob byte received');
    assert.deepEqual(await o.client.listBundles(), []);
    const json = await cli([...args('12.1', 'stranger.key'), '--json']);
    assert.equal(json.code, 1);
    assert.equal(JSON.parse(json.stdout).error.code, 'SC_ERR_UNTRUSTED_KEY');
  });

  it('publishes with the trusted key; a removed version is then refused before upload', async () => {
    const ok = await cli(args('12.1', 'trusted.key'));
    assert.equal(ok.code, 0, ok.stderr);
    const uploaded = blobBytesIn(await o.client.metricsText());
    assert.ok(uploaded > 0);
    await o.client.removeManifest('debian', '12.1');
    const blobsBefore = files(join(o.dataDir, 'blobs'));
    const again = await cli(args('12.1', 'trusted.key'));
    assert.equal(again.code, 1);
    assert.match(again.stderr, /error SC_ERR_VERSION_EXISTS: debian@12\.1 was removed from the origin/);
    assert.match(again.stderr, /hint: publish it under a new version/);
    assert.equal(blobBytesIn(await o.client.metricsText()), uploaded, 'no blob byte received');
    assert.deepEqual(files(join(o.dataDir, 'blobs')), blobsBefore);
  });
});
