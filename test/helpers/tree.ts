/** Comparing unpacked trees in tests, and building trees that look like a real Linux root filesystem. */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, closeSync, ftruncateSync, lchownSync, linkSync, lstatSync, lutimesSync, mkdirSync, openSync, readdirSync, statSync, symlinkSync, writeFileSync, writeSync } from 'node:fs';
import { lstat, readdir, readFile, readlink } from 'node:fs/promises';
import { join } from 'node:path';
import { getAttribute, listAttributes, setAttributeSync } from '@napi-rs/xattr';

/** path → mode and content hash (or link target), for every entry under `dir`. */
export async function treeSnapshot(dir: string, rel = ''): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const e of (await readdir(join(dir, rel))).sort()) {
    const r = rel ? `${rel}/${e}` : e;
    const st = await lstat(join(dir, r));
    if (st.isSymbolicLink()) out[r] = `link ${await readlink(join(dir, r))}`;
    else if (st.isDirectory()) {
      out[r] = `dir ${(st.mode & 0o7777).toString(8)}`;
      Object.assign(out, await treeSnapshot(dir, r));
    } else out[r] = `file ${(st.mode & 0o7777).toString(8)} ${createHash('sha256').update(await readFile(join(dir, r))).digest('hex')}`;
  }
  return out;
}

/** Everything about one entry that a root filesystem needs kept. */
export interface EntryFacts {
  type: 'file' | 'dir' | 'symlink' | 'fifo' | 'chardev' | 'blockdev' | 'socket';
  /** Permission bits incl. setuid/setgid/sticky, octal. */
  mode: string;
  uid: number;
  gid: number;
  /** Whole seconds. */
  mtime: number;
  size?: number;
  sha256?: string;
  target?: string;
  /** For a file with several names: the first of them (sorted), naming the group. */
  hardlinkGroup?: string;
  /** name → hex value. */
  xattrs: Record<string, string>;
  /** For files ≥ 1 MiB: true when fewer than half of its bytes are allocated. */
  sparse?: boolean;
}

/**
 * Facts for every entry under `dir` (recursive, sorted), for comparing a source tree with an
 * unpacked one. `sparse: false` leaves out the allocation check (for extractors that write
 * holes as zeros).
 */
export async function treeFacts(dir: string, opts: { sparse?: boolean } = {}): Promise<Record<string, EntryFacts>> {
  const out: Record<string, EntryFacts> = {};
  const byInode = new Map<number, string[]>();
  const visit = async (rel: string) => {
    for (const name of (await readdir(rel ? join(dir, rel) : dir)).sort()) {
      const r = rel ? `${rel}/${name}` : name;
      const p = join(dir, r);
      const st = await lstat(p);
      const xattrs: Record<string, string> = {};
      for (const n of (await listAttributes(p)).sort()) xattrs[n] = ((await getAttribute(p, n)) ?? Buffer.alloc(0)).toString('hex');
      const f: EntryFacts = {
        type: st.isFile() ? 'file' : st.isDirectory() ? 'dir' : st.isSymbolicLink() ? 'symlink' : st.isFIFO() ? 'fifo' : st.isCharacterDevice() ? 'chardev' : st.isBlockDevice() ? 'blockdev' : 'socket',
        mode: (st.mode & 0o7777).toString(8),
        uid: st.uid,
        gid: st.gid,
        mtime: Math.floor(st.mtimeMs / 1000),
        xattrs,
      };
      if (st.isFile()) {
        f.size = st.size;
        f.sha256 = createHash('sha256').update(await readFile(p)).digest('hex');
        if (opts.sparse !== false && st.size >= 1 << 20) f.sparse = st.blocks * 512 < st.size / 2;
        if (st.nlink > 1) byInode.set(st.ino, [...(byInode.get(st.ino) ?? []), r]);
      }
      if (st.isSymbolicLink()) f.target = await readlink(p);
      out[r] = f;
      if (st.isDirectory()) await visit(r);
    }
  };
  await visit('');
  for (const names of byInode.values()) {
    const first = [...names].sort()[0];
    for (const n of names) out[n].hardlinkGroup = first;
  }
  return out;
}

/** A `security.capability` value (VFS_CAP_REVISION_2) granting cap_net_raw, effective: `setcap cap_net_raw+ep`. */
export const CAP_NET_RAW_EP = Buffer.from('0100000200200000000000000000000000000000', 'hex');

/** Paths of interest in a tree made by `makeRealRootfs`. */
export const REAL_ROOTFS = {
  ping: 'usr/bin/ping',
  sparse: 'var/lib/machines/disk.img',
  longPath: `usr/share/${'d'.repeat(120)}/${'e'.repeat(130)}/${'f'.repeat(90)}.txt`,
  nonAscii: 'usr/share/doc/naïve-café/文件-ŝpecial.txt',
  fifo: 'run/initctl',
} as const;

/**
 * Builds, under `root`, a tree with what a real Debian root filesystem holds: hardlink groups
 * (three names, and names in two directories), relative and absolute symlinks
 * (etc/os-release -> ../usr/lib/os-release, usr/bin/awk -> /etc/alternatives/awk, bin ->
 * usr/bin), setuid/setgid/sticky modes, a 0000 file, numeric owners (incl. one above the ustar
 * range), security.capability on usr/bin/ping plus user.* and trusted.* attributes with binary
 * values, a sparse 64 MiB file, a path over 255 bytes with a 130-byte name, non-ASCII names and
 * link targets, a FIFO, empty directories. Must run as root (owners, trusted.*). Every mtime
 * is set, so two trees built the same way compare equal.
 */
