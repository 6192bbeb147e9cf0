/**
 * The carried configuration: what an OS swap keeps from the running OS (network identity and
 * security data) and writes into the next OS in that OS's own format. The schema is strict:
 * every value ends up inside a config file of another OS, so anything that could break out of
 * its line, quote or element (newlines, quotes, markup) is refused here, once.
 */
import { isIP, isIPv4, isIPv6 } from 'node:net';
import { z } from 'zod';
import { scError } from '../../../shared/errors.js';
import { NET_FORMATS, type NetFormat } from '../../../shared/manifest.js';

export { NET_FORMATS, type NetFormat };

/** Linux interface names (IFNAMSIZ 15), no spaces or shell/INI metacharacters. */
export const NIC_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$/;
/** MAC addresses as carried: lowercase, colon-separated. */
export const MAC_RE = /^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$/;
const LABEL = '[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?';
/** RFC 1123 host names (one or more labels). */
export const HOSTNAME_RE = new RegExp(`^(?=.{1,253}$)${LABEL}(?:\\.${LABEL})*$`);
const DOMAIN_RE = new RegExp(`^(?=.{1,253}$)(?:${LABEL}|_[A-Za-z0-9-]{1,62})(?:\\.${LABEL})*\\.?$`);
/** Host key types OpenSSH writes as `/etc/ssh/ssh_host_<type>_key`. */
export const HOST_KEY_TYPES = ['rsa', 'ecdsa', 'ed25519', 'dsa'] as const;
/** One of HOST_KEY_TYPES. */
export type HostKeyType = (typeof HOST_KEY_TYPES)[number];
const HOST_KEY_PATH_RE = /^\/etc\/ssh\/ssh_host_(rsa|ecdsa|ed25519|dsa)_key$/;
/**
 * The access-control files that are carried, by their logical (Linux) path. Only these are
 * captured, so a carry can never be used to write an arbitrary file into the next OS.
 */
export const ACL_PATHS = [
  '/etc/hosts.allow',
  '/etc/hosts.deny',
  '/etc/security/access.conf',
  '/etc/nftables.conf',
  '/etc/iptables/rules.v4',
  '/etc/iptables/rules.v6',
] as const;

const MAX_FILE = 1 << 20;

/** True for `a.b.c.d/n` (n ≤ 32) or an IPv6 address with a prefix (n ≤ 128). */
export function isCidr(s: string): boolean {
  const m = /^([^/\s]+)\/(\d{1,3})$/.exec(s);
  if (!m) return false;
  const n = Number(m[2]);
  if (isIPv4(m[1])) return n <= 32 && String(n) === m[2];
  if (isIPv6(m[1])) return n <= 128 && String(n) === m[2];
  return false;
}

const ip = z.string().refine((s) => isIP(s) !== 0, 'not an IP address');

/** zod schema of one carried interface. */
export const carryInterfaceSchema = z.strictObject({
  name: z.string().regex(NIC_NAME_RE, 'bad interface name'),
  mac: z.string().regex(MAC_RE, 'MAC must be lowercase aa:bb:cc:dd:ee:ff'),
  addresses: z.array(z.string().refine(isCidr, 'address must be IP/prefix')).min(1).max(64),
  gateway: z
    .string()
    .refine((s) => isIPv4(s), 'gateway must be an IPv4 address')
    .nullable(),
  dns: z.array(ip).max(16),
  searchDomains: z.array(z.string().regex(DOMAIN_RE, 'bad search domain')).max(16).default([]),
});

/** zod schema of one host key (type must match the path). */
export const hostKeySchema = z
  .strictObject({
    path: z.string().regex(HOST_KEY_PATH_RE, 'host key path must be /etc/ssh/ssh_host_<type>_key'),
    type: z.enum(HOST_KEY_TYPES),
    private: z
      .string()
      .max(64 * 1024)
      .regex(/^-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\n[\s\S]+\n-----END [A-Z0-9 ]*PRIVATE KEY-----\n?$/, 'not a PEM private key'),
    public: z
      .string()
      .max(16 * 1024)
      .regex(/^(?:ssh-[a-z0-9-]+|ecdsa-sha2-nistp\d+) [A-Za-z0-9+/]+={0,3}(?: [^\n\r]*)?$/, 'not an OpenSSH public key line'),
  })
  .refine((k) => k.path === `/etc/ssh/ssh_host_${k.type}_key`, 'host key type does not match its path');

