/**
 * Carry-over of a host's identity across an OS swap: capture the network configuration and the
 * security data (ssh host keys, root's authorized_keys, access-control files) from one OS root,
 * render them in another OS's format, and apply them to that OS's root.
 *
 * Where each format keeps things (paths inside the OS root):
 *
 * | what | ifupdown | netplan | networkd | windows-unattend |
 * |---|---|---|---|---|
 * | network | /etc/network/interfaces, /etc/resolv.conf | /etc/netplan/01-stagecoach.yaml | /etc/systemd/network/10-<nic>.network | /Windows/Panther/unattend.xml |
 * | NIC name pin | /etc/systemd/network/10-stagecoach-<nic>.link | `match` + `set-name` | .link file | (by MAC) |
 * | hostname | /etc/hostname | /etc/hostname | /etc/hostname | ComputerName |
 * | host keys | /etc/ssh/ssh_host_*_key{,.pub} | same | same | /ProgramData/ssh/ssh_host_*_key{,.pub} |
 * | authorized keys | /root/.ssh/authorized_keys | same | same | /ProgramData/ssh/administrators_authorized_keys |
 * | ACL files | their own path | same | same | /ProgramData/stagecoach/acl/<path> (kept, not enforced) |
 *
 * Modes: private host keys and authorized_keys 0600, public keys 0644, netplan YAML 0600.
 */
import { scError } from '../../../shared/errors.js';
import { HEADER, type ParsedInterface } from './common.js';
import { captureIfupdown, conflictingInterfacesFiles, renderIfupdown } from './ifupdown.js';
import { captureNetplan, conflictingNetplanFiles, renderNetplan } from './netplan.js';
import { captureNetworkd, conflictingNetworkFiles, renderNetworkd } from './networkd.js';
import { listInside, readInside, renameInside, writeInside } from './rootfs.js';
import {
  ACL_PATHS,
  type CarryConfig,
  type CarryInterface,
  carryInterfaceSchema,
  type HostKey,
  type NetFormat,
  parseCarryConfig,
  parseNetFormat,
  type RenderedFile,
} from './types.js';
import { captureUnattend, renderUnattend } from './windows.js';

export { fingerprint, generateEd25519 } from './ssh.js';
export type { CarryConfig, CarryInterface, HostKey, NetFormat, RenderedFile } from './types.js';
export { parseCarryConfig, parseNetFormat } from './types.js';

/** A NIC of the machine as the hardware (or the running kernel) reports it. */
export interface Nic {
  name: string;
  mac: string;
}

/** Suffix given to a config file set aside because it would override the carried config. */
export const DISABLED_SUFFIX = '.disabled-by-stagecoach';

interface SecurityPaths {
  sshDir: string;
  authorizedKeys: string;
  aclPrefix: string;
}

/** Where a format's OS keeps ssh host keys, root's authorized keys and the ACL files. */
export function securityPaths(fmt: NetFormat): SecurityPaths {
  return fmt === 'windows-unattend'
    ? { sshDir: '/ProgramData/ssh', authorizedKeys: '/ProgramData/ssh/administrators_authorized_keys', aclPrefix: '/ProgramData/stagecoach/acl' }
    : { sshDir: '/etc/ssh', authorizedKeys: '/root/.ssh/authorized_keys', aclPrefix: '' };
}

const HOST_KEY_FILE = /^ssh_host_(rsa|ecdsa|ed25519|dsa)_key$/;

async function parseNetwork(rootDir: string, fmt: NetFormat): Promise<{ parsed: ParsedInterface[]; hostname: string | null }> {
  switch (fmt) {
    case 'ifupdown':
      return { parsed: await captureIfupdown(rootDir), hostname: null };
    case 'netplan':
      return { parsed: await captureNetplan(rootDir), hostname: null };
    case 'networkd':
      return { parsed: await captureNetworkd(rootDir), hostname: null };
    case 'windows-unattend': {
      const u = await captureUnattend(rootDir);
      return { parsed: u?.interfaces ?? [], hostname: u?.hostname ?? null };
    }
  }
}

