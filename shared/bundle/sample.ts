/**
 * A small, deterministic sample root filesystem for demos, tests and benchmarks. It has what
 * the codec must carry faithfully: os-release behind a relative symlink, absolute
 * root-relative symlinks (alternatives), a setuid binary, a setgid group-writable directory,
 * a sticky /tmp, a private /root, a hardlink, empty directories, and seeded pseudo-random
 * filler (incompressible, so bundle sizes are realistic).
 */
import { createCipheriv, createHash } from 'node:crypto';
import { chmod, chown, link, lutimes, mkdir, open, readdir, symlink, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { scError } from '../errors.js';
import type { NetFormat } from '../manifest.js';

/** What the sample OS claims to be, and how much filler it carries. */
export interface SampleRootfsOptions {
  /** os-release ID, e.g. `debian`. */
  id: string;
  /** os-release NAME, e.g. `Debian GNU/Linux`. */
  name: string;
  /** os-release VERSION_ID, e.g. `12`. */
  version: string;
  /** Which network configuration layout to create. */
  netFormat: NetFormat;
  /** Filler size in MiB (0 for none); the tree is this size plus a few KiB. */
  sizeMiB: number;
  /** PRNG seed for the filler; defaults to `id@version`. */
  seed?: string;
}

/** Every file and directory gets this mtime, so that two trees built alike are identical. */
const SAMPLE_MTIME = new Date('2024-01-01T00:00:00Z');
const MiB = 1 << 20;

/** A deterministic keystream (AES-256-CTR over zeros) keyed by `seed` and `label`. */
function keystream(seed: string, label: string) {
  const key = createHash('sha256').update(`stagecoach-sample\0${seed}`).digest();
  const iv = createHash('sha256').update(label).digest().subarray(0, 16);
  const c = createCipheriv('aes-256-ctr', key, iv);
  return (n: number): Buffer => c.update(Buffer.alloc(n));
}

async function file(root: string, rel: string, content: string | Buffer, mode = 0o644): Promise<void> {
  const p = join(root, rel);
  await writeFile(p, content, { mode });
  await chmod(p, mode);
}

async function mkdirMode(root: string, rel: string, mode = 0o755): Promise<void> {
  const p = join(root, rel);
  await mkdir(p, { recursive: true });
  await chmod(p, mode);
}

function netConfig(f: NetFormat): { dirs: string[]; files: Record<string, string> } {
  switch (f) {
    case 'netplan':
      return { dirs: ['etc/netplan'], files: { 'etc/netplan/01-loopback.yaml': 'network:\n  version: 2\n' } };
    case 'networkd':
      return { dirs: ['etc/systemd/network'], files: {} };
    case 'windows-unattend':
      return { dirs: ['Windows/Panther'], files: {} };
    default:
      return { dirs: ['etc/network', 'etc/network/interfaces.d'], files: { 'etc/network/interfaces': 'auto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n' } };
  }
}

async function setTimes(root: string, rel: string): Promise<void> {
  const entries = await readdir(rel ? join(root, rel) : root, { withFileTypes: true });
  for (const e of entries) {
    const r = rel ? `${rel}/${e.name}` : e.name;
    if (e.isDirectory()) await setTimes(root, r);
    else if (e.isSymbolicLink()) await lutimes(join(root, r), SAMPLE_MTIME, SAMPLE_MTIME);
    else await utimes(join(root, r), SAMPLE_MTIME, SAMPLE_MTIME);
  }
  await utimes(rel ? join(root, rel) : root, SAMPLE_MTIME, SAMPLE_MTIME);
}

/**
 * Creates the sample tree under `dir` (created if missing; existing files are overwritten).
 * Filler files under usr/lib/sample/ add up to exactly `sizeMiB` MiB. Owners other than root
 * (home/admin, var/mail) are set only when running as root. Returns the filler byte count and
 * the number of filler files. Throws SC_ERR_BAD_REQUEST for bad options.
 */
export async function makeSampleRootfs(dir: string, opts: SampleRootfsOptions): Promise<{ fillerBytes: number; fillerFiles: number }> {
  const { id, name, version, netFormat } = opts;
  if (!/^[a-z0-9][a-z0-9._-]{0,63}$/.test(id) || !version || !name || !(opts.sizeMiB >= 0)) {
    throw scError('SC_ERR_BAD_REQUEST', 'makeSampleRootfs: bad id, name, version or sizeMiB');
  }
  const root = dir;
  for (const d of ['bin', 'etc', 'etc/alternatives', 'home', 'usr', 'usr/bin', 'usr/lib', 'usr/lib/sample', 'var', 'var/log', 'var/lib']) {
    await mkdirMode(root, d);
  }
  await mkdirMode(root, 'tmp', 0o1777);
  await mkdirMode(root, 'root', 0o700);
  await mkdirMode(root, 'home/admin', 0o750);
  await mkdirMode(root, 'var/mail', 0o2775);
  const net = netConfig(netFormat);
  for (const d of net.dirs) await mkdirMode(root, d);
  for (const [p, c] of Object.entries(net.files)) await file(root, p, c);

  const q = (s: string) => `"${s.replace(/(["\\$`])/g, '\\$1')}"`;
  await file(
    root,
    'usr/lib/os-release',
    `PRETTY_NAME=${q(`${name} ${version}`)}\nNAME=${q(name)}\nVERSION_ID=${q(version)}\nVERSION=${q(version)}\nID=${id}\nHOME_URL="https://example.invalid/${id}"\n`,
  );
  await symlink('../usr/lib/os-release', join(root, 'etc/os-release'));
  await file(root, 'etc/hostname', 'localhost\n');
  await file(root, 'etc/hosts', '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n');
  await file(root, 'etc/passwd', 'root:x:0:0:root:/root:/bin/sh\nmail:x:8:8:mail:/var/mail:/usr/sbin/nologin\nadmin:x:1000:1000:admin:/home/admin:/bin/sh\n');
  await file(root, 'etc/group', 'root:x:0:\nmail:x:8:\nshadow:x:42:\nadmin:x:1000:\n');
  await file(root, 'etc/shadow', 'root:*:19000:0:99999:7:::\nadmin:!:19000:0:99999:7:::\n', 0o640);
  await file(root, 'etc/fstab', '# <file system> <mount point> <type> <options> <dump> <pass>\nLABEL=root / ext4 errors=remount-ro 0 1\n');
  for (const b of ['sh', 'ls', 'cat', 'mount']) await file(root, `bin/${b}`, `#!/bin/sh\n# placeholder for ${b} (${id} ${version})\n`, 0o755);
  for (const b of ['env', 'mawk', 'gzip']) await file(root, `usr/bin/${b}`, `#!/bin/sh\n# placeholder for ${b}\n`, 0o755);
  await file(root, 'usr/bin/passwd', '#!/bin/sh\n# placeholder for passwd (setuid root)\n', 0o4755);
  await link(join(root, 'usr/bin/gzip'), join(root, 'usr/bin/gunzip'));
  // Debian-style alternatives: absolute targets, meaningful only inside the installed root.
  await symlink('/usr/bin/mawk', join(root, 'etc/alternatives/awk'));
  await symlink('/etc/alternatives/awk', join(root, 'usr/bin/awk'));
  await symlink('mawk', join(root, 'usr/bin/nawk'));
  await file(root, 'usr/lib/libc.so.6', `placeholder libc for ${id} ${version}\n`);

  let remaining = Math.round(opts.sizeMiB * MiB);
  const fillerBytes = remaining;
  const sizes = keystream(opts.seed ?? `${id}@${version}`, 'sizes');
  let n = 0;
  while (remaining > 0) {
    const size = Math.min(remaining, 64 * 1024 + (sizes(4).readUInt32BE(0) % (4 * MiB)));
    const rel = `usr/lib/sample/lib${String(n).padStart(4, '0')}.so`;
    const data = keystream(opts.seed ?? `${id}@${version}`, rel);
    const fh = await open(join(root, rel), 'w', 0o644);
    try {
      for (let left = size; left > 0; left -= MiB) await fh.write(data(Math.min(left, MiB)));
    } finally {
      await fh.close();
    }
    remaining -= size;
    n++;
  }

  if (process.getuid?.() === 0) {
    await chown(join(root, 'home/admin'), 1000, 1000);
    await chown(join(root, 'var/mail'), 0, 8);
    await chmod(join(root, 'var/mail'), 0o2775); // chown may clear setgid
    await chown(join(root, 'etc/shadow'), 0, 42);
  }
  await setTimes(root, '');
  return { fillerBytes, fillerFiles: n };
}
