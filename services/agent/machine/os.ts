/**
 * What both drivers read from an OS root: its os-release, the install marker the driver
 * writes (`/etc/stagecoach/installed.json`), and the identity facts `inspect` reports (IP,
 * host key fingerprints, authorized keys), each read from the OS's own files in its own format.
 */
import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { defaultNetFormat, parseOsRelease } from '../../../shared/bundle/index.js';
import { toScError } from '../../../shared/errors.js';
import { NET_FORMATS, type NetFormat } from '../../../shared/manifest.js';
import { captureHostKeys, captureHostname, captureInterfaces, type Nic, readAuthorizedKeys } from '../carry/index.js';
import { fingerprint } from '../carry/ssh.js';
import { readInside, writeInside } from '../carry/rootfs.js';
import type { InstalledOs, InstallMark } from './driver.js';

/** Where the install marker lives inside an OS root. */
export const MARKER_PATH = '/etc/stagecoach/installed.json';

/** os-release of the OS at `root` (etc/os-release, else usr/lib/os-release); null without one that has an ID. */
export async function readOsReleaseAt(root: string): Promise<Record<string, string> | null> {
  for (const p of ['/etc/os-release', '/usr/lib/os-release']) {
    const text = await readInside(root, p).catch(() => null);
    if (text === null) continue;
    const r = parseOsRelease(text);
    return r.ID ? r : null;
  }
  return null;
}

/** Writes the install marker (idempotent: same content, no write). */
export async function writeMarker(root: string, mark: InstallMark, at: string): Promise<boolean> {
  const prev = await readMarker(root);
  if (prev && prev.id === mark.id && prev.version === mark.version && prev.netFormat === mark.netFormat) return false;
  await writeInside(root, MARKER_PATH, `${JSON.stringify({ id: mark.id, version: mark.version, netFormat: mark.netFormat, installedAt: at }, null, 2)}\n`, 0o644);
  return true;
}

async function readMarker(root: string): Promise<InstallMark | null> {
  const text = await readInside(root, MARKER_PATH).catch(() => null);
  if (!text) return null;
  try {
    const m = JSON.parse(text) as Partial<InstallMark>;
    if (typeof m.id === 'string' && typeof m.version === 'string' && (NET_FORMATS as readonly string[]).includes(m.netFormat as string)) {
      return { id: m.id, version: m.version, netFormat: m.netFormat as NetFormat };
    }
  } catch {
    // a torn or foreign marker is no marker
  }
  return null;
}

/**
 * The OS at `root`: id and version from os-release; netFormat from the marker, else the OS
 * family's default; `complete` when the marker names this same OS.
 */
export async function installedOsAt(root: string): Promise<InstalledOs | null> {
  const rel = await readOsReleaseAt(root);
  if (!rel) return null;
  const mark = await readMarker(root);
  const id = rel.ID;
  const version = rel.VERSION_ID ?? '';
  const complete = mark !== null && mark.id === id && mark.version === version;
  return { id, version, netFormat: complete ? mark.netFormat : defaultNetFormat(id), complete };
}

/** Identity facts of an OS root for `inspect`; every field degrades to null/empty instead of throwing. */
export interface RootIdentity {
  hostname: string | null;
  ip: string | null;
  addresses: string[];
  gateway: string | null;
  mac: string | null;
  hostKeyFingerprint: string | null;
  hostKeyFingerprints: Record<string, string>;
  authorizedKeys: string[];
}

/** Reads the identity of the OS at `root` (network config in `fmt`), as that OS would see it. */
export async function identityAt(root: string, fmt: NetFormat, nics: Nic[]): Promise<RootIdentity & { errors: string[] }> {
  const errors: string[] = [];
  const attempt = async <T>(what: string, fn: () => Promise<T>, fallback: T): Promise<T> => {
    try {
      return await fn();
    } catch (err) {
      errors.push(`${what}: ${toScError(err).message}`);
      return fallback;
    }
  };
  const ifaces = await attempt('network', () => captureInterfaces(root, fmt, { nics }), []);
  const primary = ifaces.find((i) => i.gateway) ?? ifaces[0];
  const keys = await attempt('host keys', () => captureHostKeys(root, fmt), []);
  const fps: Record<string, string> = {};
  for (const k of keys) {
    try {
      fps[k.type] = fingerprint(k.public);
    } catch {
      errors.push(`host key ${k.type}: unreadable public key`);
    }
  }
  const ak = await attempt('authorized keys', () => readAuthorizedKeys(root, fmt), '');
  return {
    hostname: await attempt('hostname', () => captureHostname(root, fmt), null),
    ip: primary?.addresses[0]?.split('/')[0] ?? null,
    addresses: primary?.addresses ?? [],
    gateway: primary?.gateway ?? null,
    mac: primary?.mac ?? null,
    hostKeyFingerprint: fps.ed25519 ?? Object.values(fps)[0] ?? null,
    hostKeyFingerprints: fps,
    authorizedKeys: ak
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l && !l.startsWith('#')),
    errors,
  };
}

/**
 * The kernel and initramfs of the OS at `root`, as paths inside it: Debian's `/vmlinuz` and
 * `/initrd.img` links when present, else the newest `/boot/vmlinuz-<version>` with its
 * `initrd.img-<version>` or `initramfs-<version>.img`; null when there is no kernel.
 */
export async function kernelAt(root: string): Promise<{ kernel: string; initrd: string } | null> {
  const has = async (p: string) => !!(await fsp.stat(join(root, p)).catch(() => null));
  if ((await has('vmlinuz')) && (await has('initrd.img'))) return { kernel: '/vmlinuz', initrd: '/initrd.img' };
  const names = await fsp.readdir(join(root, 'boot')).catch(() => [] as string[]);
  const versions = names.filter((n) => n.startsWith('vmlinuz-')).map((n) => n.slice(8)).sort(compareVersions).reverse();
  for (const v of versions) {
    for (const i of [`initrd.img-${v}`, `initramfs-${v}.img`]) if (names.includes(i)) return { kernel: `/boot/vmlinuz-${v}`, initrd: `/boot/${i}` };
  }
  return null;
}

function compareVersions(a: string, b: string): number {
  return a.localeCompare(b, 'en', { numeric: true });
}
