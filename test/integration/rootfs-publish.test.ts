/**
 * Acceptance: a tree built like a real Linux root filesystem is published with the CLI to a
 * real origin (127.0.0.1, port 0), fetched back, and unpacked through the agent's unpack path
 * (unpackFile, its worker thread included); the unpacked tree must equal the source entry by
 * entry: type, mode, owner, content, link target, hardlink group, extended attributes
 * (security.capability), mtime, holes. The same for a tarball made by GNU tar --xattrs.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { createWriteStream, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { after, before, describe, it } from 'node:test';
import { setAttribute } from '@napi-rs/xattr';
import { unpackFile } from '../../shared/bundle/unpack-file.js';
import { generateAgeIdentity } from '../../shared/bundle/index.js';
import { verifyManifest } from '../../shared/manifest.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';
import { CAP_NET_RAW_EP, makeRealRootfs, REAL_ROOTFS, treeFacts } from '../helpers/tree.js';
import { cli } from '../helpers/cli.js';

/** `setcap cap_net_admin+ep`: same size as cap_net_raw+ep, other bits. */
const CAP_NET_ADMIN_EP = Buffer.from('0100000200100000000000000000000000000000', 'hex');
const asRoot = process.getuid?.() === 0;


describe('a real-rootfs-like tree: publish through the origin, unpack through the agent path', { skip: !asRoot && 'needs root (owners, trusted.* attributes)' }, () => {
  let o: TestOrigin;
  let work: string;
  let src: string;
  let identity: string;
  const keys = generateKeyPairSync('ed25519');
  const common = () => ['--origin', o.url, '--token-file', o.tokenFile, '--signing-key', join(work, 'release.key'), '--recipients-file', join(work, 'fleet.age.pub'), '--json'];

  before(async () => {
    o = await startTestOrigin();
    work = mkdtempSync(join(tmpdir(), 'sc-rootfs-publish-'));
    src = join(work, 'rootfs');
    makeRealRootfs(src);
    writeFileSync(join(work, 'release.key'), keys.privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
    const id = await generateAgeIdentity();
    identity = id.identity;
    writeFileSync(join(work, 'fleet.age.pub'), `${id.recipient}\n`);
  });
  after(async () => {
    await o?.close();
    if (work) rmSync(work, { recursive: true, force: true });
  });

  /** Fetches name@version from the origin and unpacks it with the agent's unpackFile (worker thread forced). */
  async function unpackPublished(name: string, version: string, into: string) {
    const m = await o.client.getManifest(name, version);
    verifyManifest(m, [keys.publicKey]);
    const file = join(work, `${name}.blob`);
    const { stream } = await o.client.openBlob(m.blob.digest);
    await pipeline(stream, createWriteStream(file));
    const r = await unpackFile(file, m.blob, { dir: into, identities: [identity], workerMinBytes: 0 });
    return { m, r };
  }

  it('a directory: published with the CLI, unpacked by the agent path, equal entry by entry', async () => {
    const r = await cli(['publish', src, '--name', 'debian-like', '--version', '1', '--role', 'target', ...common()]);
    assert.equal(r.code, 0, r.stderr);
    const out = join(work, 'unpacked-dir');
    const { m, r: res } = await unpackPublished('debian-like', '1', out);
    assert.deepEqual(m.os, { id: 'debian', version: '12', family: 'linux', netFormat: 'ifupdown' }, 'os-release read through the etc/os-release symlink');
    assert.equal(res.skipped, 0);
    const want = await treeFacts(src);
    const got = await treeFacts(out);
    assert.deepEqual(got, want);
    // The facts that matter most, spelled out.
    assert.equal(got[REAL_ROOTFS.ping].xattrs['security.capability'], CAP_NET_RAW_EP.toString('hex'));
    assert.equal(got['usr/bin/bzip2'].hardlinkGroup, 'usr/bin/bunzip2');
    assert.equal(got['etc/os-release'].target, '../usr/lib/os-release');
    assert.equal(got[REAL_ROOTFS.sparse].sparse, true);
    assert.equal(got[REAL_ROOTFS.fifo].type, 'fifo');
  });

  it('a changed capability is changed content: re-publishing the same version is refused; the original is a no-op', async () => {
    const ping = join(src, REAL_ROOTFS.ping);
    await setAttribute(ping, 'security.capability', CAP_NET_ADMIN_EP);
    try {
      const r = await cli(['publish', src, '--name', 'debian-like', '--version', '1', '--role', 'target', ...common()]);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /SC_ERR_VERSION_EXISTS: .*content/);
    } finally {
      await setAttribute(ping, 'security.capability', CAP_NET_RAW_EP);
    }
    const again = await cli(['publish', src, '--name', 'debian-like', '--version', '1', '--role', 'target', ...common()]);
    assert.equal(again.code, 0, again.stderr);
    assert.equal(JSON.parse(again.stdout).created, false);
  });

  it('a tarball made by GNU tar --xattrs --numeric-owner: published, unpacked, equal entry by entry', async () => {
    const tarball = join(work, 'rootfs.tar');
    const t = spawnSync('tar', ['--xattrs', '--xattrs-include=*', '--numeric-owner', '-cf', tarball, '-C', src, '.'], { encoding: 'utf8' });
    assert.equal(t.status, 0, t.stderr);
    const r = await cli(['publish', tarball, '--name', 'debian-like-tar', '--version', '1', '--role', 'target', ...common()]);
    assert.equal(r.code, 0, r.stderr);
    const out = join(work, 'unpacked-tar');
    const { m } = await unpackPublished('debian-like-tar', '1', out);
    assert.equal(m.os.id, 'debian');
    assert.deepEqual(await treeFacts(out), await treeFacts(src));
  });
});
