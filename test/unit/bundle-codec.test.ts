/**
 * The bundle pipelines end to end on real files: directory → bundle → directory for every
 * compression × encryption, tarball inputs, os-release, and failure codes.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { after, before, describe, it } from 'node:test';
import {
  type Compression,
  compressStream,
  decompressStream,
  defaultNetFormat,
  generateAgeIdentity,
  makeSampleRootfs,
  packBundle,
  packDirStream,
  parseOsRelease,
  readOsRelease,
  unpackBundle,
} from '../../shared/bundle/index.js';
import { isScError } from '../../shared/errors.js';

/** One line per path: type, mode, owner, size, mtime, content hash or link target, link count. */
function snapshot(root: string, rel = ''): string[] {
  const out: string[] = [];
  for (const name of readdirSync(rel ? join(root, rel) : root).sort()) {
    const r = rel ? `${rel}/${name}` : name;
    const p = join(root, r);
    const st = lstatSync(p);
    const kind = st.isDirectory() ? 'd' : st.isSymbolicLink() ? 'l' : st.isFile() ? 'f' : '?';
    const what = kind === 'l' ? readlinkSync(p) : kind === 'f' ? createHash('sha256').update(readFileSync(p)).digest('hex').slice(0, 16) : '';
    out.push(`${r} ${kind} ${(st.mode & 0o7777).toString(8)} ${st.uid}:${st.gid} ${kind === 'f' ? st.size : ''} ${Math.floor(st.mtimeMs / 1000)} ${what} n${kind === 'f' ? st.nlink : ''}`);
    if (kind === 'd') out.push(...snapshot(root, r));
  }
  return out;
}

const hasCli = (c: string) => spawnSync(c, ['--version'], { stdio: 'ignore' }).status === 0;

