/**
 * safeExtract against hostile archives (built here from raw ustar headers, so nothing
 * sanitises them on the way) and packDirStream's order and fidelity.
 */
import assert from 'node:assert/strict';
import { chmodSync, createReadStream, createWriteStream, existsSync, linkSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { afterEach, beforeEach, describe, it } from 'node:test';
import * as tar from 'tar';
import { packDirStream, safeExtract } from '../../shared/bundle/index.js';
import { archivePath } from '../../shared/bundle/tar-guard.js';
import { DirCache, thisCreator } from '../../shared/bundle/tar-write.js';
import { isScError } from '../../shared/errors.js';

type Kind = 'file' | 'dir' | 'symlink' | 'hardlink' | 'chardev' | 'fifo';
const TYPEFLAG: Record<Kind, string> = { file: '0', hardlink: '1', symlink: '2', chardev: '3', dir: '5', fifo: '6' };

interface RawEntry {
  path: string;
  kind?: Kind;
  linkpath?: string;
  mode?: number;
  body?: string | Buffer;
  mtime?: number;
  /** The size field, when it should differ from the body's length. */
  size?: number;
}

function octal(buf: Buffer, off: number, len: number, value: number): void {
  buf.write(`${value.toString(8).padStart(len - 1, '0')}\0`, off, len, 'latin1');
}

/** One ustar header (+ padded body), written byte by byte: no library sanitises anything. */
function rawEntry(e: RawEntry): Buffer {
  const kind = e.kind ?? 'file';
  const body = Buffer.from(e.body ?? '');
  const h = Buffer.alloc(512);
  h.write(e.path, 0, 100, 'utf8');
  octal(h, 100, 8, e.mode ?? (kind === 'dir' ? 0o755 : 0o644));
  octal(h, 108, 8, 0);
  octal(h, 116, 8, 0);
  octal(h, 124, 12, e.size ?? (kind === 'file' ? body.length : 0));
  octal(h, 136, 12, e.mtime ?? 1_700_000_000);
  h.fill(0x20, 148, 156);
  h.write(TYPEFLAG[kind], 156, 1, 'latin1');
  if (e.linkpath) h.write(e.linkpath, 157, 100, 'utf8');
  h.write('ustar\0', 257, 6, 'latin1');
  h.write('00', 263, 2, 'latin1');
  let sum = 0;
  for (const b of h) sum += b;
  h.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 8, 'latin1');
  const pad = kind === 'file' ? Buffer.alloc((512 - (body.length % 512)) % 512) : Buffer.alloc(0);
  return Buffer.concat([h, kind === 'file' ? body : Buffer.alloc(0), pad]);
}

function archive(entries: RawEntry[]): Buffer {
  return Buffer.concat([...entries.map(rawEntry), Buffer.alloc(1024)]);
}

/** Every path under `dir`, relative, sorted. */
function listAll(dir: string, rel = ''): string[] {
  const out: string[] = [];
  for (const name of readdirSync(join(dir, rel)).sort()) {
    const r = rel ? `${rel}/${name}` : name;
    out.push(r);
    const st = lstatSync(join(dir, r));
    if (st.isDirectory()) out.push(...listAll(dir, r));
  }
  return out;
}

