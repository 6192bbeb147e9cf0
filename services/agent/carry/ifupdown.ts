/**
 * Debian ifupdown: /etc/network/interfaces (and what it `source`s). Static `inet`/`inet6`
 * stanzas are read and written; `address` with a prefix or with `netmask`, `gateway`, and the
 * resolvconf options `dns-nameservers`/`dns-search`. DHCP and loopback stanzas carry nothing.
 * Written alongside: /etc/resolv.conf (static), and a systemd .link file per NIC that pins its
 * name to its MAC (Debian's udev honours it).
 */
import { isIPv4, isIPv6 } from 'node:net';
import { HEADER, linkFilePath, type ParsedInterface, parseResolvConf, readLinkPins, renderLinkFile, renderResolvConf, union } from './common.js';
import { listInside, readInside } from './rootfs.js';
import { type CarryConfig, netmaskToPrefix, normalizeMac, type RenderedFile } from './types.js';

/** Where ifupdown reads its configuration. */
export const IFUPDOWN_PATH = '/etc/network/interfaces';

/** One `iface` stanza: name, family (inet, inet6), method (static, dhcp, …) and its options. */
export interface IfaceStanza {
  name: string;
  family: string;
  method: string;
  options: [string, string][];
}

const STANZA = /^(iface|mapping|auto|allow-[a-z-]+|source|source-directory|no-auto-down|no-scripts|rename)\b/;

/** Parses interfaces(5) text into `auto` names, `iface` stanzas, and `source` directives. */
export function parseInterfacesText(text: string): { auto: string[]; ifaces: IfaceStanza[]; sources: string[]; sourceDirs: string[] } {
  const auto: string[] = [];
  const ifaces: IfaceStanza[] = [];
  const sources: string[] = [];
  const sourceDirs: string[] = [];
  let cur: IfaceStanza | null = null;
  for (const raw of text.replace(/\\\r?\n/g, ' ').split(/\r?\n/)) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const words = line.split(/\s+/);
    if (STANZA.test(line)) {
      cur = null;
      const kw = words[0];
      if (kw === 'iface' && words.length >= 4) {
        cur = { name: words[1], family: words[2], method: words[3], options: [] };
        ifaces.push(cur);
      } else if (kw === 'auto' || kw.startsWith('allow-')) auto.push(...words.slice(1));
      else if (kw === 'source') sources.push(...words.slice(1));
      else if (kw === 'source-directory') sourceDirs.push(...words.slice(1));
      continue;
    }
    if (cur) cur.options.push([words[0], words.slice(1).join(' ')]);
  }
  return { auto, ifaces, sources, sourceDirs };
}

function globToRe(glob: string): RegExp {
  return new RegExp(`^${glob.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '[^/]*').replace(/\?/g, '[^/]')}$`);
}

/** Reads /etc/network/interfaces and everything it sources (inside `root`), in ifup's order. */
export async function readInterfaces(root: string): Promise<IfaceStanza[]> {
  const out: IfaceStanza[] = [];
  const seen = new Set<string>();
  const visit = async (path: string, depth: number): Promise<void> => {
    if (depth > 8 || seen.has(path)) return;
    seen.add(path);
    const text = await readInside(root, path);
    if (text === null) return;
    const p = parseInterfacesText(text);
    out.push(...p.ifaces);
    for (const src of p.sources) {
      const abs = src.startsWith('/') ? src : `/etc/network/${src}`;
      const slash = abs.lastIndexOf('/');
      const dir = abs.slice(0, slash) || '/';
      const re = globToRe(abs.slice(slash + 1));
      for (const f of await listInside(root, dir)) if (re.test(f)) await visit(`${dir}/${f}`, depth + 1);
    }
    for (const d of p.sourceDirs) {
      const dir = d.startsWith('/') ? d : `/etc/network/${d}`;
      for (const f of await listInside(root, dir)) if (/^[A-Za-z0-9_-]+$/.test(f)) await visit(`${dir}/${f}`, depth + 1);
    }
  };
  await visit(IFUPDOWN_PATH, 0);
  return out;
}

