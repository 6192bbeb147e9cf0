/**
 * Real root filesystems through the tar codec: a tree like a Debian rootfs (hardlink groups,
 * symlinks, setuid/setgid/sticky, numeric owners, security.capability, a sparse file, long and
 * non-ASCII paths, a FIFO) must come out of packDirStream → safeExtract unchanged, and the
 * format must be GNU tar's `--xattrs` one in both directions. Runs as root.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { createReadStream, createWriteStream, linkSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, readlinkSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { after, before, describe, it } from 'node:test';
import { setAttribute } from '@napi-rs/xattr';
import * as tar from 'tar';
import { packDirStream, safeExtract } from '../../shared/bundle/index.js';
import { decodePax, encodePax } from '../../shared/bundle/pax.js';
import { readXattrs } from '../../shared/bundle/xattr.js';
import { isScError } from '../../shared/errors.js';
import { CAP_NET_RAW_EP, makeRealRootfs, REAL_ROOTFS, treeFacts } from '../helpers/tree.js';

const asRoot = process.getuid?.() === 0;

/** A tar built from header fields, with an optional PAX record set before it (node-tar encodes the blocks). */
function rawTar(entries: { path: string; type?: 'File' | 'ExtendedHeader' | 'SymbolicLink' | 'Link' | 'Directory'; body?: string; linkpath?: string; mode?: number; uid?: number; gid?: number; pax?: [string, string | Buffer][] }[]): Buffer {
  const parts: Buffer[] = [];
  const pad = (n: number) => Buffer.alloc((512 - (n % 512)) % 512);
  for (const e of entries) {
    if (e.pax) {
      const body = encodePax(e.pax);
      const h = new tar.Header({ path: 'PaxHeader/x', type: 'ExtendedHeader', size: body.length, mode: 0o644, mtime: new Date(0) });
      h.encode();
      parts.push(h.block as Buffer, body, pad(body.length));
    }
    const body = Buffer.from(e.body ?? '');
    const h = new tar.Header({ path: e.path, type: e.type ?? 'File', size: body.length, mode: e.mode ?? 0o644, uid: e.uid ?? 0, gid: e.gid ?? 0, mtime: new Date(1_700_000_000_000), linkpath: e.linkpath });
    h.encode();
    parts.push(h.block as Buffer, body, pad(body.length));
  }
  parts.push(Buffer.alloc(1024));
  return Buffer.concat(parts);
}

