/**
 * Ubuntu netplan: YAML under /etc/netplan (and /lib/netplan, overridden by same-named files in
 * /etc), merged in file-name order. Ethernets are carried (bonds, bridges and VLANs are not).
 * Read: `addresses` (plain or mapping form), `gateway4` or a default route in `routes`,
 * `nameservers`, `match.macaddress`, `set-name`. Written: /etc/netplan/01-stagecoach.yaml,
 * mode 0600 (netplan warns about group/world-readable files), every string double-quoted so a
 * MAC can never be read as a YAML 1.1 sexagesimal number.
 */
import { isIPv4 } from 'node:net';
import { parse as parseYaml } from 'yaml';
import { scError } from '../../../shared/errors.js';
import { HEADER, type ParsedInterface } from './common.js';
import { listInside, readInside } from './rootfs.js';
import { type CarryConfig, normalizeMac, type RenderedFile } from './types.js';

/** The file the carry-over writes. */
export const NETPLAN_PATH = '/etc/netplan/01-stagecoach.yaml';

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);

function merge(a: Obj, b: Obj): Obj {
  const out: Obj = { ...a };
  for (const [k, v] of Object.entries(b)) out[k] = isObj(v) && isObj(out[k]) ? merge(out[k] as Obj, v) : v;
  return out;
}

/** The netplan files of the OS at `root` in the order netplan reads them: [path, parsed document]. */
export async function readNetplanFiles(root: string): Promise<[string, Obj][]> {
  const byName = new Map<string, string>();
  for (const dir of ['/lib/netplan', '/etc/netplan']) {
    for (const f of await listInside(root, dir)) if (f.endsWith('.yaml')) byName.set(f, `${dir}/${f}`);
  }
  const out: [string, Obj][] = [];
  for (const name of [...byName.keys()].sort()) {
    const path = byName.get(name)!;
    const text = await readInside(root, path);
    if (text === null) continue;
    let doc: unknown;
    try {
      doc = parseYaml(text);
    } catch (err) {
      throw scError('SC_ERR_BAD_CONFIG', `${path}: not valid YAML: ${(err as Error).message.split('\n')[0]}`);
    }
    if (doc == null) continue;
    if (!isObj(doc)) throw scError('SC_ERR_BAD_CONFIG', `${path}: expected a mapping`);
    out.push([path, doc]);
  }
  return out;
}

const str = (v: unknown): string | null => (typeof v === 'string' ? v : typeof v === 'number' ? String(v) : null);
const strList = (v: unknown): string[] => (Array.isArray(v) ? v.map(str).filter((x): x is string => x !== null) : []);

/** Static ethernets configured by netplan in the OS at `root`. */
export async function captureNetplan(root: string): Promise<ParsedInterface[]> {
  let ethernets: Obj = {};
  for (const [, doc] of await readNetplanFiles(root)) {
    const net = doc.network;
    if (isObj(net) && isObj(net.ethernets)) ethernets = merge(ethernets, net.ethernets);
  }
  const out: ParsedInterface[] = [];
  for (const [id, raw] of Object.entries(ethernets)) {
    if (!isObj(raw)) continue;
    const addresses = (Array.isArray(raw.addresses) ? raw.addresses : [])
      .map((a) => (isObj(a) ? Object.keys(a)[0] : str(a)))
      .filter((a): a is string => typeof a === 'string' && a.includes('/'));
    if (addresses.length === 0) continue;
    const match = isObj(raw.match) ? raw.match : {};
    const matchName = str(match.name);
    const name = str(raw['set-name']) ?? (matchName && !/[*?[]/.test(matchName) ? matchName : null) ?? (Object.keys(match).length ? null : id);
    let gateway = str(raw.gateway4);
    if (!gateway && Array.isArray(raw.routes)) {
      for (const r of raw.routes) {
        if (isObj(r) && (r.to === 'default' || r.to === '0.0.0.0/0') && typeof r.via === 'string' && isIPv4(r.via)) {
          gateway = r.via;
          break;
        }
      }
    }
    const ns = isObj(raw.nameservers) ? raw.nameservers : {};
    const macRaw = str(match.macaddress) ?? str(raw.macaddress);
    out.push({
      name,
      mac: macRaw ? normalizeMac(macRaw) : null,
      addresses,
      gateway: gateway && isIPv4(gateway) ? gateway : null,
      dns: strList(ns.addresses),
      searchDomains: strList(ns.search),
    });
  }
  return out;
}

const q = (s: string) => JSON.stringify(s);
const qList = (a: string[]) => `[${a.map(q).join(', ')}]`;

/** /etc/netplan/01-stagecoach.yaml for the carried interfaces. */
export function renderNetplan(cfg: CarryConfig): RenderedFile[] {
  let y = `# ${HEADER}\nnetwork:\n  version: 2\n  ethernets:\n`;
  for (const i of cfg.interfaces) {
    y += `    ${q(i.name)}:\n      match:\n        macaddress: ${q(i.mac)}\n      set-name: ${q(i.name)}\n      dhcp4: false\n      dhcp6: false\n`;
    y += `      addresses: ${qList(i.addresses)}\n`;
    if (i.gateway) y += `      routes:\n        - to: "default"\n          via: ${q(i.gateway)}\n`;
    if (i.dns.length || i.searchDomains.length) {
      y += '      nameservers:\n';
      if (i.dns.length) y += `        addresses: ${qList(i.dns)}\n`;
      if (i.searchDomains.length) y += `        search: ${qList(i.searchDomains)}\n`;
    }
  }
  return [{ path: NETPLAN_PATH, content: y, mode: 0o600 }];
}

/**
 * Other netplan files that configure one of `cfg`'s interfaces (same id, set-name or MAC):
 * netplan merges them into ours, so they must be set aside.
 */
export async function conflictingNetplanFiles(root: string, cfg: CarryConfig): Promise<string[]> {
  const names = new Set(cfg.interfaces.map((i) => i.name));
  const macs = new Set(cfg.interfaces.map((i) => i.mac));
  const out: string[] = [];
  for (const [path, doc] of await readNetplanFiles(root)) {
    if (path === NETPLAN_PATH || !path.startsWith('/etc/')) continue;
    const eth = isObj(doc.network) && isObj(doc.network.ethernets) ? doc.network.ethernets : {};
    const hit = Object.entries(eth).some(([id, v]) => {
      if (!isObj(v)) return names.has(id);
      const m = isObj(v.match) ? v.match : {};
      const mac = str(m.macaddress);
      return names.has(id) || names.has(str(v['set-name']) ?? '') || names.has(str(m.name) ?? '') || (mac !== null && macs.has(normalizeMac(mac) ?? ''));
    });
    if (hit) out.push(path);
  }
  return out;
}
