/**
 * The OS flavours `stagecoach machine init --os NAME` can create as OS A, each with its network
 * configuration written the way that distribution's installer writes it (not the way the
 * carry-over renders it, so capture is exercised on native files):
 * - `debian-*`: ifupdown, `allow-hotplug`, address + dotted `netmask`, DNS in /etc/resolv.conf;
 * - `ubuntu-*`: netplan `50-cloud-init.yaml` with `gateway4`/routes, `match`/`set-name`;
 * - `fedora-*` (and other networkd families): `20-wired.network` with a `[Route]` section;
 * - `windows-*`: an unattend.xml, host keys under ProgramData/ssh.
 * NAME is `<id>-<version>`; an unknown id gets its family's default format.
 */
import { defaultNetFormat } from '../../../shared/bundle/index.js';
import { scError } from '../../../shared/errors.js';
import type { NetFormat } from '../../../shared/manifest.js';
import { render } from '../carry/index.js';
import type { CarryConfig, RenderedFile } from '../carry/types.js';

/** An OS flavour: os-release fields and network format. */
export interface Flavour {
  id: string;
  version: string;
  name: string;
  prettyName: string;
  netFormat: NetFormat;
}

const PRETTY: Record<string, (v: string) => [string, string]> = {
  debian: (v) => ['Debian GNU/Linux', `Debian GNU/Linux ${v}${{ '10': ' (buster)', '11': ' (bullseye)', '12': ' (bookworm)', '13': ' (trixie)' }[v] ?? ''}`],
  ubuntu: (v) => ['Ubuntu', `Ubuntu ${v}${v.endsWith('.04') ? ' LTS' : ''}`],
  fedora: (v) => ['Fedora Linux', `Fedora Linux ${v} (Server Edition)`],
  windows: (v) => ['Windows Server', `Windows Server ${v}`],
};

/** Parses `debian-11`, `ubuntu-22.04`, `fedora-39`, `windows-2022`… Throws SC_ERR_BAD_CONFIG. */
export function parseFlavour(spec: string): Flavour {
  const m = /^([a-z][a-z0-9]*)-([0-9][0-9A-Za-z.]{0,31})$/.exec(spec);
  if (!m) throw scError('SC_ERR_BAD_CONFIG', `bad OS name ${JSON.stringify(spec.slice(0, 40))}: expected <id>-<version>, e.g. debian-11`);
  const [, id, version] = m;
  const [name, prettyName] = PRETTY[id]?.(version) ?? [id, `${id} ${version}`];
  return { id, version, name, prettyName, netFormat: defaultNetFormat(id) };
}

/** The os-release text of a flavour. */
export function osReleaseText(f: Flavour): string {
  return `PRETTY_NAME="${f.prettyName}"\nNAME="${f.name}"\nVERSION_ID="${f.version}"\nVERSION="${f.version}"\nID=${f.id}\n`;
}

function prefixToNetmask(p: number): string {
  const bits = p === 0 ? 0 : (0xffffffff << (32 - p)) >>> 0;
  return [24, 16, 8, 0].map((s) => (bits >>> s) & 255).join('.');
}

/**
 * The network files a flavour's installer would write for `cfg` (its first interface static,
 * IPv4 only). Security files come from the carry renderer, which uses the standard paths.
 */
export function nativeFiles(f: Flavour, cfg: CarryConfig): RenderedFile[] {
  const i = cfg.interfaces[0];
  const [addr, prefix] = i.addresses[0].split('/');
  const isNetwork = (p: string) => /^\/etc\/(network\/|netplan\/|systemd\/network\/|resolv\.conf$)/.test(p);
  const security = render(cfg, f.netFormat).filter((x) => !isNetwork(x.path));
  switch (f.netFormat) {
    case 'ifupdown':
      return [
        {
          path: '/etc/network/interfaces',
          content: `# This file describes the network interfaces available on your system\n# and how to activate them. For more information, see interfaces(5).\n\nsource /etc/network/interfaces.d/*\n\n# The loopback network interface\nauto lo\niface lo inet loopback\n\n# The primary network interface\nallow-hotplug ${i.name}\niface ${i.name} inet static\n\taddress ${addr}\n\tnetmask ${prefixToNetmask(Number(prefix))}\n${i.gateway ? `\tgateway ${i.gateway}\n` : ''}`,
          mode: 0o644,
        },
        { path: '/etc/resolv.conf', content: `${i.searchDomains.length ? `search ${i.searchDomains.join(' ')}\n` : ''}${i.dns.map((d) => `nameserver ${d}\n`).join('')}`, mode: 0o644 },
        ...security,
      ];
    case 'netplan':
      return [
        {
          path: '/etc/netplan/50-cloud-init.yaml',
          content: `# This file is generated from information provided by the datasource.\nnetwork:\n    ethernets:\n        ${i.name}:\n            addresses:\n            - ${i.addresses[0]}\n${i.gateway ? `            gateway4: ${i.gateway}\n` : ''}            match:\n                macaddress: '${i.mac}'\n            nameservers:\n                addresses:\n${i.dns.map((d) => `                - ${d}\n`).join('')}                search: [${i.searchDomains.join(', ')}]\n            set-name: ${i.name}\n    version: 2\n`,
          mode: 0o600,
        },
        ...security,
      ];
    case 'networkd':
      return [
        {
          path: '/etc/systemd/network/20-wired.network',
          content: `[Match]\nName=${i.name}\nMACAddress=${i.mac}\n\n[Network]\nAddress=${i.addresses[0]}\n${i.dns.length ? `DNS=${i.dns.join(' ')}\n` : ''}${i.searchDomains.length ? `Domains=${i.searchDomains.join(' ')}\n` : ''}${i.gateway ? `\n[Route]\nGateway=${i.gateway}\n` : ''}`,
          mode: 0o644,
        },
        ...security,
      ];
    case 'windows-unattend':
      return render(cfg, f.netFormat);
  }
}