describe('safeExtract', () => {
  let base: string;
  let target: string;

  beforeEach(() => {
    // base/t1/t2 is the target: '../../x' from the target lands in base, where we look for it.
    base = mkdtempSync(join(tmpdir(), 'sc-tar-'));
    target = join(base, 't1', 't2');
    mkdirSync(target, { recursive: true });
    writeFileSync(join(base, 'canary'), 'untouched');
  });
  afterEach(() => rmSync(base, { recursive: true, force: true }));

  const extract = (entries: RawEntry[]) => safeExtract(Readable.from([archive(entries)]), target);
  const isUnsafe = (e: unknown) => {
    assert.ok(isScError(e, 'SC_ERR_UNSAFE_ARCHIVE'), `expected SC_ERR_UNSAFE_ARCHIVE, got ${(e as Error)?.message}`);
    return true;
  };
  /** Nothing outside the target: base holds only t1/t2 and whatever is inside t2. */
  const assertNothingOutside = () => {
    assert.deepEqual(readdirSync(base), ['canary', 't1']);
    assert.deepEqual(readdirSync(join(base, 't1')), ['t2']);
    assert.equal(readFileSync(join(base, 'canary'), 'utf8'), 'untouched');
  };

  const evil: [string, RawEntry[]][] = [
    ['../evil', [{ path: '../evil', body: 'x' }]],
    ['../../evil', [{ path: '../../evil', body: 'x' }]],
    ['/abs/evil', [{ path: '/abs/evil', body: 'x' }]],
    ['a/../../evil', [{ path: 'a/', kind: 'dir' }, { path: 'a/../../evil', body: 'x' }]],
    ['symlink x -> ../../ then x/evil', [{ path: 'x', kind: 'symlink', linkpath: '../../' }, { path: 'x/evil', body: 'x' }]],
    ['symlink /etc (allowed) then link/evil', [{ path: 'link', kind: 'symlink', linkpath: '/etc' }, { path: 'link/evil', body: 'x' }]],
    ['hardlink to ../../outside', [{ path: 'h', kind: 'hardlink', linkpath: '../../outside' }]],
    ['hardlink to /etc/passwd', [{ path: 'h', kind: 'hardlink', linkpath: '/etc/passwd' }]],
    ['symlink inside, then a dir through it', [{ path: 'sub/', kind: 'dir' }, { path: 'ok', kind: 'symlink', linkpath: 'sub' }, { path: 'ok/d/', kind: 'dir' }]],
    ['hardlink through a symlink', [{ path: 'l', kind: 'symlink', linkpath: '/etc' }, { path: 'h', kind: 'hardlink', linkpath: 'l/passwd' }]],
    ['relative symlink escaping from a subdirectory', [{ path: 'a/b/', kind: 'dir' }, { path: 'a/b/up', kind: 'symlink', linkpath: '../../../x' }]],
    ['a symlink named like the root', [{ path: './', kind: 'symlink', linkpath: '/' }]],
    ['an absolute symlink that climbs out of the root', [{ path: 'weird', kind: 'symlink', linkpath: '/../../../etc' }]],
    // Chains: each link is resolved against the links already made, as the kernel walks them.
    ['a chain l1 -> . then l2 -> l1/..', [{ path: 'l1', kind: 'symlink', linkpath: '.' }, { path: 'l2', kind: 'symlink', linkpath: 'l1/..' }]],
    ['a longer chain a -> ., b -> a/a/a, c -> b/../t2/..', [{ path: 'a', kind: 'symlink', linkpath: '.' }, { path: 'b', kind: 'symlink', linkpath: 'a/a/a' }, { path: 'c', kind: 'symlink', linkpath: 'b/../t2/..' }]],
    ['a chain through a directory: d/l -> .., e -> d/l/..', [{ path: 'd/', kind: 'dir' }, { path: 'd/l', kind: 'symlink', linkpath: '..' }, { path: 'e', kind: 'symlink', linkpath: 'd/l/..' }]],
    ['an absolute chain l1 -> ., l2 -> /l1/..', [{ path: 'l1', kind: 'symlink', linkpath: '.' }, { path: 'l2', kind: 'symlink', linkpath: '/l1/..' }]],
    ['an absolute chain through an absolute link: r -> /, up -> /r/../canary', [{ path: 'r', kind: 'symlink', linkpath: '/' }, { path: 'up', kind: 'symlink', linkpath: '/r/../canary' }]],
    ['a hardlink that moves a symlink up a level: a/up -> .., then up2 = a/up', [{ path: 'a/', kind: 'dir' }, { path: 'a/up', kind: 'symlink', linkpath: '..' }, { path: 'up2', kind: 'hardlink', linkpath: 'a/up' }]],
  ];

  for (const [name, entries] of evil) {
    it(`refuses ${name} with SC_ERR_UNSAFE_ARCHIVE and writes nothing outside`, async () => {
      await assert.rejects(extract([...entries, { path: 'after-the-bad-one', body: 'y' }]), isUnsafe);
      assertNothingOutside();
      assert.ok(!existsSync('/abs/evil'));
      assert.ok(!existsSync(join(target, 'after-the-bad-one')), 'nothing after the refused entry is extracted');
      assert.ok(!listAll(target).some((p) => p.endsWith('evil')), 'the evil entry itself was not written');
    });
  }

  it('keeps zero blocks as holes and every file its exact bytes and size: trailing zeros, all zeros, empty', async () => {
    const Z = Buffer.alloc(8192);
    const files: Record<string, Buffer> = {
      trail: Buffer.concat([Buffer.from('x'), Z]),
      aligned: Buffer.concat([Buffer.alloc(4096, 7), Z]),
      zeros: Buffer.alloc(12288),
      mid: Buffer.concat([Buffer.from('a'), Z, Buffer.from('b')]),
      lead: Buffer.concat([Z, Buffer.from('tail')]),
      empty: Buffer.alloc(0),
    };
    await extract(Object.entries(files).map(([path, body]) => ({ path, body, mode: 0o640 })));
    for (const [path, body] of Object.entries(files)) {
      const st = statSync(join(target, path));
      assert.equal(st.size, body.length, `${path}: size`);
      assert.ok(readFileSync(join(target, path)).equals(body), `${path}: bytes`);
      assert.equal(st.mode & 0o7777, 0o640, `${path}: mode`);
      assert.equal(Math.floor(st.mtimeMs / 1000), 1_700_000_000, `${path}: mtime`);
    }
  });

  it('refuses a link that a later entry turns into an escape, and makes no symlink at all', async () => {
    // x -> d/p/../.. is inside while d/p is a directory name; once d/p -> . exists, x is the target's parent.
    const p = extract([
      { path: 'd/', kind: 'dir' },
      { path: 'x', kind: 'symlink', linkpath: 'd/p/../..' },
      { path: 'ok', kind: 'symlink', linkpath: 'd' },
      { path: 'd/p', kind: 'symlink', linkpath: '.' },
    ]);
    await assert.rejects(p, (e: unknown) => isUnsafe(e) && /"x"/.test((e as Error).message));
    assertNothingOutside();
    assert.deepEqual(listAll(target), ['d'], 'symlinks are made only once all of them are checked');
    // A loop is only seen once both links exist: refused too (the kernel would answer ELOOP).
    await assert.rejects(
      extract([
        { path: 'a', kind: 'symlink', linkpath: 'b' },
        { path: 'b', kind: 'symlink', linkpath: 'a' },
      ]),
      (e: unknown) => isUnsafe(e) && /more than 40 links/.test((e as Error).message),
    );
    assert.deepEqual(listAll(target), ['d']);
  });

  it('refuses a relative link whose walk goes through an existing symlink that leaves the target', async () => {
    symlinkSync('..', join(target, 'pre'));
    await assert.rejects(extract([{ path: 'x', kind: 'symlink', linkpath: 'pre/..' }]), isUnsafe);
    assertNothingOutside();
  });

  // A device is skipped and a FIFO made only at the end: neither replaces the symlink on disk at
  // its path while later entries are written, so what is below that path still goes through it.
  // Also when the guard looked at that symlink before (a link whose target walks through it).
  for (const kind of ['chardev', 'fifo'] as const) {
    for (const before of [[], [{ path: 'l', kind: 'symlink', linkpath: 'pre/..' }]] as RawEntry[][]) {
      it(`refuses a path below a ${kind} entry standing where a symlink already in the target points outside${before.length ? ', looked at before' : ''}`, async () => {
        mkdirSync(join(base, 'outside'));
        symlinkSync(join(base, 'outside'), join(target, 'pre'));
        await assert.rejects(extract([...before, { path: 'pre', kind }, { path: 'pre/evil', body: 'x' }]), isUnsafe);
        assert.deepEqual(readdirSync(join(base, 'outside')), []);
      });
    }
  }

  // The guard remembers the last directory whose parents checked out; a symlink made at that
  // directory or above it (directly, or as a hardlink to one) must end that.
  it('refuses a path below a directory that a later entry made a symlink, in the directory just checked', async () => {
    const cases: RawEntry[][] = [
      [{ path: 'b/', kind: 'dir' }, { path: 'b/f1', body: '1' }, { path: 'b', kind: 'symlink', linkpath: '.' }, { path: 'b/f2', body: '2' }],
      [{ path: 'a/b/', kind: 'dir' }, { path: 'a/b/f1', body: '1' }, { path: 'a/b', kind: 'symlink', linkpath: '.' }, { path: 'a/b/f2', body: '2' }],
      [{ path: 'x/y/z/', kind: 'dir' }, { path: 'x/y/z/f1', body: '1' }, { path: 'x', kind: 'symlink', linkpath: '.' }, { path: 'x/y/z/f2', body: '2' }],
      [{ path: 's', kind: 'symlink', linkpath: '.' }, { path: 'd/', kind: 'dir' }, { path: 'd/f1', body: '1' }, { path: 'd', kind: 'hardlink', linkpath: 's' }, { path: 'd/f2', body: '2' }],
    ];
    for (const entries of cases) {
      rmSync(target, { recursive: true, force: true });
      mkdirSync(target);
      await assert.rejects(extract(entries), (e: unknown) => isUnsafe(e) && /goes through the symlink/.test((e as Error).message));
      assert.ok(!listAll(target).some((p) => p.endsWith('f2')));
    }
  });

  // tar-stream reads no content for a directory whatever size its header declares, and its entry
  // stream never ends: draining it used to hang the extraction (and the agent's step) for ever.
  it('extracts past a directory whose header declares a size', { timeout: 20_000 }, async () => {
    await extract([{ path: 'd/', kind: 'dir', size: 1024 }, { path: 'd/f', body: 'content' }]);
    assert.equal(readFileSync(join(target, 'd/f'), 'utf8'), 'content');
  });

  it('normalises archive paths the same whether they are already normal or not', () => {
    const same: [string, string][] = [
      ['a/b/c', 'a/b/c'],
      ['a/b/', 'a/b'],
      ['./a/b', 'a/b'],
      ['a//b/./c/', 'a/b/c'],
      ['.hidden/..x/x..', '.hidden/..x/x..'],
      ['...', '...'],
      ['', ''],
      ['.', ''],
      ['./', ''],
    ];
    for (const [raw, want] of same) assert.equal(archivePath(raw, 'path'), want, JSON.stringify(raw));
    for (const raw of ['..', '../a', 'a/..', 'a/../b', 'a/b/..', '/a', '/', 'a\0b', 'a/\0']) {
      assert.throws(() => archivePath(raw, 'path'), (e: unknown) => isUnsafe(e), JSON.stringify(raw));
    }
  });

  it('accepts chains that stay inside (usr/bin/X11 -> ., lib -> usr/lib, deep relative links)', async () => {
    await extract([
      { path: 'usr/bin/', kind: 'dir' },
      { path: 'usr/lib/x86_64-linux-gnu/', kind: 'dir' },
      { path: 'usr/lib/x86_64-linux-gnu/libc.so.6', body: 'libc' },
      { path: 'usr/bin/X11', kind: 'symlink', linkpath: '.' },
      { path: 'lib', kind: 'symlink', linkpath: 'usr/lib' },
      { path: 'lib64', kind: 'symlink', linkpath: '/lib/../lib/x86_64-linux-gnu' },
      { path: 'usr/bin/libc', kind: 'symlink', linkpath: 'X11/X11/../lib/x86_64-linux-gnu/libc.so.6' },
    ]);
    assert.equal(readlinkSync(join(target, 'usr/bin/libc')), 'X11/X11/../lib/x86_64-linux-gnu/libc.so.6');
    assert.equal(readFileSync(join(target, 'usr/bin/libc'), 'utf8'), 'libc');
    assertNothingOutside();
  });

  it('refuses to write through a symlink already in the target (pointing outside)', async () => {
    mkdirSync(join(base, 'outside'));
    symlinkSync(join(base, 'outside'), join(target, 'pre'));
    await assert.rejects(extract([{ path: 'pre/evil', body: 'x' }]), isUnsafe);
    assert.deepEqual(readdirSync(join(base, 'outside')), []);
  });

  it('allows absolute (root-relative) and inside relative symlinks, keeping targets verbatim', async () => {
    const r = await extract([
      { path: 'etc/', kind: 'dir' },
      { path: 'etc/alternatives/', kind: 'dir' },
      { path: 'etc/alternatives/awk', kind: 'symlink', linkpath: '/usr/bin/mawk' },
      { path: 'usr/bin/', kind: 'dir' },
      { path: 'usr/bin/mawk', body: 'mawk', mode: 0o755 },
      { path: 'usr/bin/awk', kind: 'symlink', linkpath: '/etc/alternatives/awk' },
      { path: 'usr/bin/nawk', kind: 'symlink', linkpath: 'mawk' },
      { path: 'etc/os-release', kind: 'symlink', linkpath: '../usr/lib/os-release' },
      { path: 'usr/bin/gawk', kind: 'hardlink', linkpath: 'usr/bin/mawk' },
    ]);
    assert.equal(r.entries, 9);
    assert.equal(readlinkSync(join(target, 'usr/bin/awk')), '/etc/alternatives/awk');
    assert.equal(readlinkSync(join(target, 'etc/alternatives/awk')), '/usr/bin/mawk');
    assert.equal(readlinkSync(join(target, 'usr/bin/nawk')), 'mawk');
    assert.equal(readlinkSync(join(target, 'etc/os-release')), '../usr/lib/os-release');
    assert.equal(statSync(join(target, 'usr/bin/gawk')).ino, statSync(join(target, 'usr/bin/mawk')).ino);
    assertNothingOutside();
  });

  it('keeps modes exactly (setuid, setgid, sticky, group-writable, 0555 dirs) whatever the umask', async () => {
    await extract([
      { path: 'tmp/', kind: 'dir', mode: 0o1777 },
      { path: 'root/', kind: 'dir', mode: 0o700 },
      { path: 'ro/', kind: 'dir', mode: 0o555 },
      { path: 'var/mail/', kind: 'dir', mode: 0o2775 },
      { path: 'usr/bin/passwd', body: 'p', mode: 0o4755 },
      { path: 'usr/bin/wall', body: 'w', mode: 0o2755 },
      { path: 'shared', body: 's', mode: 0o666 },
      { path: 'secret', body: 's', mode: 0o600 },
    ]);
    const mode = (p: string) => statSync(join(target, p)).mode & 0o7777;
    assert.equal(mode('tmp'), 0o1777);
    assert.equal(mode('root'), 0o700);
    assert.equal(mode('ro'), 0o555);
    assert.equal(mode('var/mail'), 0o2775);
    assert.equal(mode('usr/bin/passwd'), 0o4755);
    assert.equal(mode('usr/bin/wall'), 0o2755);
    assert.equal(mode('shared'), 0o666);
    assert.equal(mode('secret'), 0o600);
  });

  it('keeps modes exactly under a umask that would take bits from them', async () => {
    const old = process.umask(0o077);
    try {
      await extract([
        { path: 'etc/', kind: 'dir', mode: 0o755 },
        { path: 'etc/hosts', body: 'h', mode: 0o644 },
        { path: 'etc/init', body: 'i', mode: 0o755 },
        { path: 'top', body: 't', mode: 0o640 },
      ]);
    } finally {
      process.umask(old);
    }
    const mode = (p: string) => statSync(join(target, p)).mode & 0o7777;
    assert.equal(mode('etc'), 0o755);
    assert.equal(mode('etc/hosts'), 0o644);
    assert.equal(mode('etc/init'), 0o755);
    assert.equal(mode('top'), 0o640);
  });

  it('knows which directories give a new file exactly its creator\'s owner and its open mode (no chown or chmod needed there)', async () => {
    const creator = thisCreator();
    const dirs = new DirCache(target, creator);
    mkdirSync(target, { recursive: true });
    await dirs.checkRoot();
    assert.deepEqual(dirs.plain(target), creator, 'a plain target');
    const at = (rel: string) => join(target, rel);
    dirs.add(at('a'), true, undefined, false);
    dirs.add(at('a/acl'), true, undefined, true);
    dirs.add(at('a/acl/below'), true, undefined, false);
    dirs.add(at('other'), true, creator.gid + 1, false);
    dirs.add(at('found'), false, undefined, false);
    assert.deepEqual(dirs.plain(at('a')), creator, 'made here in a plain parent');
    assert.equal(dirs.plain(at('a/acl')), null, 'a default ACL');
    assert.equal(dirs.plain(at('a/acl/below')), null, 'made below a default ACL');
    assert.equal(dirs.plain(at('other')), null, 'another group');
    assert.equal(dirs.plain(at('found')), null, 'already there');
    dirs.forget(at('a'));
    assert.equal(dirs.plain(at('a')), null, 'forgotten');
    const setgid = join(target, 'sg');
    mkdirSync(setgid);
    chmodSync(setgid, 0o2755);
    const inSetgid = new DirCache(setgid, creator);
    await inSetgid.checkRoot();
    assert.equal(inSetgid.plain(setgid), null, 'a setgid target');
  });

  it('restores directory and symlink mtimes after the contents are written', async () => {
    await extract([
      { path: 'd/', kind: 'dir', mtime: 1_600_000_000 },
      { path: 'd/f', body: 'x', mtime: 1_600_000_100 },
      { path: 'd/l', kind: 'symlink', linkpath: 'f', mtime: 1_600_000_200 },
    ]);
    assert.equal(lstatSync(join(target, 'd')).mtimeMs, 1_600_000_000_000);
    assert.equal(lstatSync(join(target, 'd/f')).mtimeMs, 1_600_000_100_000);
    assert.equal(lstatSync(join(target, 'd/l')).mtimeMs, 1_600_000_200_000);
  });

  it('lets the last entry for a path win (file replaced by a symlink and back)', async () => {
    await extract([
      { path: 'a', body: 'first' },
      { path: 'a', kind: 'symlink', linkpath: '/etc/hostname' },
      { path: 'b', kind: 'symlink', linkpath: '/nowhere' },
      { path: 'b', body: 'second' },
    ]);
    assert.equal(readlinkSync(join(target, 'a')), '/etc/hostname');
    assert.equal(readFileSync(join(target, 'b'), 'utf8'), 'second');
  });

  it('creates FIFOs, and skips device nodes, counting them', async () => {
    const r = await extract([
      { path: 'dev/', kind: 'dir' },
      { path: 'dev/null', kind: 'chardev', mode: 0o666 },
      { path: 'run/initctl', kind: 'fifo', mode: 0o600 },
      { path: 'ok', body: 'fine' },
    ]);
    assert.deepEqual(r, { entries: 4, skipped: 1 });
    assert.deepEqual(readdirSync(join(target, 'dev')), []);
    const fifo = lstatSync(join(target, 'run/initctl'));
    assert.ok(fifo.isFIFO());
    assert.equal(fifo.mode & 0o7777, 0o600);
    assert.equal(readFileSync(join(target, 'ok'), 'utf8'), 'fine');
  });

  it('fails with SC_ERR_BAD_ARCHIVE on a truncated or corrupt tar', async () => {
    const full = archive([{ path: 'big', body: Buffer.alloc(5000, 1) }]);
    await assert.rejects(safeExtract(Readable.from([full.subarray(0, 2048)]), target), (e: unknown) => isScError(e, 'SC_ERR_BAD_ARCHIVE'));
    const corrupt = Buffer.from(archive([{ path: 'x', body: 'x' }]));
    corrupt[10] ^= 0xff; // header checksum no longer matches
    await assert.rejects(safeExtract(Readable.from([corrupt]), target), (e: unknown) => isScError(e, 'SC_ERR_BAD_ARCHIVE'));
  });

  it('reports released offsets below which a source may refill its chunks, and unpacks the same tree when it does', async () => {
    const src = join(base, 'src');
    const deep = join(src, 'usr', 'share', 'a-directory-name-long-enough'.repeat(3));
    mkdirSync(deep, { recursive: true });
    mkdirSync(join(src, 'etc'));
    const files = new Map<string, Buffer>();
    const put = (rel: string, body: Buffer) => {
      writeFileSync(join(src, rel), body);
      files.set(rel, body);
    };
    // Small files and headers cut by chunk edges, a name past 100 bytes (a PAX header), and a
    // file of several chunks whose bytes all differ.
    for (let i = 0; i < 200; i++) put(`etc/f${i}`, Buffer.from(`file ${i}\n`.repeat(i * 7)));
    put(join('usr', 'share', 'a-directory-name-long-enough'.repeat(3), 'a-file-with-a-long-name'.repeat(2)), Buffer.from('deep\n'));
    put('usr/big', randomBytes(3 << 20));
    symlinkSync('../etc/f1', join(src, 'usr/link'));
    const whole: Buffer[] = [];
    for await (const c of packDirStream(src)) whole.push(c as Buffer);
    const bytes = Buffer.concat(whole);
    // Each chunk its own copy, in sizes that fall everywhere against the 512-byte blocks.
    const chunks: { buf: Buffer; end: number; refilled: boolean }[] = [];
    const sizes = [1000, 70_000, 333, 512, 65_536, 4097];
    for (let off = 0, i = 0; off < bytes.length; i++) {
      const n = Math.min(sizes[i % sizes.length], bytes.length - off);
      off += n;
      chunks.push({ buf: Buffer.from(bytes.subarray(off - n, off)), end: off, refilled: false });
    }
    let fed = 0;
    let last = 0;
    const source = Readable.from(
      (function* () {
        for (const c of chunks) {
          fed = c.end;
          yield c.buf;
        }
      })(),
    );
    const out = join(base, 'out');
    await safeExtract(source, out, {
      released: (offset) => {
        assert.ok(offset >= last && offset <= fed, `released ${offset} after ${last}, with ${fed} bytes given`);
        last = offset;
        // What the source would do: fill every chunk wholly below the offset with other bytes.
        for (const c of chunks) {
          if (c.end <= offset && !c.refilled) {
            c.buf.fill(0xa5);
            c.refilled = true;
          }
        }
      },
    });
    for (const [rel, body] of files) assert.ok(readFileSync(join(out, rel)).equals(body), rel);
    assert.equal(readlinkSync(join(out, 'usr/link')), '../etc/f1');
    const refilled = chunks.filter((c) => c.refilled).length;
    assert.ok(refilled >= chunks.length - 3, `only ${refilled} of ${chunks.length} chunks released`);
  });

  it('gives the event loop turns while it works: a timer due early in the extraction runs before its end', async () => {
    // Every byte is in memory from the start, so nothing but the extractor's own turns lets the
    // loop reach its timers before the last entry; with breatheMs 0 it takes one at each entry.
    const entries: RawEntry[] = [];
    for (let i = 0; i < 300; i++) entries.push({ path: `d${i % 10}/f${i}`, body: `file ${i}\n` });
    for (let i = 0; i < 50; i++) entries.push({ path: `l${i}`, kind: 'symlink', linkpath: `d0/f${i * 10}` });
    // The offsets the extractor has reached: the timer notes where it was when the timer ran.
    let reached = -1;
    let ranAt: number | undefined;
    await safeExtract(Readable.from([archive(entries)]), target, {
      breatheMs: 0,
      released: (offset) => {
        if (reached < 0) setTimeout(() => (ranAt = reached), 0);
        reached = offset;
      },
    });
    assert.ok(reached > 300 * 1024, `the extractor reached offset ${reached}`);
    assert.ok(ranAt !== undefined && ranAt < reached / 2, `the timer ran at offset ${ranAt} of ${reached}`);
    assert.equal(readFileSync(join(target, 'd9/f299'), 'utf8'), 'file 299\n');
    assert.equal(readlinkSync(join(target, 'l3')), 'd0/f30');
  });

  it('passes on the source stream error', async () => {
    const src = new Readable({ read() {} });
    const p = safeExtract(src, target);
    src.push(archive([{ path: 'a', body: 'x' }]).subarray(0, 512));
    src.destroy(Object.assign(new Error('network gone'), { code: 'ECONNRESET' }));
    await assert.rejects(p, /network gone/);
  });
});