describe('real root filesystems through the tar codec', { skip: !asRoot && 'needs root (owners, trusted.* attributes)' }, () => {
  let base: string;
  let src: string;
  before(() => {
    base = mkdtempSync(join(tmpdir(), 'sc-rootfs-'));
    src = join(base, 'src');
    makeRealRootfs(src);
  });
  after(() => rmSync(base, { recursive: true, force: true }));

  it('the source tree has what a real rootfs has', async () => {
    const f = await treeFacts(src);
    assert.equal(f['usr/bin/bzcat'].hardlinkGroup, 'usr/bin/bunzip2');
    assert.equal(f['usr/lib/fsck.ext4-in-lib'].hardlinkGroup, 'usr/lib/fsck.ext4-in-lib');
    assert.equal(f['etc/os-release'].target, '../usr/lib/os-release');
    assert.equal(f['usr/bin/passwd'].mode, '4755');
    assert.equal(f.tmp.mode, '1777');
    assert.equal(f['var/mail'].mode, '2775');
    assert.equal(f['etc/gshadow'].mode, '0');
    assert.equal(f[REAL_ROOTFS.ping].xattrs['security.capability'], CAP_NET_RAW_EP.toString('hex'));
    assert.equal(f[REAL_ROOTFS.sparse].sparse, true);
    assert.equal(f[REAL_ROOTFS.fifo].type, 'fifo');
    assert.ok(REAL_ROOTFS.longPath.length > 255);
    assert.equal(f['home/user/big-ids'].uid, 3_000_000);
    assert.deepEqual(f.srv, { ...f.srv, type: 'dir' });
  });

  it('packs and extracts it unchanged: types, modes, owners, contents, links, hardlink groups, xattrs, mtimes, holes', async () => {
    const out = join(base, 'out');
    const r = await safeExtract(packDirStream(src), out);
    assert.equal(r.skipped, 0);
    assert.deepEqual(await treeFacts(out), await treeFacts(src));
  });

  it('writes what GNU tar --xattrs extracts to the same tree (capabilities included)', async () => {
    const file = join(base, 'ours.tar');
    await pipeline(packDirStream(src), createWriteStream(file));
    const out = join(base, 'gnu-out');
    mkdirSync(out);
    const x = spawnSync('tar', ['--xattrs', "--xattrs-include=*", '--numeric-owner', '-xpf', file, '-C', out], { encoding: 'utf8' });
    assert.equal(x.status, 0, x.stderr);
    assert.deepEqual(await treeFacts(out, { sparse: false }), await treeFacts(src, { sparse: false }));
    assert.match(execFileSync('getcap', [join(out, REAL_ROOTFS.ping)], { encoding: 'utf8' }), /cap_net_raw[=+]ep/);
  });

  it('extracts a tarball made by GNU tar --xattrs --numeric-owner to the same tree', async () => {
    const file = join(base, 'gnu.tar');
    const c = spawnSync('tar', ['--xattrs', "--xattrs-include=*", '--numeric-owner', '-cf', file, '-C', src, '.'], { encoding: 'utf8' });
    assert.equal(c.status, 0, c.stderr);
    const out = join(base, 'from-gnu');
    await safeExtract(createReadStream(file), out);
    assert.deepEqual(await treeFacts(out), await treeFacts(src));
  });

  it('packs the same tree to the same bytes (no atimes)', async () => {
    const a = join(base, 'a.tar');
    const b = join(base, 'b.tar');
    await pipeline(packDirStream(src), createWriteStream(a));
    await pipeline(packDirStream(src), createWriteStream(b));
    assert.ok(readFileSync(a).equals(readFileSync(b)));
  });

  it('carries POSIX ACLs (Debian ships /var/log/journal with one) and refuses other system.* attributes, naming the file', async () => {
    // user::rw- user:1000:rw- group::r-- mask::rw- other::r--
    const acl = Buffer.from('02000000' + '01000600ffffffff' + '02000600e8030000' + '04000400ffffffff' + '10000600ffffffff' + '20000400ffffffff', 'hex');
    const archive = rawTar([{ path: 'var/log/journal/f', body: 'x', pax: [['SCHILY.xattr.system.posix_acl_access', acl]] }]);
    const out = join(base, 'acl-out');
    await safeExtract(Readable.from([archive]), out);
    const [[name, value]] = (await readXattrs(join(out, 'var/log/journal/f'))).filter(([n]) => n.startsWith('system.'));
    assert.equal(name, 'system.posix_acl_access');
    assert.ok(value.equals(acl), 'the ACL is set as it was recorded');
    // Packing: an ACL on a file of the tree goes into the archive and comes back.
    const tree = join(base, 'acl-tree');
    mkdirSync(tree);
    writeFileSync(join(tree, 'f'), 'x');
    await setAttribute(join(tree, 'f'), 'system.posix_acl_access', acl);
    const again = join(base, 'acl-again');
    await safeExtract(packDirStream(tree), again);
    assert.ok((await readXattrs(join(again, 'f'))).some(([n, v]) => n === 'system.posix_acl_access' && v.equals(acl)));
    // Any other system.* name is refused.
    const other = rawTar([{ path: 'etc/f', body: 'x', pax: [['SCHILY.xattr.system.nfs4_acl', Buffer.from('00', 'hex')]] }]);
    await assert.rejects(safeExtract(Readable.from([other]), join(base, 'nfs4-out')), (e: unknown) => isScError(e, 'SC_ERR_UNSUPPORTED_XATTR') && /etc\/f.*system\.nfs4_acl/.test((e as Error).message));
  });

  it('gives files their recorded group and mode in a setgid target of another group and under a default ACL', async () => {
    // What a directory hands to the files created in it (a setgid group, a default ACL, here
    // other::---, a group other than root's) must never survive into the tree: the recorded
    // owner and mode win.
    const facts = (root: string, p: string) => {
      const st = lstatSync(join(root, p));
      return { mode: st.mode & 0o7777, uid: st.uid, gid: st.gid };
    };
    const setgid = join(base, 'inherit-setgid');
    mkdirSync(setgid);
    execFileSync('chown', ['0:4242', setgid]);
    execFileSync('chmod', ['2775', setgid]);
    await safeExtract(Readable.from([rawTar([{ path: 'a', body: 'a', mode: 0o644 }])]), setgid);
    assert.deepEqual(facts(setgid, 'a'), { mode: 0o644, uid: 0, gid: 0 }, "not the setgid target's group");

    const defaultAcl = Buffer.from('02000000' + '01000700ffffffff' + '04000500ffffffff' + '20000000ffffffff', 'hex');
    const aclRoot = join(base, 'inherit-acl');
    mkdirSync(aclRoot);
    await setAttribute(aclRoot, 'system.posix_acl_default', defaultAcl);
    await safeExtract(Readable.from([rawTar([{ path: 'x', body: 'x', mode: 0o644 }])]), aclRoot);
    assert.deepEqual(facts(aclRoot, 'x'), { mode: 0o644, uid: 0, gid: 0 }, "not the mode the target's default ACL gives");

    const out = join(base, 'inherit-out');
    const archive = rawTar([
      { path: 'plain', body: 'p', mode: 0o644 },
      { path: 'j/', type: 'Directory', mode: 0o755, pax: [['SCHILY.xattr.system.posix_acl_default', defaultAcl]] },
      { path: 'j/f', body: 'f', mode: 0o644 },
      { path: 'j/sub/', type: 'Directory', mode: 0o755 },
      { path: 'j/sub/g', body: 'g', mode: 0o755 },
      { path: 'u/', type: 'Directory', mode: 0o2755, gid: 4242 },
      { path: 'u/h', body: 'h', mode: 0o644 },
    ]);
    await safeExtract(Readable.from([archive]), out);
    assert.deepEqual(facts(out, 'plain'), { mode: 0o644, uid: 0, gid: 0 });
    assert.deepEqual(facts(out, 'j/f'), { mode: 0o644, uid: 0, gid: 0 }, 'not the mode the default ACL gives');
    assert.deepEqual(facts(out, 'j/sub/g'), { mode: 0o755, uid: 0, gid: 0 }, 'nor the one it gives below, inherited');
    assert.deepEqual(facts(out, 'u/h'), { mode: 0o644, uid: 0, gid: 0 }, "nor its directory's group");
    assert.deepEqual(facts(out, 'u'), { mode: 0o2755, uid: 0, gid: 4242 });
  });

  it('keeps a hardlinked symlink as one inode (two names of the same link)', async () => {
    const tree = join(base, 'linked-symlink');
    mkdirSync(join(tree, 'usr/lib'), { recursive: true });
    writeFileSync(join(tree, 'usr/lib/libx.so.1.2'), 'lib');
    symlinkSync('libx.so.1.2', join(tree, 'usr/lib/libx.so.1'));
    linkSync(join(tree, 'usr/lib/libx.so.1'), join(tree, 'usr/lib/libx.so'));
    assert.ok(lstatSync(join(tree, 'usr/lib/libx.so')).isSymbolicLink(), 'link(2) does not follow the symlink');
    const out = join(base, 'linked-symlink-out');
    await safeExtract(packDirStream(tree), out);
    const a = lstatSync(join(out, 'usr/lib/libx.so.1'));
    const b = lstatSync(join(out, 'usr/lib/libx.so'));
    assert.ok(a.isSymbolicLink() && b.isSymbolicLink());
    assert.equal(a.ino, b.ino);
    assert.equal(readlinkSync(join(out, 'usr/lib/libx.so')), 'libx.so.1.2');
  });

  it('refuses GNU sparse entries (tar --sparse) with SC_ERR_BAD_ARCHIVE', async () => {
    const archive = rawTar([{ path: 'disk.img', body: 'x', pax: [['GNU.sparse.major', '1'], ['GNU.sparse.minor', '0']] }]);
    await assert.rejects(safeExtract(Readable.from([archive]), join(base, 'sparse-out')), (e: unknown) => isScError(e, 'SC_ERR_BAD_ARCHIVE') && /sparse/.test((e as Error).message));
  });

  it('PAX records keep binary values and UTF-8 text', () => {
    const bin = Buffer.from([0, 0x80, 0xff, 0x0a, 0x3d, 0x20]);
    const body = encodePax([
      ['path', 'naïve/文件'],
      ['SCHILY.xattr.user.b', bin],
      ['x'.repeat(90), 'y'.repeat(9)],
    ]);
    const d = decodePax(body);
    assert.equal(d.path, 'naïve/文件');
    assert.ok(Buffer.isBuffer(d['SCHILY.xattr.user.b']) && (d['SCHILY.xattr.user.b'] as Buffer).equals(bin));
    assert.equal(d['x'.repeat(90)], 'y'.repeat(9));
    assert.throws(() => decodePax(Buffer.from('99 path=x\n')), /malformed/);
  });
});