/** zod schema of a CarryConfig (strict: unknown keys are refused). */
export const carryConfigSchema = z.strictObject({
  hostname: z.string().regex(HOSTNAME_RE, 'bad hostname'),
  interfaces: z.array(carryInterfaceSchema).min(1).max(16),
  hostKeys: z.array(hostKeySchema).max(16),
  authorizedKeys: z.string().max(MAX_FILE),
  acl: z
    .array(
      z.strictObject({
        path: z.enum(ACL_PATHS),
        content: z.string().max(MAX_FILE),
      }),
    )
    .max(ACL_PATHS.length),
});

/** One network interface to carry. `gateway` is the IPv4 default route through it, or null. */
export type CarryInterface = z.infer<typeof carryInterfaceSchema>;
/** One ssh host key: logical path `/etc/ssh/ssh_host_<type>_key`, PEM private key, one-line public key. */
export type HostKey = z.infer<typeof hostKeySchema>;
/**
 * What moves from one OS to the next. Paths are logical Linux paths; each format maps them to
 * where the target OS reads them (Windows: `ProgramData/ssh/`).
 */
export type CarryConfig = z.infer<typeof carryConfigSchema>;

/** One file of a rendered configuration: absolute path inside the target OS, content, mode. */
export interface RenderedFile {
  path: string;
  content: string;
  mode: number;
}

/**
 * Validates untrusted input as a CarryConfig and normalises it (hostKeys and acl sorted by
 * path, IPv4 addresses before IPv6 ones, searchDomains defaulted to []). Throws SC_ERR_BAD_CONFIG listing the problems.
 */
export function parseCarryConfig(input: unknown): CarryConfig {
  const r = carryConfigSchema.safeParse(input);
  if (!r.success) {
    throw scError('SC_ERR_BAD_CONFIG', `invalid carried configuration: ${r.error.issues
      .slice(0, 10)
      .map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`)
      .join('; ')}`);
  }
  const c = r.data;
  const names = new Set<string>();
  for (const i of c.interfaces) {
    if (names.has(i.name)) throw scError('SC_ERR_BAD_CONFIG', `interface ${i.name} appears twice`);
    names.add(i.name);
  }
  const byPath = <T extends { path: string }>(a: T, b: T) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0);
  const keyPaths = new Set(c.hostKeys.map((k) => k.path));
  if (keyPaths.size !== c.hostKeys.length) throw scError('SC_ERR_BAD_CONFIG', 'a host key path appears twice');
  const aclPaths = new Set(c.acl.map((a) => a.path));
  if (aclPaths.size !== c.acl.length) throw scError('SC_ERR_BAD_CONFIG', 'an ACL path appears twice');
  const v4first = (a: string[]) => [...a.filter((x) => isIPv4(x.split('/')[0])), ...a.filter((x) => !isIPv4(x.split('/')[0]))];
  return {
    ...c,
    interfaces: c.interfaces.map((i) => ({ ...i, addresses: v4first(i.addresses) })),
    hostKeys: [...c.hostKeys].sort(byPath),
    acl: [...c.acl].sort(byPath),
  };
}

/** Returns `f` as a NetFormat or throws SC_ERR_BAD_CONFIG. */
export function parseNetFormat(f: unknown): NetFormat {
  if (typeof f !== 'string' || !(NET_FORMATS as readonly string[]).includes(f)) {
    throw scError('SC_ERR_BAD_CONFIG', `unknown network config format ${JSON.stringify(String(f).slice(0, 40))}; expected one of ${NET_FORMATS.join(', ')}`);
  }
  return f as NetFormat;
}

/** Normalises a MAC written as AA-BB-…, aa:bb:…, or aabb.ccdd.eeff to lowercase colon form; null if it is not one. */
export function normalizeMac(s: string): string | null {
  const hex = s.trim().toLowerCase().replace(/[-:.]/g, '');
  if (!/^[0-9a-f]{12}$/.test(hex)) return null;
  return hex.match(/../g)!.join(':');
}

/** Prefix length of a dotted IPv4 netmask (255.255.255.0 → 24); null when it is not contiguous. */
export function netmaskToPrefix(mask: string): number | null {
  if (/^\d{1,3}$/.test(mask)) {
    const n = Number(mask);
    return n <= 32 ? n : null;
  }
  if (!isIPv4(mask)) return null;
  const bits = mask
    .split('.')
    .map((o) => Number(o).toString(2).padStart(8, '0'))
    .join('');
  return /^1*0*$/.test(bits) ? bits.indexOf('0') === -1 ? 32 : bits.indexOf('0') : null;
}
