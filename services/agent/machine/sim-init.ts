/**
 * Creation of a sim machine (`stagecoach machine init`): OS A on disk1p1, disk2 empty, first boot.
 */
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { isIPv4 } from 'node:net';
import { join } from 'node:path';
import { scError } from '../../../shared/errors.js';
import { NAME_RE } from '../../../shared/names.js';
import { generateEd25519 } from '../carry/index.js';
import { writeInside } from '../carry/rootfs.js';
import { type CarryConfig, isCidr, normalizeMac, parseCarryConfig } from '../carry/types.js';
import { nativeFiles, osReleaseText, parseFlavour } from './flavours.js';
import { writeMarker } from './os.js';
import { type SimBootResult, simBoot } from './sim-firmware.js';
import { logAction, paths, type SimState, simStateSchema, writeJsonAtomic } from './sim-state.js';

/** Options of `initSimMachine` (`stagecoach machine init`). */
export interface SimInitOptions {
  hostId: string;
  /** OS A's address with prefix, e.g. `10.0.0.5/24`. */
  ip: string;
  gateway: string;
  /** `<id>-<version>`; default `debian-11`. */
  os?: string;
  /** Default: derived from the host id (52:54:00:…). */
  mac?: string;
  /** Default `ens3`. */
  nic?: string;
  /** Default: the gateway. */
  dns?: string[];
  search?: string[];
  /** Default: the host id. */
  hostname?: string;
  /** authorized_keys content; default: one generated operator key. */
  authorizedKeys?: string;
  /** Nominal disk sizes in MiB (default 100 GiB each). */
  disk1SizeMiB?: number;
  disk2SizeMiB?: number;
}

/**
 * Creates a sim machine in `dir` (created if missing; it must be empty): OS A on disk1p1 with
 * os-release, native network config, an ed25519 host key, authorized_keys, hosts.allow/deny,
 * resolv.conf and the install marker; disk2 empty and unpartitioned. Then it boots A.
 * Throws SC_ERR_FILE_EXISTS for a non-empty dir, SC_ERR_BAD_CONFIG for bad options.
 */
export async function initSimMachine(dir: string, o: SimInitOptions): Promise<SimBootResult> {
  if (!NAME_RE.test(o.hostId ?? '')) throw scError('SC_ERR_BAD_CONFIG', `bad host id ${JSON.stringify(String(o.hostId).slice(0, 80))}`);
  if (!isCidr(o.ip ?? '') || !isIPv4(o.ip.split('/')[0])) throw scError('SC_ERR_BAD_CONFIG', `--ip must be an IPv4 address with a prefix, e.g. 10.0.0.5/24`);
  if (!isIPv4(o.gateway ?? '')) throw scError('SC_ERR_BAD_CONFIG', '--gateway must be an IPv4 address');
  const flavour = parseFlavour(o.os ?? 'debian-11');
  const mac = o.mac ? normalizeMac(o.mac) : `52:54:00:${createHash('sha256').update(o.hostId).digest('hex').slice(0, 6).match(/../g)!.join(':')}`;
  if (!mac) throw scError('SC_ERR_BAD_CONFIG', `bad MAC ${o.mac}`);
  const nic = o.nic ?? 'ens3';
  const hostKey = generateEd25519(`root@${o.hostname ?? o.hostId}`);
  const operator = generateEd25519('operator@stagecoach');
  const [addr, prefix] = o.ip.split('/');
  const net = addr
    .split('.')
    .map(Number)
    .reduce((a, b) => (a << 8) | b, 0);
  const mask = Number(prefix) === 0 ? 0 : (0xffffffff << (32 - Number(prefix))) >>> 0;
  const netAddr = [24, 16, 8, 0].map((sh) => ((net & mask) >>> sh) & 255).join('.');
  const cfg: CarryConfig = parseCarryConfig({
    hostname: o.hostname ?? o.hostId,
    interfaces: [{ name: nic, mac, addresses: [o.ip], gateway: o.gateway, dns: o.dns ?? [o.gateway], searchDomains: o.search ?? [] }],
    hostKeys: [{ path: '/etc/ssh/ssh_host_ed25519_key', type: 'ed25519', private: hostKey.private, public: hostKey.public }],
    authorizedKeys: o.authorizedKeys ?? `${operator.public}\n`,
    acl: [
      { path: '/etc/hosts.allow', content: `# /etc/hosts.allow: sshd only from the management network\nsshd: ${netAddr}/${prefix} 127.0.0.1\n` },
      { path: '/etc/hosts.deny', content: '# /etc/hosts.deny\nsshd: ALL\n' },
    ],
  });

  await fsp.mkdir(dir, { recursive: true });
  if ((await fsp.readdir(dir)).length) throw scError('SC_ERR_FILE_EXISTS', `${dir} is not empty`);
  const root = paths(dir).part('disk1', 'p1');
  await fsp.mkdir(join(dir, 'disks', 'disk2'), { recursive: true });
  await fsp.mkdir(root, { recursive: true });
  for (const d of ['bin', 'usr/bin', 'usr/lib', 'var/lib', 'var/log', 'tmp', 'root']) await fsp.mkdir(join(root, d), { recursive: true });
  await fsp.chmod(join(root, 'root'), 0o700);
  await fsp.chmod(join(root, 'tmp'), 0o1777);
  await writeInside(root, '/etc/os-release', osReleaseText(flavour), 0o644);
  await writeInside(root, '/etc/hosts', `127.0.0.1\tlocalhost\n${addr}\t${cfg.hostname}\n`, 0o644);
  for (const f of nativeFiles(flavour, cfg)) await writeInside(root, f.path, f.content, f.mode);
  await writeMarker(root, { id: flavour.id, version: flavour.version, netFormat: flavour.netFormat }, new Date().toISOString());

  const state: SimState = {
    schema: 1,
    hostId: o.hostId,
    nics: [{ name: nic, mac }],
    boot: { default: 'disk1p1', once: null, rescue: null },
    disks: {
      disk1: { sizeMiB: o.disk1SizeMiB ?? 102400, partitions: [{ name: 'p1', role: 'os-root', filesystem: 'ext4' }] },
      disk2: { sizeMiB: o.disk2SizeMiB ?? 102400, partitions: [] },
    },
    faults: { failBoot: {} },
    reboots: 0,
    boots: 0,
    pendingReboot: false,
    bootLog: [],
  };
  await writeJsonAtomic(paths(dir).state, simStateSchema.parse(state));
  await logAction(dir, 'init', { hostId: o.hostId, os: `${flavour.id}-${flavour.version}`, ip: o.ip });
  return simBoot(dir, { force: true });
}
