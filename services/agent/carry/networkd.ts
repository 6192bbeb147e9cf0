/**
 * systemd-networkd: /etc/systemd/network/*.network. Read: `[Match] Name=/MACAddress=`,
 * `[Network] Address=/Gateway=/DNS=/Domains=`, `[Address] Address=` sections and `[Route]`
 * sections without a destination (the default route). Written: one
 * /etc/systemd/network/10-<nic>.network per interface matching both its MAC and its name, and a
 * .link file that pins that name to the MAC.
 */
import { isIPv4 } from 'node:net';
import { HEADER, iniValues, linkFilePath, type ParsedInterface, parseSystemdIni, readLinkPins, renderLinkFile } from './common.js';
import { listInside, readInside } from './rootfs.js';
import { type CarryConfig, normalizeMac, type RenderedFile } from './types.js';

const DIR = '/etc/systemd/network';

/** Path of the .network file written for a NIC. */
export function networkFilePath(nic: string): string {
  return `${DIR}/10-${nic}.network`;
}

/** Static interfaces configured by systemd-networkd in the OS at `root`, in file order. */
export async function captureNetworkd(root: string): Promise<ParsedInterface[]> {
  const pins = await readLinkPins(root);
  const byMac = new Map([...pins].map(([n, m]) => [m, n]));
  const out: ParsedInterface[] = [];
  for (const f of await listInside(root, DIR)) {
    if (!f.endsWith('.network')) continue;
    const text = await readInside(root, `${DIR}/${f}`);
    if (!text) continue;
    const s = parseSystemdIni(text);
    const addresses = [...iniValues(s, 'Network', 'Address'), ...iniValues(s, 'Address', 'Address')].filter((a) => a.includes('/'));
    if (addresses.length === 0) continue;
    let gateway = iniValues(s, 'Network', 'Gateway').find((g) => isIPv4(g)) ?? null;
    if (!gateway) {
      for (const r of s.filter((x) => x.name === 'Route')) {
        const dest = r.entries.find(([k]) => k === 'Destination')?.[1];
        const gw = r.entries.find(([k]) => k === 'Gateway')?.[1];
        if (gw && isIPv4(gw) && (!dest || dest === '0.0.0.0/0')) {
          gateway = gw;
          break;
        }
      }
    }
    const macs = iniValues(s, 'Match', 'MACAddress')
      .map(normalizeMac)
      .filter((m): m is string => m !== null);
    const names = iniValues(s, 'Match', 'Name');
    const mac = macs.length === 1 ? macs[0] : null;
    const literal = names.length === 1 && !/[*?[!]/.test(names[0]) ? names[0] : null;
    out.push({
      name: literal ?? (mac ? (byMac.get(mac) ?? null) : null),
      mac: mac ?? (literal ? (pins.get(literal) ?? null) : null),
      addresses,
      gateway,
      dns: iniValues(s, 'Network', 'DNS'),
      searchDomains: iniValues(s, 'Network', 'Domains').filter((d) => !d.startsWith('~')),
    });
  }
  return out;
}

/** One .network file and one .link file per carried interface. */
export function renderNetworkd(cfg: CarryConfig): RenderedFile[] {
  const files: RenderedFile[] = [];
  for (const i of cfg.interfaces) {
    let t = `# ${HEADER}\n[Match]\nMACAddress=${i.mac}\nName=${i.name}\n\n[Network]\nDHCP=no\n`;
    for (const a of i.addresses) t += `Address=${a}\n`;
    if (i.gateway) t += `Gateway=${i.gateway}\n`;
    for (const d of i.dns) t += `DNS=${d}\n`;
    if (i.searchDomains.length) t += `Domains=${i.searchDomains.join(' ')}\n`;
    files.push({ path: networkFilePath(i.name), content: t, mode: 0o644 });
    files.push({ path: linkFilePath(i.name), content: renderLinkFile(i.name, i.mac), mode: 0o644 });
  }
  return files;
}

function globMatch(glob: string, s: string): boolean {
  const re = new RegExp(`^${glob.replace(/[.+^${}()|\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.')}$`);
  return re.test(s);
}

/**
 * Other .network files that networkd would pick before ours for one of `cfg`'s interfaces
 * (networkd applies the first file, in name order, whose [Match] fits): they must be set aside.
 */
export async function conflictingNetworkFiles(root: string, cfg: CarryConfig): Promise<string[]> {
  const out: string[] = [];
  const ours = new Set(cfg.interfaces.map((i) => networkFilePath(i.name)));
  for (const f of await listInside(root, DIR)) {
    const path = `${DIR}/${f}`;
    if (!f.endsWith('.network') || ours.has(path)) continue;
    const text = await readInside(root, path);
    if (text === null) continue;
    const s = parseSystemdIni(text);
    const names = iniValues(s, 'Match', 'Name');
    const macs = iniValues(s, 'Match', 'MACAddress').map(normalizeMac);
    const hits = cfg.interfaces.some((i) => {
      if (path >= networkFilePath(i.name)) return false;
      const nameOk = names.length === 0 || names.some((n) => globMatch(n, i.name));
      const macOk = macs.length === 0 || macs.includes(i.mac);
      return nameOk && macOk;
    });
    if (hits) out.push(path);
  }
  return out;
}
