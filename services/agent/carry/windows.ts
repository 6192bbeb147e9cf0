/**
 * Windows: an unattend answer file at /Windows/Panther/unattend.xml (where Windows Setup looks
 * first), specialize pass: Microsoft-Windows-Shell-Setup (ComputerName),
 * Microsoft-Windows-TCPIP (per interface, identified by its MAC with dashes: static IPv4/IPv6
 * addresses and the default route) and Microsoft-Windows-DNS-Client (per-interface DNS servers;
 * search domains are machine-wide there, so every interface that has any reads back the
 * machine-wide list). Windows does not name NICs after Linux, so capture takes names from the
 * machine's NIC inventory by MAC, else `nic0`, `nic1`, ….
 */
import { isIPv4 } from 'node:net';
import { scError } from '../../../shared/errors.js';
import { HEADER, type ParsedInterface, union } from './common.js';
import { readInside } from './rootfs.js';
import { type CarryConfig, normalizeMac, type RenderedFile } from './types.js';
import { childNamed, childrenNamed, parseXml, type XmlElement, xmlEscape } from './xml.js';

/** Where the answer file is written. */
export const UNATTEND_PATH = '/Windows/Panther/unattend.xml';
/** Default namespace of answer files. */
export const UNATTEND_NS = 'urn:schemas-microsoft-com:unattend';
/** The wcm namespace (`wcm:action`, `wcm:keyValue`). */
export const WCM_NS = 'http://schemas.microsoft.com/WMIConfig/2002/State';
const XSI_NS = 'http://www.w3.org/2001/XMLSchema-instance';

/** Windows computer names: NetBIOS rules, at most 15 characters, no dots. */
export const COMPUTER_NAME_RE = /^[A-Za-z0-9](?:[A-Za-z0-9-]{0,13}[A-Za-z0-9])?$/;

const COMPONENT_ATTRS = 'processorArchitecture="amd64" publicKeyToken="31bf3856ad364e35" language="neutral" versionScope="nonSxS"';

/** `52:54:00:12:34:56` → `52-54-00-12-34-56`, the form Windows prints and unattend accepts. */
export function macToWindows(mac: string): string {
  return mac.toUpperCase().replace(/:/g, '-');
}

/** The unattend.xml for the carried config. Throws SC_ERR_BAD_CONFIG when the hostname is no valid computer name. */
export function renderUnattend(cfg: CarryConfig): RenderedFile[] {
  const computerName = cfg.hostname.split('.')[0];
  if (!COMPUTER_NAME_RE.test(computerName)) {
    throw scError('SC_ERR_BAD_CONFIG', `hostname ${cfg.hostname} cannot be a Windows computer name (at most 15 letters, digits or dashes)`);
  }
  const e = xmlEscape;
  const ind = (n: number) => '  '.repeat(n);
  let x = `<?xml version="1.0" encoding="utf-8"?>\n<!-- ${HEADER} -->\n`;
  x += `<unattend xmlns="${UNATTEND_NS}" xmlns:wcm="${WCM_NS}" xmlns:xsi="${XSI_NS}">\n`;
  x += `${ind(1)}<settings pass="specialize">\n`;
  x += `${ind(2)}<component name="Microsoft-Windows-Shell-Setup" ${COMPONENT_ATTRS}>\n${ind(3)}<ComputerName>${e(computerName)}</ComputerName>\n${ind(2)}</component>\n`;
  x += `${ind(2)}<component name="Microsoft-Windows-TCPIP" ${COMPONENT_ATTRS}>\n${ind(3)}<Interfaces>\n`;
  for (const i of cfg.interfaces) {
    const hasV6 = i.addresses.some((a) => !isIPv4(a.split('/')[0]));
    x += `${ind(4)}<Interface wcm:action="add">\n${ind(5)}<Identifier>${macToWindows(i.mac)}</Identifier>\n`;
    x += `${ind(5)}<Ipv4Settings>\n${ind(6)}<DhcpEnabled>false</DhcpEnabled>\n${ind(5)}</Ipv4Settings>\n`;
    if (hasV6) x += `${ind(5)}<Ipv6Settings>\n${ind(6)}<DhcpEnabled>false</DhcpEnabled>\n${ind(5)}</Ipv6Settings>\n`;
    x += `${ind(5)}<UnicastIpAddresses>\n`;
    i.addresses.forEach((a, n) => {
      x += `${ind(6)}<IpAddress wcm:action="add" wcm:keyValue="${n + 1}">${e(a)}</IpAddress>\n`;
    });
    x += `${ind(5)}</UnicastIpAddresses>\n`;
    if (i.gateway) {
      x += `${ind(5)}<Routes>\n${ind(6)}<Route wcm:action="add">\n${ind(7)}<Identifier>1</Identifier>\n${ind(7)}<Prefix>0.0.0.0/0</Prefix>\n`;
      x += `${ind(7)}<NextHopAddress>${e(i.gateway)}</NextHopAddress>\n${ind(7)}<Metric>10</Metric>\n${ind(6)}</Route>\n${ind(5)}</Routes>\n`;
    }
    x += `${ind(4)}</Interface>\n`;
  }
  x += `${ind(3)}</Interfaces>\n${ind(2)}</component>\n`;
  x += `${ind(2)}<component name="Microsoft-Windows-DNS-Client" ${COMPONENT_ATTRS}>\n`;
  const search = union(cfg.interfaces.map((i) => i.searchDomains));
  if (search.length) {
    x += `${ind(3)}<DNSSuffixSearchOrder>\n`;
    search.forEach((d, n) => {
      x += `${ind(4)}<DomainName wcm:action="add" wcm:keyValue="${n + 1}">${e(d)}</DomainName>\n`;
    });
    x += `${ind(3)}</DNSSuffixSearchOrder>\n`;
  }
  x += `${ind(3)}<Interfaces>\n`;
  for (const i of cfg.interfaces) {
    x += `${ind(4)}<Interface wcm:action="add">\n${ind(5)}<Identifier>${macToWindows(i.mac)}</Identifier>\n`;
    if (i.searchDomains.length) x += `${ind(5)}<DNSDomain>${e(i.searchDomains[0])}</DNSDomain>\n`;
    if (i.dns.length) {
      x += `${ind(5)}<DNSServerSearchOrder>\n`;
      i.dns.forEach((d, n) => {
        x += `${ind(6)}<IpAddress wcm:action="add" wcm:keyValue="${n + 1}">${e(d)}</IpAddress>\n`;
      });
      x += `${ind(5)}</DNSServerSearchOrder>\n`;
    }
    x += `${ind(4)}</Interface>\n`;
  }
  x += `${ind(3)}</Interfaces>\n${ind(2)}</component>\n${ind(1)}</settings>\n</unattend>\n`;
  return [{ path: UNATTEND_PATH, content: x, mode: 0o644 }];
}