describe('bundle codec', () => {
  let base: string;
  let rootfs: string;
  let key: { identity: string; recipient: string };
  let other: { identity: string; recipient: string };
  let expected: string[];

  before(async () => {
    base = mkdtempSync(join(tmpdir(), 'sc-codec-'));
    rootfs = join(base, 'rootfs');
    await makeSampleRootfs(rootfs, { id: 'debian', name: 'Debian GNU/Linux', version: '12', netFormat: 'ifupdown', sizeMiB: 1.5 });
    key = await generateAgeIdentity();
    other = await generateAgeIdentity();
    expected = snapshot(rootfs);
  });
  after(() => rmSync(base, { recursive: true, force: true }));

  const write = (src: Readable, file: string) => pipeline(src, createWriteStream(file));

  it('the sample rootfs has what the codec must carry', () => {
    const has = (re: RegExp) => assert.ok(expected.some((l) => re.test(l)), `sample has ${re}`);
    has(/^usr\/bin\/passwd f 4755 /);
    has(/^tmp d 1777 /);
    has(/^root d 700 /);
    has(/^var\/mail d 2775 /);
    has(/^var\/log d 755 /);
    has(/^usr\/bin\/awk l .* \/etc\/alternatives\/awk /);
    has(/^etc\/os-release l .* \.\.\/usr\/lib\/os-release /);
    has(/^usr\/bin\/gzip f .* n2$/);
    has(/^bin\/sh f 755 /);
    if (process.getuid?.() === 0) has(/^home\/admin d 750 1000:1000 /);
    const filler = expected.filter((l) => l.startsWith('usr/lib/sample/')).reduce((n, l) => n + Number(l.split(' ')[4]), 0);
    assert.equal(filler, 1.5 * 1024 * 1024);
  });

  for (const compression of ['zstd', 'gzip', 'none'] as Compression[]) {
    for (const encryption of ['age', 'none'] as const) {
      it(`round-trips a root filesystem: ${compression} × ${encryption}`, async () => {
        const blob = join(base, `b-${compression}-${encryption}`);
        const out = join(base, `out-${compression}-${encryption}`);
        await write(packBundle({ dir: rootfs }, { compression, recipients: encryption === 'age' ? [key.recipient] : [] }), blob);
        const head = readFileSync(blob).subarray(0, 30).toString('latin1');
        if (encryption === 'age') assert.ok(head.startsWith('age-encryption.org/v1\n'));
        const r = await unpackBundle(createReadStream(blob), { dir: out, compression, encryption, identities: encryption === 'age' ? [key.identity] : [] });
        assert.equal(r.entries, expected.length);
        assert.deepEqual(snapshot(out), expected);
      });
    }
  }

  it('packs deterministically: same tree, same tar bytes', async () => {
    const digest = async () => {
      const h = createHash('sha256');
      for await (const c of packDirStream(rootfs)) h.update(c as Buffer);
      return h.digest('hex');
    };
    assert.equal(await digest(), await digest());
  });

  it('compresses in formats the zstd and gzip CLIs read', { skip: !hasCli('zstd') && 'zstd CLI missing' }, async () => {
    const data = Buffer.from('hello '.repeat(10000));
    for (const [c, cmd] of [
      ['zstd', ['zstd', '-d', '-c']],
      ['gzip', ['gzip', '-d', '-c']],
    ] as const) {
      const f = join(base, `c.${c}`);
      await write(Readable.from([data]).pipe(compressStream(c)), f);
      assert.ok(execFileSync(cmd[0], [...cmd.slice(1), f]).equals(data), `${c} CLI reads ours`);
    }
  });

  it('accepts ready tarballs: .tar, .tar.gz and .tar.zst (by magic bytes), re-compressed', { skip: !hasCli('zstd') && 'zstd CLI missing' }, async () => {
    const owner = process.getuid?.() === 0 ? [] : ['--owner=0', '--group=0'];
    const tars = {
      plain: join(base, 'in.tar'),
      gz: join(base, 'in.tgz.bin'),
      zst: join(base, 'in.tar.zst'),
    };
    execFileSync('tar', ['-C', rootfs, ...owner, '-cf', tars.plain, '.']);
    execFileSync('tar', ['-C', rootfs, ...owner, '-czf', tars.gz, '.']);
    execFileSync('tar', ['-C', rootfs, ...owner, '--zstd', '-cf', tars.zst, '.']);
    for (const [name, file] of Object.entries(tars)) {
      const blob = join(base, `t-${name}`);
      const out = join(base, `t-out-${name}`);
      await write(packBundle({ tarball: file }, { compression: 'zstd', recipients: [key.recipient] }), blob);
      await unpackBundle(createReadStream(blob), { dir: out, compression: 'zstd', encryption: 'age', identities: [key.identity] });
      assert.deepEqual(snapshot(out), expected, `tarball ${name}`);
      assert.deepEqual((await readOsRelease({ tarball: file })).ID, 'debian', `os-release from ${name}`);
    }
  });

  it('refuses inputs that are not a tar (SC_ERR_BAD_ARCHIVE), and bad options', async () => {
    const junk = join(base, 'junk.tar');
    writeFileSync(junk, Buffer.alloc(4096, 7));
    assert.throws(() => packBundle({ tarball: junk }, { compression: 'zstd', recipients: [] }), (e: unknown) => isScError(e, 'SC_ERR_BAD_ARCHIVE'));
    const xz = join(base, 'x.tar.xz');
    writeFileSync(xz, Buffer.concat([Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]), Buffer.alloc(600)]));
    assert.throws(() => packBundle({ tarball: xz }, { compression: 'zstd', recipients: [] }), (e: unknown) => isScError(e, 'SC_ERR_BAD_ARCHIVE'));
    // a gzip file whose content is not a tar fails the stream
    const gzJunk = join(base, 'junk.gz');
    writeFileSync(gzJunk, execFileSync('gzip', ['-c'], { input: Buffer.alloc(2000, 65) }));
    await assert.rejects(write(packBundle({ tarball: gzJunk }, { compression: 'none', recipients: [] }), join(base, 'junk.out')), (e: unknown) =>
      isScError(e, 'SC_ERR_BAD_ARCHIVE'),
    );
    assert.throws(() => packBundle({}, { compression: 'zstd', recipients: [] }), (e: unknown) => isScError(e, 'SC_ERR_BAD_REQUEST'));
    assert.throws(() => packBundle({ dir: rootfs, tarball: junk }, { compression: 'zstd', recipients: [] }), (e: unknown) => isScError(e, 'SC_ERR_BAD_REQUEST'));
    assert.throws(() => packBundle({ dir: rootfs }, { compression: 'zstd', recipients: ['age1nope'] }), (e: unknown) => isScError(e, 'SC_ERR_BAD_KEY'));
    assert.throws(() => packBundle({ dir: rootfs }, { compression: 'lz4' as Compression, recipients: [] }), (e: unknown) => isScError(e, 'SC_ERR_BAD_REQUEST'));
  });

  it('fails unpacking with the right code: wrong identity, truncation, tampering, wrong compression', async () => {
    const blob = join(base, 'fail-age');
    await write(packBundle({ dir: rootfs }, { compression: 'zstd', recipients: [key.recipient] }), blob);
    const bytes = readFileSync(blob);
    const unpack = (buf: Buffer, o: Partial<Parameters<typeof unpackBundle>[1]> = {}) =>
      unpackBundle(Readable.from([buf]), { dir: join(base, 'fail-out'), compression: 'zstd', encryption: 'age', identities: [key.identity], ...o });
    const code = (c: string) => (e: unknown) => {
      assert.ok(isScError(e) && e.code === c, `expected ${c}, got ${(e as { code?: string }).code}: ${(e as Error).message}`);
      return true;
    };
    await assert.rejects(unpack(bytes, { identities: [other.identity] }), code('SC_ERR_DECRYPT'));
    await assert.rejects(unpack(bytes.subarray(0, bytes.length - 100)), code('SC_ERR_DECRYPT'));
    const flipped = Buffer.from(bytes);
    flipped[Math.floor(bytes.length / 2)] ^= 1;
    await assert.rejects(unpack(flipped), code('SC_ERR_DECRYPT'));
    await assert.rejects(unpack(bytes, { encryption: 'none' }), code('SC_ERR_BAD_ARCHIVE'));
    await assert.rejects(unpack(bytes, { identities: [] }), code('SC_ERR_BAD_KEY'));

    const plainBlob = join(base, 'fail-zstd');
    await write(packBundle({ dir: rootfs }, { compression: 'zstd', recipients: [] }), plainBlob);
    const plain = readFileSync(plainBlob);
    await assert.rejects(unpack(plain.subarray(0, plain.length - 50), { encryption: 'none' }), code('SC_ERR_BAD_ARCHIVE'));
    await assert.rejects(unpack(plain, { encryption: 'none', compression: 'gzip' }), code('SC_ERR_BAD_ARCHIVE'));
    await assert.rejects(unpack(plain, { encryption: 'none', compression: 'none' }), code('SC_ERR_BAD_ARCHIVE'));
  });

  it('decompressStream fails with SC_ERR_BAD_ARCHIVE on a truncated gzip stream', async () => {
    const gz = execFileSync('gzip', ['-c'], { input: Buffer.alloc(100_000, 1) });
    await assert.rejects(
      pipeline(Readable.from([gz.subarray(0, gz.length - 10)]), decompressStream('gzip'), async (s: AsyncIterable<Buffer>) => {
        for await (const _ of s) {
          /* drain */
        }
      }),
      (e: unknown) => isScError(e, 'SC_ERR_BAD_ARCHIVE'),
    );
  });

  it('reads os-release from a directory (through the relative symlink) and picks net formats', async () => {
    const osr = await readOsRelease({ dir: rootfs });
    assert.equal(osr.ID, 'debian');
    assert.equal(osr.VERSION_ID, '12');
    assert.equal(osr.NAME, 'Debian GNU/Linux');
    const bare = join(base, 'bare');
    mkdirSync(join(bare, 'usr/lib'), { recursive: true });
    writeFileSync(join(bare, 'usr/lib/os-release'), 'ID=fedora\nVERSION_ID=40\n');
    assert.equal((await readOsRelease({ dir: bare })).ID, 'fedora');
    assert.deepEqual(await readOsRelease({ dir: join(base, 'rootfs/var/log') }), {});
    await assert.rejects(readOsRelease({ dir: join(base, 'missing') }), (e: unknown) => isScError(e, 'SC_ERR_BAD_REQUEST'));
    assert.deepEqual(parseOsRelease('# c\nNAME="A \\"B\\""\nID=x\nX=\'q w\'\nbad line\n'), { NAME: 'A "B"', ID: 'x', X: 'q w' });
    const nf = Object.fromEntries(['debian', 'ubuntu', 'fedora', 'centos', 'rhel', 'rocky', 'almalinux', 'arch', 'flatcar', 'coreos', 'windows', 'alpine'].map((i) => [i, defaultNetFormat(i)]));
    assert.deepEqual(nf, {
      debian: 'ifupdown',
      ubuntu: 'netplan',
      fedora: 'networkd',
      centos: 'networkd',
      rhel: 'networkd',
      rocky: 'networkd',
      almalinux: 'networkd',
      arch: 'networkd',
      flatcar: 'networkd',
      coreos: 'networkd',
      windows: 'windows-unattend',
      alpine: 'ifupdown',
    });
  });

  it('makeSampleRootfs is deterministic for a seed and lays out each net format', async () => {
    const a = join(base, 'det-a');
    const b = join(base, 'det-b');
    await makeSampleRootfs(a, { id: 'ubuntu', name: 'Ubuntu', version: '24.04', netFormat: 'netplan', sizeMiB: 0.25 });
    await makeSampleRootfs(b, { id: 'ubuntu', name: 'Ubuntu', version: '24.04', netFormat: 'netplan', sizeMiB: 0.25 });
    assert.deepEqual(snapshot(a), snapshot(b));
    assert.ok(snapshot(a).some((l) => l.startsWith('etc/netplan/01-loopback.yaml f')));
    const c = join(base, 'det-c');
    await makeSampleRootfs(c, { id: 'fedora', name: 'Fedora', version: '40', netFormat: 'networkd', sizeMiB: 0 });
    assert.ok(snapshot(c).some((l) => l.startsWith('etc/systemd/network d')));
    assert.equal((await readOsRelease({ dir: c })).PRETTY_NAME, 'Fedora 40');
  });
});
