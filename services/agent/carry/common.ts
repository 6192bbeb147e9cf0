/**
 * Pieces more than one network format uses: systemd INI files (.network, .link),
 * /etc/resolv.conf, and the per-interface result every parser produces.
 */
import { isIP } from 'node:net';
import { listInside, readInside } from './rootfs.js';
import { normalizeMac } from './types.js';

/** First line of every file the carry-over writes. */
export const HEADER = 'Written by stagecoach: configuration carried over from the previous OS.';

/** What a parser found for one interface; `mac` is null when the format does not say. */
export interface ParsedInterface {
  name: string | null;
  mac: string | null;
  addresses: string[];
  gateway: string | null;
  dns: string[];
  searchDomains: string[];
}

/** One `[Section]` of a systemd INI file with its `Key=Value` pairs in order (keys repeat). */
export interface IniSection {
  name: string;
  entries: [string, string][];
}

/** Parses a systemd-style INI file (comments `#`/`;`, `\` continuations). Lines outside a section are ignored. */
export function parseSystemdIni(text: string): IniSection[] {
  const out: IniSection[] = [];
  const lines = text.replace(/\\\r?\n/g, ' ').split(/\r?\n/);
  for (const raw of lines) {
    const line = raw.trim();
    if (!line || line.startsWith('#') || line.startsWith(';')) continue;
    const sec = /^\[([^\]]+)\]$/.exec(line);
    if (sec) {
      out.push({ name: sec[1], entries: [] });
      continue;
    }
    const eq = line.indexOf('=');
    if (eq <= 0 || out.length === 0) continue;
    out[out.length - 1].entries.push([line.slice(0, eq).trim(), line.slice(eq + 1).trim()]);
  }
  return out;
}

/** All values of `key` in every section named `section`, split on whitespace. */
export function iniValues(secs: IniSection[], section: string, key: string): string[] {
  const vals: string[] = [];
  for (const s of secs) {
    if (s.name !== section) continue;
    for (const [k, v] of s.entries) {
      if (k !== key) continue;
      if (v === '') vals.length = 0; // an empty assignment resets the list, as in systemd
      else vals.push(...v.split(/\s+/));
    }
  }
  return vals;
}

/** Path of the .link file that pins a NIC's name to its MAC. */
export function linkFilePath(nic: string): string {
  return `/etc/systemd/network/10-stagecoach-${nic}.link`;
}

/** A systemd .link file that names the NIC with this MAC `nic`, whatever the new OS would call it. */
export function renderLinkFile(nic: string, mac: string): string {
  return `# ${HEADER}\n# Keeps the interface name of this MAC across the OS swap.\n[Match]\nMACAddress=${mac}\nType=ether\n\n[Link]\nName=${nic}\n`;
}

/** Name → MAC pins found in /etc/systemd/network/*.link (any author). */
export async function readLinkPins(root: string): Promise<Map<string, string>> {
  const pins = new Map<string, string>();
  for (const f of await listInside(root, '/etc/systemd/network')) {
    if (!f.endsWith('.link')) continue;
    const text = await readInside(root, `/etc/systemd/network/${f}`);
    if (!text) continue;
    const secs = parseSystemdIni(text);
    const macs = iniValues(secs, 'Match', 'MACAddress');
    const name = iniValues(secs, 'Link', 'Name')[0];
    const mac = macs.length === 1 ? normalizeMac(macs[0]) : null;
    if (name && mac && !pins.has(name)) pins.set(name, mac);
  }
  return pins;
}

/** Nameservers and search domains of a resolv.conf. */
export function parseResolvConf(text: string): { dns: string[]; search: string[] } {
  const dns: string[] = [];
  let search: string[] = [];
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.replace(/[#;].*$/, '').trim();
    const [k, ...rest] = line.split(/\s+/);
    if (k === 'nameserver' && rest[0] && isIP(rest[0])) dns.push(rest[0]);
    else if (k === 'search' || k === 'domain') search = rest.filter(Boolean);
  }
  return { dns, search };
}

/** A static resolv.conf. */
export function renderResolvConf(dns: string[], search: string[]): string {
  return `# ${HEADER}\n${search.length ? `search ${search.join(' ')}\n` : ''}${dns.map((d) => `nameserver ${d}\n`).join('')}`;
}

/** Order-preserving union. */
export function union<T>(lists: T[][]): T[] {
  return [...new Set(lists.flat())];
}