const text = (el: XmlElement | undefined) => (el ? el.text.trim() : '');

function keyed(list: XmlElement | undefined, local: string): string[] {
  if (!list) return [];
  return childrenNamed(list, UNATTEND_NS, local)
    .map((el, n) => ({ k: Number(el.attrs[`{${WCM_NS}}keyValue`] ?? n + 1), v: text(el) }))
    .sort((a, b) => a.k - b.k)
    .map((x) => x.v)
    .filter(Boolean);
}

/** Hostname and interfaces from the unattend.xml of the OS at `root`; null when there is none. */
export async function captureUnattend(root: string): Promise<{ hostname: string | null; interfaces: ParsedInterface[] } | null> {
  const src = await readInside(root, UNATTEND_PATH);
  if (src === null) return null;
  const doc = parseXml(src);
  if (doc.ns !== UNATTEND_NS || doc.local !== 'unattend') throw scError('SC_ERR_BAD_CONFIG', `${UNATTEND_PATH}: root element is not an unattend element`);
  const components = childrenNamed(doc, UNATTEND_NS, 'settings').flatMap((s) => childrenNamed(s, UNATTEND_NS, 'component'));
  const comp = (name: string) => components.filter((c) => c.attrs.name === name);
  let hostname: string | null = null;
  for (const c of comp('Microsoft-Windows-Shell-Setup')) hostname = text(childNamed(c, UNATTEND_NS, 'ComputerName')) || hostname;
  const byMac = new Map<string, ParsedInterface>();
  for (const c of comp('Microsoft-Windows-TCPIP')) {
    for (const itf of childrenNamed(childNamed(c, UNATTEND_NS, 'Interfaces') ?? doc, UNATTEND_NS, 'Interface')) {
      const mac = normalizeMac(text(childNamed(itf, UNATTEND_NS, 'Identifier')));
      if (!mac) continue;
      const addresses = keyed(childNamed(itf, UNATTEND_NS, 'UnicastIpAddresses'), 'IpAddress');
      let gateway: string | null = null;
      for (const r of childrenNamed(childNamed(itf, UNATTEND_NS, 'Routes') ?? itf, UNATTEND_NS, 'Route')) {
        const prefix = text(childNamed(r, UNATTEND_NS, 'Prefix'));
        const hop = text(childNamed(r, UNATTEND_NS, 'NextHopAddress'));
        if (prefix === '0.0.0.0/0' && isIPv4(hop)) gateway = hop;
      }
      byMac.set(mac, { name: null, mac, addresses, gateway, dns: [], searchDomains: [] });
    }
  }
  for (const c of comp('Microsoft-Windows-DNS-Client')) {
    const global = keyed(childNamed(c, UNATTEND_NS, 'DNSSuffixSearchOrder'), 'DomainName');
    for (const itf of childrenNamed(childNamed(c, UNATTEND_NS, 'Interfaces') ?? doc, UNATTEND_NS, 'Interface')) {
      const i = byMac.get(normalizeMac(text(childNamed(itf, UNATTEND_NS, 'Identifier'))) ?? '');
      if (!i) continue;
      i.dns = keyed(childNamed(itf, UNATTEND_NS, 'DNSServerSearchOrder'), 'IpAddress');
      const domain = text(childNamed(itf, UNATTEND_NS, 'DNSDomain'));
      if (domain) i.searchDomains = global.includes(domain) ? [domain, ...global.filter((d) => d !== domain)] : [domain, ...global];
    }
  }
  return { hostname, interfaces: [...byMac.values()].filter((i) => i.addresses.length > 0) };
}
