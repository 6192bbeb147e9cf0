/**
 * os-release (freedesktop.org) from a root filesystem, as a directory or a tarball, and the
 * network configuration format an OS uses by default.
 */
import type { Stats } from 'node:fs';
import { lstat, open, readlink } from 'node:fs/promises';
import { join, posix } from 'node:path';
import { scError } from '../errors.js';
import type { NetFormat } from '../manifest.js';
import { scanTar } from './tar.js';
import { openTarball } from './tarball.js';

const CANDIDATES = ['etc/os-release', 'usr/lib/os-release'];
const MAX_OS_RELEASE = 64 * 1024;
const MAX_LINK_HOPS = 16;

/**
 * Parses os-release text: `KEY=value` lines, values optionally in single or double quotes
 * with shell-style backslash escapes; comments and malformed lines are ignored.
 */
export function parseOsRelease(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split(/\r?\n/)) {
    const m = /^\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(line);
    if (!m) continue;
    let v = m[2].trim();
    const q = v[0];
    if ((q === '"' || q === "'") && v.length >= 2 && v.endsWith(q)) {
      v = v.slice(1, -1);
      if (q === '"') v = v.replace(/\\([\\"$`])/g, '$1');
    }
    out[m[1]] = v;
  }
  return out;
}

const NETWORKD = new Set(['fedora', 'centos', 'rhel', 'rocky', 'almalinux', 'arch', 'flatcar', 'coreos', 'fedora-coreos', 'rhcos']);

/**
 * The network configuration format an OS id uses by default: debian → ifupdown, ubuntu →
 * netplan, fedora/centos/rhel/rocky/almalinux/arch/flatcar/coreos → networkd, windows →
 * windows-unattend, anything else → ifupdown.
 */
export function defaultNetFormat(osId: string): NetFormat {
  const id = String(osId ?? '').toLowerCase();
  if (id === 'ubuntu') return 'netplan';
  if (NETWORKD.has(id)) return 'networkd';
  if (id === 'windows') return 'windows-unattend';
  return 'ifupdown';
}

/**
 * Resolves `rel` inside `root` as a chroot would: absolute symlink targets are taken from
 * `root`, `..` stops at `root`. Returns the host path of a regular file, or null.
 */
async function resolveInRoot(root: string, rel: string): Promise<string | null> {
  let todo = rel.split('/').filter((s) => s && s !== '.');
  const done: string[] = [];
  let hops = 0;
  while (todo.length) {
    const part = todo.shift()!;
    if (part === '..') {
      done.pop();
      continue;
    }
    const host = join(root, ...done, part);
    let st: Stats;
    try {
      st = await lstat(host);
    } catch {
      return null;
    }
    if (st.isSymbolicLink()) {
      if (++hops > MAX_LINK_HOPS) return null;
      const target = await readlink(host);
      if (target.startsWith('/')) done.length = 0;
      todo = [...target.split('/').filter((s) => s && s !== '.'), ...todo];
      continue;
    }
    if (todo.length && !st.isDirectory()) return null;
    if (!todo.length && !st.isFile()) return null;
    done.push(part);
  }
  return done.length ? join(root, ...done) : null;
}

async function readSmallFile(path: string): Promise<string> {
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(MAX_OS_RELEASE);
    const { bytesRead } = await fh.read(buf, 0, MAX_OS_RELEASE, 0);
    return buf.subarray(0, bytesRead).toString('utf8');
  } finally {
    await fh.close();
  }
}

async function fromDir(dir: string): Promise<Record<string, string>> {
  try {
    const st = await lstat(dir);
    if (!st.isDirectory()) throw new Error('not a directory');
  } catch (err) {
    throw scError('SC_ERR_BAD_REQUEST', `cannot read directory ${dir}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  for (const c of CANDIDATES) {
    const p = await resolveInRoot(dir, c);
    if (p) return parseOsRelease(await readSmallFile(p));
  }
  return {};
}

async function fromTarball(path: string): Promise<Record<string, string>> {
  const files = new Map<string, Buffer>();
  const wanted = new Set(CANDIDATES);
  let etcLink: string | undefined;
  await scanTar(
    openTarball(path),
    (p) => wanted.has(p),
    (e) => {
      if (e.data) {
        files.set(e.path, e.data);
        // The usual layouts are done as soon as the file /etc/os-release resolves to is read.
        return e.path === 'etc/os-release' || e.path === etcLink;
      }
      if (e.path === 'etc/os-release' && e.type === 'SymbolicLink' && e.linkpath) {
        const t = e.linkpath.startsWith('/') ? posix.normalize(e.linkpath).slice(1) : posix.normalize(posix.join('etc', e.linkpath));
        if (!t.startsWith('..')) {
          etcLink = t;
          wanted.add(t);
          if (files.has(t)) return true;
        }
      }
      return false;
    },
    MAX_OS_RELEASE,
  );
  const data = files.get('etc/os-release') ?? (etcLink ? files.get(etcLink) : undefined) ?? files.get('usr/lib/os-release');
  return data ? parseOsRelease(data.toString('utf8')) : {};
}

/**
 * Reads os-release from a root filesystem: `etc/os-release`, else `usr/lib/os-release`
 * (symlinks resolved inside the tree, as in a chroot). For a tarball (.tar, .tar.gz,
 * .tar.zst) the archive is scanned as a stream and the scan stops once the file is read.
 * Returns {} when neither file exists. Throws SC_ERR_BAD_REQUEST for an unreadable input and
 * SC_ERR_BAD_ARCHIVE for a corrupt tarball.
 */
export async function readOsRelease(input: { dir?: string; tarball?: string }): Promise<Record<string, string>> {
  if (!input || Boolean(input.dir) === Boolean(input.tarball)) {
    throw scError('SC_ERR_BAD_REQUEST', 'readOsRelease needs exactly one of a directory or a tarball');
  }
  return input.dir ? fromDir(input.dir) : fromTarball(input.tarball!);
}