/**
 * The static interfaces of the OS at `rootDir` (network config in `netFormat`). `nics` (the
 * machine's NICs) supplies what a format does not record: the MAC of an ifupdown interface
 * without a .link pin, the name of a Windows interface (else `nic0`, `nic1`…). Throws
 * SC_ERR_BAD_CONFIG when there is none, or for an interface whose MAC cannot be told.
 */
export async function captureInterfaces(rootDir: string, netFormat: NetFormat, opts: { nics?: Nic[] } = {}): Promise<CarryInterface[]> {
  const fmt = parseNetFormat(netFormat);
  const { parsed } = await parseNetwork(rootDir, fmt);
  if (parsed.length === 0) throw scError('SC_ERR_BAD_CONFIG', `no static network configuration found in the ${fmt} files`);
  const nics = opts.nics ?? [];
  let anon = 0;
  return parsed.map((p) => {
    const mac = p.mac ?? nics.find((n) => n.name === p.name)?.mac ?? null;
    if (!mac) throw scError('SC_ERR_BAD_CONFIG', `cannot tell the MAC of interface ${p.name}: the ${fmt} config does not say and the machine has no such NIC`);
    const name = p.name ?? nics.find((n) => n.mac === mac)?.name ?? `nic${anon++}`;
    const r = carryInterfaceSchema.safeParse({ name, mac, addresses: p.addresses, gateway: p.gateway, dns: p.dns, searchDomains: p.searchDomains });
    if (!r.success) throw scError('SC_ERR_BAD_CONFIG', `interface ${name}: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
    return r.data;
  });
}

/** The host name of the OS at `rootDir` (/etc/hostname, or the unattend ComputerName). SC_ERR_BAD_CONFIG without one. */
export async function captureHostname(rootDir: string, netFormat: NetFormat): Promise<string> {
  const fmt = parseNetFormat(netFormat);
  const hostname =
    fmt === 'windows-unattend' ? (await parseNetwork(rootDir, fmt)).hostname : (await readInside(rootDir, '/etc/hostname'))?.split('\n')[0].trim() || null;
  if (!hostname) throw scError('SC_ERR_BAD_CONFIG', `no hostname found in the ${fmt} OS`);
  return hostname;
}

/** The ssh host keys of the OS at `rootDir`, by logical path. SC_ERR_BAD_CONFIG for a key without its .pub. */
export async function captureHostKeys(rootDir: string, netFormat: NetFormat): Promise<HostKey[]> {
  const sec = securityPaths(parseNetFormat(netFormat));
  const hostKeys: HostKey[] = [];
  for (const f of await listInside(rootDir, sec.sshDir)) {
    const m = HOST_KEY_FILE.exec(f);
    if (!m) continue;
    const priv = await readInside(rootDir, `${sec.sshDir}/${f}`);
    if (priv === null) continue;
    const pub = await readInside(rootDir, `${sec.sshDir}/${f}.pub`);
    if (pub === null) throw scError('SC_ERR_BAD_CONFIG', `host key ${sec.sshDir}/${f} has no .pub file`);
    hostKeys.push({ path: `/etc/ssh/${f}`, type: m[1] as HostKey['type'], private: priv, public: pub.trim() });
  }
  return hostKeys;
}

/** root's authorized_keys (Windows: administrators_authorized_keys) of the OS at `rootDir`; '' when absent. */
export async function readAuthorizedKeys(rootDir: string, netFormat: NetFormat): Promise<string> {
  return (await readInside(rootDir, securityPaths(parseNetFormat(netFormat)).authorizedKeys)) ?? '';
}

/**
 * Reads the carried configuration from the OS at `rootDir`, whose network config is in
 * `netFormat` (see captureInterfaces for `nics`). Throws SC_ERR_BAD_CONFIG when there is no
 * static interface, no hostname, an interface whose MAC cannot be told, a host key without its
 * .pub, or a value the schema refuses.
 */
export async function capture(rootDir: string, netFormat: NetFormat, opts: { nics?: Nic[] } = {}): Promise<CarryConfig> {
  const fmt = parseNetFormat(netFormat);
  const interfaces = await captureInterfaces(rootDir, fmt, opts);
  const hostname = await captureHostname(rootDir, fmt);
  const hostKeys = await captureHostKeys(rootDir, fmt);
  const sec = securityPaths(fmt);
  const acl: CarryConfig['acl'] = [];
  for (const p of ACL_PATHS) {
    const content = await readInside(rootDir, `${sec.aclPrefix}${p}`);
    if (content !== null) acl.push({ path: p, content });
  }
  const authorizedKeys = await readAuthorizedKeys(rootDir, fmt);
  return parseCarryConfig({ hostname, interfaces, hostKeys, authorizedKeys, acl });
}

/**
 * Every file that carries `cfg` into an OS using `netFormat`: network config, hostname, host
 * keys, authorized keys and ACL files, with absolute in-OS paths and modes. Pure. Throws
 * SC_ERR_BAD_CONFIG for an invalid config (or a hostname Windows cannot take).
 */
export function render(cfg: CarryConfig, netFormat: NetFormat): RenderedFile[] {
  const fmt = parseNetFormat(netFormat);
  const c = parseCarryConfig(cfg);
  const files: RenderedFile[] = [];
  switch (fmt) {
    case 'ifupdown':
      files.push(...renderIfupdown(c));
      break;
    case 'netplan':
      files.push(...renderNetplan(c));
      break;
    case 'networkd':
      files.push(...renderNetworkd(c));
      break;
    case 'windows-unattend':
      files.push(...renderUnattend(c));
      break;
  }
  if (fmt !== 'windows-unattend') files.push({ path: '/etc/hostname', content: `${c.hostname}\n`, mode: 0o644 });
  const sec = securityPaths(fmt);
  for (const k of c.hostKeys) {
    const base = k.path.slice('/etc/ssh/'.length);
    files.push({ path: `${sec.sshDir}/${base}`, content: k.private, mode: 0o600 });
    files.push({ path: `${sec.sshDir}/${base}.pub`, content: `${k.public}\n`, mode: 0o644 });
  }
  if (c.authorizedKeys) files.push({ path: sec.authorizedKeys, content: c.authorizedKeys, mode: 0o600 });
  for (const a of c.acl) files.push({ path: `${sec.aclPrefix}${a.path}`, content: a.content, mode: 0o644 });
  return files;
}

/** What apply changed: files written, files already right, and conflicting files set aside. */
export interface ApplyResult {
  written: string[];
  unchanged: string[];
  disabled: string[];
}

/**
 * Writes `cfg` into the OS at `rootDir` in `netFormat` (idempotent: a second run writes
 * nothing). Network config files of that OS that would override the carried interfaces are
 * renamed with DISABLED_SUFFIX. Writes never leave `rootDir`, whatever its symlinks say.
 */
export async function apply(rootDir: string, cfg: CarryConfig, netFormat: NetFormat): Promise<ApplyResult> {
  const fmt = parseNetFormat(netFormat);
  const files = render(cfg, fmt);
  const c = parseCarryConfig(cfg);
  const conflicts =
    fmt === 'netplan'
      ? await conflictingNetplanFiles(rootDir, c)
      : fmt === 'networkd'
        ? await conflictingNetworkFiles(rootDir, c)
        : fmt === 'ifupdown'
          ? await conflictingInterfacesFiles(rootDir, c)
          : [];
  const res: ApplyResult = { written: [], unchanged: [], disabled: [] };
  for (const p of conflicts) if (await renameInside(rootDir, p, `${p}${DISABLED_SUFFIX}`)) res.disabled.push(p);
  for (const f of files) {
    if (await writeInside(rootDir, f.path, f.content, f.mode)) res.written.push(f.path);
    else res.unchanged.push(f.path);
  }
  return res;
}

/** The marker line every rendered file starts with (tests and operators grep for it). */
export const RENDER_HEADER = HEADER;