/** Static interfaces found in the ifupdown config of the OS at `root`, with MACs from .link pins. */
export async function captureIfupdown(root: string): Promise<ParsedInterface[]> {
  const stanzas = await readInterfaces(root);
  const byName = new Map<string, ParsedInterface>();
  for (const s of stanzas) {
    if (s.method !== 'static' || (s.family !== 'inet' && s.family !== 'inet6')) continue;
    let i = byName.get(s.name);
    if (!i) {
      i = { name: s.name, mac: null, addresses: [], gateway: null, dns: [], searchDomains: [] };
      byName.set(s.name, i);
    }
    const opt = (k: string) => s.options.filter(([key]) => key === k).map(([, v]) => v);
    const netmask = opt('netmask')[0];
    const full = s.family === 'inet' ? 32 : 128;
    for (const a of opt('address')) {
      const v6len = s.family === 'inet6' && /^\d{1,3}$/.test(netmask ?? '') && Number(netmask) <= 128 ? Number(netmask) : null;
      const addr = a.includes('/') ? a : `${a}/${v6len ?? (netmask && s.family === 'inet' ? netmaskToPrefix(netmask) : null) ?? full}`;
      if (!i.addresses.includes(addr)) i.addresses.push(addr);
    }
    const gw = opt('gateway')[0];
    if (gw && isIPv4(gw) && s.family === 'inet') i.gateway ??= gw;
    for (const d of opt('dns-nameservers')) for (const x of d.split(/\s+/)) if ((isIPv4(x) || isIPv6(x)) && !i.dns.includes(x)) i.dns.push(x);
    for (const d of opt('dns-search')) for (const x of d.split(/\s+/)) if (x && !i.searchDomains.includes(x)) i.searchDomains.push(x);
    const hw = opt('hwaddress')[0];
    if (hw) i.mac = normalizeMac(hw.replace(/^ether\s+/, ''));
  }
  const ifaces = [...byName.values()];
  // Without resolvconf's dns-* options, DNS lives in /etc/resolv.conf: give it to the primary
  // interface (the one with the default route, else the first).
  if (ifaces.length && ifaces.every((i) => i.dns.length === 0 && i.searchDomains.length === 0)) {
    const rc = await readInside(root, '/etc/resolv.conf');
    if (rc) {
      const r = parseResolvConf(rc);
      const primary = ifaces.find((i) => i.gateway) ?? ifaces[0];
      primary.dns = r.dns;
      primary.searchDomains = r.search;
    }
  }
  const pins = await readLinkPins(root);
  for (const i of ifaces) i.mac ??= pins.get(i.name!) ?? null;
  return ifaces;
}

/** /etc/network/interfaces for the carried interfaces, plus resolv.conf and .link pins. */
export function renderIfupdown(cfg: CarryConfig): RenderedFile[] {
  let text = `# ${HEADER}\n# interfaces(5): see also /etc/systemd/network/10-stagecoach-*.link for the name pins.\n\nsource-directory /etc/network/interfaces.d\n\n# The loopback network interface\nauto lo\niface lo inet loopback\n`;
  for (const i of cfg.interfaces) {
    const v4 = i.addresses.filter((a) => isIPv4(a.split('/')[0]));
    const v6 = i.addresses.filter((a) => isIPv6(a.split('/')[0]));
    text += `\nauto ${i.name}\n`;
    const dnsLines = [...(i.dns.length ? [`    dns-nameservers ${i.dns.join(' ')}`] : []), ...(i.searchDomains.length ? [`    dns-search ${i.searchDomains.join(' ')}`] : [])];
    let first = true;
    const stanza = (family: string, addr: string, extra: string[]) => {
      text += `iface ${i.name} ${family} static\n    address ${addr}\n${extra.map((l) => `${l}\n`).join('')}`;
    };
    v4.forEach((a) => {
      stanza('inet', a, first ? [...(i.gateway ? [`    gateway ${i.gateway}`] : []), ...dnsLines] : []);
      first = false;
    });
    v6.forEach((a) => {
      stanza('inet6', a, first ? dnsLines : []);
      first = false;
    });
  }
  const files: RenderedFile[] = [{ path: IFUPDOWN_PATH, content: text, mode: 0o644 }];
  const dns = union(cfg.interfaces.map((i) => i.dns));
  const search = union(cfg.interfaces.map((i) => i.searchDomains));
  if (dns.length || search.length) files.push({ path: '/etc/resolv.conf', content: renderResolvConf(dns, search), mode: 0o644 });
  for (const i of cfg.interfaces) files.push({ path: linkFilePath(i.name), content: renderLinkFile(i.name, i.mac), mode: 0o644 });
  return files;
}

/**
 * Files in /etc/network/interfaces.d that define one of `cfg`'s interfaces again: ifupdown
 * would refuse the duplicate, so they must be set aside (a renamed file with a dot in its
 * name is skipped by `source-directory`).
 */
export async function conflictingInterfacesFiles(root: string, cfg: CarryConfig): Promise<string[]> {
  const names = new Set(cfg.interfaces.map((i) => i.name));
  const out: string[] = [];
  for (const f of await listInside(root, '/etc/network/interfaces.d')) {
    if (!/^[A-Za-z0-9_-]+$/.test(f)) continue;
    const text = await readInside(root, `/etc/network/interfaces.d/${f}`);
    if (text && parseInterfacesText(text).ifaces.some((s) => names.has(s.name))) out.push(`/etc/network/interfaces.d/${f}`);
  }
  return out;
}