export function makeRealRootfs(root: string): void {
  const dirs = ['etc/alternatives', 'usr/bin', 'usr/sbin', 'usr/lib', 'usr/share/doc/naïve-café', 'var/lib/machines', 'var/mail', 'var/tmp', 'tmp', 'run', 'srv', 'mnt', 'home/user', 'root'];
  for (const d of dirs) mkdirSync(join(root, d), { recursive: true });
  mkdirSync(join(root, REAL_ROOTFS.longPath, '..'), { recursive: true });
  const file = (rel: string, body: string | Buffer, mode = 0o644, uid = 0, gid = 0) => {
    writeFileSync(join(root, rel), body);
    lchownSync(join(root, rel), uid, gid);
    chmodSync(join(root, rel), mode);
  };
  file('usr/lib/os-release', 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n');
  symlinkSync('../usr/lib/os-release', join(root, 'etc/os-release'));
  symlinkSync('usr/bin', join(root, 'bin'));
  file('usr/bin/mawk', '#!mawk\n', 0o755);
  symlinkSync('/usr/bin/mawk', join(root, 'etc/alternatives/awk'));
  symlinkSync('/etc/alternatives/awk', join(root, 'usr/bin/awk'));
  file('usr/bin/passwd', Buffer.alloc(70_000, 1), 0o4755);
  file('usr/bin/wall', 'wall', 0o2755, 0, 5);
  file('usr/bin/bunzip2', Buffer.alloc(39_224, 2), 0o755);
  linkSync(join(root, 'usr/bin/bunzip2'), join(root, 'usr/bin/bzcat'));
  linkSync(join(root, 'usr/bin/bunzip2'), join(root, 'usr/bin/bzip2'));
  file('usr/bin/perl5.36.0', Buffer.alloc(300_000, 3), 0o755);
  linkSync(join(root, 'usr/bin/perl5.36.0'), join(root, 'usr/bin/perl'));
  file('usr/sbin/e2fsck', 'e2fsck', 0o755);
  linkSync(join(root, 'usr/sbin/e2fsck'), join(root, 'usr/sbin/fsck.ext4'));
  linkSync(join(root, 'usr/sbin/e2fsck'), join(root, 'usr/lib/fsck.ext4-in-lib'));
  file(REAL_ROOTFS.ping, Buffer.alloc(90_000, 4), 0o755);
  setAttributeSync(join(root, REAL_ROOTFS.ping), 'security.capability', CAP_NET_RAW_EP);
  setAttributeSync(join(root, REAL_ROOTFS.ping), 'user.binary', Buffer.from([0, 0x80, 0xff, 0x0a, 0x3d, 0x20, 0xc3]));
  setAttributeSync(join(root, 'usr/bin'), 'trusted.overlay.opaque', Buffer.from('y'));
  file('etc/shadow', 'root:*:19000:0:99999:7:::\n', 0o640, 0, 42);
  file('etc/gshadow', 'root:*::\n', 0o000, 0, 42);
  file('home/user/.profile', 'echo hi\n', 0o644, 1000, 1000);
  file('home/user/big-ids', 'ids above the ustar range\n', 0o600, 3_000_000, 3_000_001);
  lchownSync(join(root, 'home/user'), 1000, 1000);
  chmodSync(join(root, 'home/user'), 0o750);
  chmodSync(join(root, 'tmp'), 0o1777);
  chmodSync(join(root, 'var/tmp'), 0o1777);
  lchownSync(join(root, 'var/mail'), 0, 8);
  chmodSync(join(root, 'var/mail'), 0o2775);
  chmodSync(join(root, 'root'), 0o700);
  // Sparse: 64 MiB with three small islands of data.
  const fd = openSync(join(root, REAL_ROOTFS.sparse), 'w');
  writeSync(fd, Buffer.from('boot sector'), 0, 11, 0);
  writeSync(fd, Buffer.from('middle'), 0, 6, 32 << 20);
  ftruncateSync(fd, 64 << 20);
  writeSync(fd, Buffer.from('end'), 0, 3, (64 << 20) - 3);
  closeSync(fd);
  file(REAL_ROOTFS.longPath, 'deep\n');
  symlinkSync(`/${REAL_ROOTFS.longPath}`, join(root, 'usr/share/long-link'));
  file(REAL_ROOTFS.nonAscii, 'ünïcödé\n');
  symlinkSync('naïve-café/文件-ŝpecial.txt', join(root, 'usr/share/doc/ünï-link'));
  execFileSync('mkfifo', ['-m', '0600', join(root, REAL_ROOTFS.fifo)]);
  // Fixed mtimes, children before parents (setting them changes nothing above).
  let t = 1_700_000_000;
  const stamp = (rel: string) => {
    const p = join(root, rel);
    const st = lstatSync(p);
    if (st.isDirectory()) for (const name of listSorted(p)) stamp(rel ? `${rel}/${name}` : name);
    t += 7;
    lutimesSync(p, t, t);
  };
  for (const name of listSorted(root)) stamp(name);
}

function listSorted(dir: string): string[] {
  return readdirSync(dir).sort();
}

/** Every regular file under `dir`, as paths relative to it (for "nothing was stored" checks). */
export function filesUnder(dir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir)) {
    const p = join(dir, e);
    if (statSync(p).isDirectory()) out.push(...filesUnder(p).map((f) => join(e, f)));
    else out.push(e);
  }
  return out;
}