describe('packDirStream', () => {
  let base: string;
  beforeEach(() => {
    base = mkdtempSync(join(tmpdir(), 'sc-pack-'));
  });
  afterEach(() => rmSync(base, { recursive: true, force: true }));

  it('packs in sorted order with relative paths, and the tar CLI agrees', async () => {
    const src = join(base, 'src');
    for (const d of ['b', 'a/z', 'a/c', 'empty']) mkdirSync(join(src, d), { recursive: true });
    for (const f of ['b/2', 'b/1', 'a/z/f', 'a/c/f', 'top']) writeFileSync(join(src, f), f);
    symlinkSync('/etc/hostname', join(src, 'abs'));
    const paths: string[] = [];
    await new Promise<void>((resolve, reject) => {
      const p = new tar.Parser({
        onReadEntry: (e) => {
          paths.push(e.path);
          e.resume();
        },
      });
      p.on('end', resolve);
      p.on('error', reject);
      packDirStream(src).on('error', reject).pipe(p);
    });
    assert.deepEqual(paths, ['a/', 'a/c/', 'a/c/f', 'a/z/', 'a/z/f', 'abs', 'b/', 'b/1', 'b/2', 'empty/', 'top']);
  });

  it('packs hardlink groups once and unpacks them as hardlinks (same inode)', async () => {
    const src = join(base, 'src');
    mkdirSync(join(src, 'usr/bin'), { recursive: true });
    mkdirSync(join(src, 'etc'), { recursive: true });
    // Enough files around the links that the packer works on several at once.
    for (let i = 0; i < 64; i++) writeFileSync(join(src, 'usr/bin', `tool${String(i).padStart(2, '0')}`), `tool ${i}\n`.repeat(100));
    writeFileSync(join(src, 'usr/bin/perl5.36'), 'perl');
    linkSync(join(src, 'usr/bin/perl5.36'), join(src, 'usr/bin/perl'));
    linkSync(join(src, 'usr/bin/tool10'), join(src, 'usr/bin/zz-tool10'));
    linkSync(join(src, 'usr/bin/tool10'), join(src, 'etc/tool10-copy'));
    // Last in the archive, a group of three names after a bigger file, like /bin/bzip2, bunzip2
    // and bzcat (node-tar 7's packer ended its stream early on this: "write after end").
    mkdirSync(join(src, 'var/bin'), { recursive: true });
    writeFileSync(join(src, 'var/bin/bash'), Buffer.alloc(1 << 20, 7));
    writeFileSync(join(src, 'var/bin/bunzip2'), 'bzip2');
    linkSync(join(src, 'var/bin/bunzip2'), join(src, 'var/bin/bzcat'));
    linkSync(join(src, 'var/bin/bunzip2'), join(src, 'var/bin/bzip2'));
    writeFileSync(join(src, 'etc/empty'), '');
    linkSync(join(src, 'etc/empty'), join(src, 'usr/bin/empty-too'));
    const out = join(base, 'out');
    const tarFile = join(base, 'x.tar');
    await pipeline(packDirStream(src), createWriteStream(tarFile));
    const listing = spawnSync('tar', ['-tvf', tarFile], { encoding: 'utf8' });
    assert.equal(listing.status, 0, listing.stderr);
    assert.equal(listing.stdout.split('\n').filter((l) => l.startsWith('h')).length, 6, 'each extra name is a hardlink entry, not a copy');
    await safeExtract(createReadStream(tarFile), out);
    const ino = (p: string) => statSync(join(out, p)).ino;
    assert.equal(ino('usr/bin/perl'), ino('usr/bin/perl5.36'));
    assert.equal(ino('usr/bin/tool10'), ino('usr/bin/zz-tool10'));
    assert.equal(ino('usr/bin/tool10'), ino('etc/tool10-copy'));
    assert.equal(ino('etc/empty'), ino('usr/bin/empty-too'));
    assert.equal(ino('var/bin/bzip2'), ino('var/bin/bunzip2'));
    assert.equal(ino('var/bin/bzcat'), ino('var/bin/bunzip2'));
    assert.notEqual(ino('usr/bin/tool10'), ino('usr/bin/tool11'));
    assert.equal(statSync(join(out, 'usr/bin/tool10')).nlink, 3);
    assert.equal(readFileSync(join(out, 'etc/tool10-copy'), 'utf8'), 'tool 10\n'.repeat(100));
  });

  it('fails with SC_ERR_BAD_REQUEST for a missing directory', async () => {
    const s = packDirStream(join(base, 'nope'));
    await assert.rejects(
      (async () => {
        for await (const _ of s) {
          /* drain */
        }
      })(),
      (e: unknown) => isScError(e, 'SC_ERR_BAD_REQUEST'),
    );
  });
});
