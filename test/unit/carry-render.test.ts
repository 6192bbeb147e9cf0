// Carry-over rendering: every format's output checked against its real syntax (independent
// parsers written here, the `yaml` package, ifquery and Python's XML parser when installed),
// round trips capture(render(cfg)) == cfg, idempotent apply, conflicting files set aside,
// writes that never leave the OS root, and schema refusals of injected values.
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { parse as parseYaml } from 'yaml';
import { isScError } from '../../shared/errors.js';
import { NET_FORMATS, type NetFormat } from '../../shared/manifest.js';
import { apply, type CarryConfig, capture, fingerprint, generateEd25519, parseCarryConfig, render } from '../../services/agent/carry/index.js';
import { parseXml } from '../../services/agent/carry/xml.js';

const tmp = mkdtempSync(join(tmpdir(), 'sc-carry-'));
after(() => rmSync(tmp, { recursive: true, force: true }));
let n = 0;
const newRoot = () => {
  const d = join(tmp, `root${n++}`);
  mkdirSync(d);
  return d;
};

function sshString(b: Buffer | string): Buffer {
  const body = typeof b === 'string' ? Buffer.from(b) : b;
  const len = Buffer.alloc(4);
  len.writeUInt32BE(body.length);
  return Buffer.concat([len, body]);
}

/** An RSA host key: PKCS#1 PEM private key (OpenSSH reads it) and the ssh-rsa public line. */
function rsaKey(): { private: string; public: string } {
  const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = publicKey.export({ format: 'jwk' }) as { e: string; n: string };
  const mpint = (b64u: string) => {
    const b = Buffer.from(b64u, 'base64url');
    return sshString(b[0] & 0x80 ? Buffer.concat([Buffer.from([0]), b]) : b);
  };
  const blob = Buffer.concat([sshString('ssh-rsa'), mpint(jwk.e), mpint(jwk.n)]);
  return { private: privateKey.export({ type: 'pkcs1', format: 'pem' }) as string, public: `ssh-rsa ${blob.toString('base64')} root@a1` };
}

const ed = generateEd25519('root@a1');
const rsa = rsaKey();

/** Two NICs: one with two IPv4 addresses, an IPv6 one, gateway, DNS and search; one bare. */
function sampleConfig(): CarryConfig {
  return parseCarryConfig({
    hostname: 'a1',
    interfaces: [
      {
        name: 'ens3',
        mac: '52:54:00:12:34:56',
        addresses: ['10.0.0.5/24', '10.0.0.6/24', '2001:db8::5/64'],
        gateway: '10.0.0.1',
        dns: ['10.0.0.2', '10.0.0.3'],
        searchDomains: ['example.com', 'corp.example.com'],
      },
      { name: 'ens4', mac: '52:54:00:00:00:01', addresses: ['192.168.1.5/24'], gateway: null, dns: [], searchDomains: [] },
    ],
    hostKeys: [
      { path: '/etc/ssh/ssh_host_rsa_key', type: 'rsa', private: rsa.private, public: rsa.public },
      { path: '/etc/ssh/ssh_host_ed25519_key', type: 'ed25519', private: ed.private, public: ed.public },
    ],
    authorizedKeys: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGAbHl5scnifhnMn2alU9sKXJPAMxMv1mK2rNXCE5rWo operator\n',
    acl: [
      { path: '/etc/hosts.deny', content: 'sshd: ALL\n' },
      { path: '/etc/hosts.allow', content: 'sshd: 10.0.0.0/8\n' },
    ],
  });
}

const file = (files: { path: string; content: string; mode: number }[], path: string) => {
  const f = files.find((x) => x.path === path);
  assert.ok(f, `${path} rendered`);
  return f;
};

describe('ifupdown', () => {
  it('renders interfaces(5) that a stanza parser and ifquery read back', () => {
    const files = render(sampleConfig(), 'ifupdown');
    const f = file(files, '/etc/network/interfaces');
    assert.equal(f.mode, 0o644);
    // Independent stanza parser: every non-comment line is a stanza keyword or an indented option.
    const stanzas: { kw: string; args: string[]; opts: Record<string, string> }[] = [];
    for (const line of f.content.split('\n')) {
      if (!line.trim() || line.trim().startsWith('#')) continue;
      if (/^\s/.test(line)) {
        const [k, ...v] = line.trim().split(/\s+/);
        assert.ok(stanzas.length && stanzas[stanzas.length - 1].kw === 'iface', `option outside an iface stanza: ${line}`);
        stanzas[stanzas.length - 1].opts[k] = v.join(' ');
        continue;
      }
      const [kw, ...args] = line.split(/\s+/);
      assert.ok(['auto', 'iface', 'source-directory', 'source', 'allow-hotplug'].includes(kw), `unknown stanza ${kw}`);
      stanzas.push({ kw, args, opts: {} });
    }
    const ifaces = stanzas.filter((s) => s.kw === 'iface');
    assert.deepEqual(
      ifaces.map((s) => s.args.join(' ')),
      ['lo inet loopback', 'ens3 inet static', 'ens3 inet static', 'ens3 inet6 static', 'ens4 inet static'],
    );
    assert.deepEqual(ifaces[1].opts, { address: '10.0.0.5/24', gateway: '10.0.0.1', 'dns-nameservers': '10.0.0.2 10.0.0.3', 'dns-search': 'example.com corp.example.com' });
    assert.deepEqual(
      stanzas.filter((s) => s.kw === 'auto').flatMap((s) => s.args),
      ['lo', 'ens3', 'ens4'],
    );
    // resolv.conf and the name pins come along
    assert.match(file(files, '/etc/resolv.conf').content, /^nameserver 10\.0\.0\.2$/m);
    assert.match(file(files, '/etc/systemd/network/10-stagecoach-ens3.link').content, /^MACAddress=52:54:00:12:34:56$/m);
  });

  it('is accepted by ifquery (skipped when ifupdown is not installed)', (t) => {
    if (spawnSync('ifquery', ['--version']).error) {
      t.skip('ifquery not installed (apt-get install ifupdown to run this check)');
      return;
    }
    const path = join(tmp, 'interfaces');
    writeFileSync(path, file(render(sampleConfig(), 'ifupdown'), '/etc/network/interfaces').content);
    assert.deepEqual(execFileSync('ifquery', ['-i', path, '--list'], { encoding: 'utf8' }).trim().split('\n'), ['lo', 'ens3', 'ens4']);
    const ens3 = execFileSync('ifquery', ['-i', path, 'ens3'], { encoding: 'utf8' });
    assert.match(ens3, /^address: 10\.0\.0\.5$/m);
    assert.match(ens3, /^gateway: 10\.0\.0\.1$/m);
    assert.match(ens3, /^netmask: 255\.255\.255\.0$/m);
    assert.match(ens3, /^dns-nameservers: 10\.0\.0\.2 10\.0\.0\.3$/m);
    assert.match(ens3, /^address: 2001:db8::5$/m);
  });
});

describe('netplan', () => {
  it('renders YAML of the netplan schema shape, 0600, MACs strings even under YAML 1.1', () => {
    const f = file(render(sampleConfig(), 'netplan'), '/etc/netplan/01-stagecoach.yaml');
    assert.equal(f.mode, 0o600);
    for (const version of ['1.1', '1.2'] as const) {
      const doc = parseYaml(f.content, { version });
      assert.deepEqual(Object.keys(doc), ['network']);
      assert.deepEqual(Object.keys(doc.network).sort(), ['ethernets', 'version']);
      assert.equal(doc.network.version, 2);
      const allowed = new Set(['match', 'set-name', 'dhcp4', 'dhcp6', 'addresses', 'routes', 'nameservers']);
      for (const [id, e] of Object.entries(doc.network.ethernets as Record<string, Record<string, unknown>>)) {
        for (const k of Object.keys(e)) assert.ok(allowed.has(k), `unexpected key ${k} in ${id}`);
        assert.deepEqual(Object.keys(e.match as object), ['macaddress']);
        assert.equal(typeof (e.match as { macaddress: unknown }).macaddress, 'string');
        assert.equal(e['set-name'], id);
        assert.equal(e.dhcp4, false);
        assert.ok(Array.isArray(e.addresses) && e.addresses.every((a) => typeof a === 'string' && a.includes('/')));
        for (const r of (e.routes as { to: string; via: string }[] | undefined) ?? []) assert.deepEqual(Object.keys(r), ['to', 'via']);
        if (e.nameservers) for (const k of Object.keys(e.nameservers)) assert.ok(['addresses', 'search'].includes(k));
      }
      const ens3 = doc.network.ethernets.ens3;
      assert.equal(ens3.match.macaddress, '52:54:00:12:34:56');
      assert.deepEqual(ens3.routes, [{ to: 'default', via: '10.0.0.1' }]);
      assert.deepEqual(ens3.nameservers, { addresses: ['10.0.0.2', '10.0.0.3'], search: ['example.com', 'corp.example.com'] });
      assert.equal(doc.network.ethernets.ens4.routes, undefined);
    }
  });
});

/** An independent systemd INI reader: [Section] then Key=Value; anything else is an error. */
function ini(text: string): [string, [string, string][]][] {
  const out: [string, [string, string][]][] = [];
  for (const line of text.split('\n')) {
    if (!line.trim() || /^[#;]/.test(line)) continue;
    const sec = /^\[(\w+)\]$/.exec(line);
    if (sec) {
      out.push([sec[1], []]);
      continue;
    }
    const kv = /^([A-Za-z]+)=(.*)$/.exec(line);
    assert.ok(kv && out.length, `not INI: ${line}`);
    out[out.length - 1][1].push([kv[1], kv[2]]);
  }
  return out;
}

describe('networkd', () => {
  it('renders .network and .link files of valid systemd syntax and keys', () => {
    const files = render(sampleConfig(), 'networkd');
    const net = ini(file(files, '/etc/systemd/network/10-ens3.network').content);
    const keys: Record<string, Set<string>> = { Match: new Set(['MACAddress', 'Name']), Network: new Set(['DHCP', 'Address', 'Gateway', 'DNS', 'Domains']) };
    assert.deepEqual(
      net.map(([s]) => s),
      ['Match', 'Network'],
    );
    for (const [s, kvs] of net) for (const [k] of kvs) assert.ok(keys[s].has(k), `${k}= is not a [${s}] key of systemd.network`);
    assert.deepEqual(net[0][1], [
      ['MACAddress', '52:54:00:12:34:56'],
      ['Name', 'ens3'],
    ]);
    assert.deepEqual(
      net[1][1].filter(([k]) => k === 'Address').map(([, v]) => v),
      ['10.0.0.5/24', '10.0.0.6/24', '2001:db8::5/64'],
    );
    assert.deepEqual(net[1][1].find(([k]) => k === 'Gateway'), ['Gateway', '10.0.0.1']);
    assert.deepEqual(net[1][1].find(([k]) => k === 'Domains'), ['Domains', 'example.com corp.example.com']);
    assert.equal(
      ini(file(files, '/etc/systemd/network/10-ens4.network').content)[1][1].find(([k]) => k === 'Gateway'),
      undefined,
    );
    const link = ini(file(files, '/etc/systemd/network/10-stagecoach-ens4.link').content);
    assert.deepEqual(link, [
      [
        'Match',
        [
          ['MACAddress', '52:54:00:00:00:01'],
          ['Type', 'ether'],
        ],
      ],
      ['Link', [['Name', 'ens4']]],
    ]);
  });
});

const UNATTEND = 'urn:schemas-microsoft-com:unattend';
const WCM = 'http://schemas.microsoft.com/WMIConfig/2002/State';

describe('windows-unattend', () => {
  it('renders a well-formed answer file with the right namespaces and element paths', () => {
    const files = render(sampleConfig(), 'windows-unattend');
    const xml = file(files, '/Windows/Panther/unattend.xml').content;
    const doc = parseXml(xml);
    assert.equal(doc.ns, UNATTEND);
    assert.equal(doc.local, 'unattend');
    const settings = doc.children.filter((c) => c.local === 'settings');
    assert.equal(settings[0].attrs.pass, 'specialize');
    const comp = (name: string) => settings[0].children.find((c) => c.local === 'component' && c.attrs.name === name)!;
    const path = (el: ReturnType<typeof parseXml>, ...names: string[]) =>
      names.reduce<ReturnType<typeof parseXml>[]>((els, nm) => els.flatMap((e) => e.children.filter((c) => c.local === nm && c.ns === UNATTEND)), [el]);
    assert.equal(path(comp('Microsoft-Windows-Shell-Setup'), 'ComputerName')[0].text, 'a1');
    const ifs = path(comp('Microsoft-Windows-TCPIP'), 'Interfaces', 'Interface');
    assert.equal(ifs.length, 2);
    assert.equal(ifs[0].attrs[`{${WCM}}action`], 'add');
    assert.equal(path(ifs[0], 'Identifier')[0].text, '52-54-00-12-34-56');
    assert.equal(path(ifs[0], 'Ipv4Settings', 'DhcpEnabled')[0].text, 'false');
    const ips = path(ifs[0], 'UnicastIpAddresses', 'IpAddress');
    assert.deepEqual(
      ips.map((e) => [e.attrs[`{${WCM}}action`], e.attrs[`{${WCM}}keyValue`], e.text]),
      [
        ['add', '1', '10.0.0.5/24'],
        ['add', '2', '10.0.0.6/24'],
        ['add', '3', '2001:db8::5/64'],
      ],
    );
    assert.equal(path(ifs[0], 'Routes', 'Route', 'NextHopAddress')[0].text, '10.0.0.1');
    assert.equal(path(ifs[0], 'Routes', 'Route', 'Prefix')[0].text, '0.0.0.0/0');
    assert.equal(path(ifs[1], 'Routes').length, 0);
    const dns = path(comp('Microsoft-Windows-DNS-Client'), 'Interfaces', 'Interface');
    assert.deepEqual(
      path(dns[0], 'DNSServerSearchOrder', 'IpAddress').map((e) => e.text),
      ['10.0.0.2', '10.0.0.3'],
    );
    assert.deepEqual(
      path(comp('Microsoft-Windows-DNS-Client'), 'DNSSuffixSearchOrder', 'DomainName').map((e) => e.text),
      ['example.com', 'corp.example.com'],
    );
    // Host keys and authorized keys where OpenSSH for Windows reads them.
    assert.equal(file(files, '/ProgramData/ssh/ssh_host_ed25519_key').mode, 0o600);
    assert.equal(file(files, '/ProgramData/ssh/ssh_host_ed25519_key.pub').mode, 0o644);
    assert.equal(file(files, '/ProgramData/ssh/administrators_authorized_keys').mode, 0o600);
  });

  it('is well-formed and namespaced for an independent XML parser (Python, when installed)', (t) => {
    const py = spawnSync('python3', ['-c', 'import xml.etree.ElementTree']);
    if (py.error || py.status !== 0) {
      t.skip('python3 not installed');
      return;
    }
    const path = join(tmp, 'unattend.xml');
    writeFileSync(path, file(render(sampleConfig(), 'windows-unattend'), '/Windows/Panther/unattend.xml').content);
    const script = `
import sys, xml.etree.ElementTree as ET
ns = {'u': '${UNATTEND}', 'wcm': '${WCM}'}
r = ET.parse(sys.argv[1]).getroot()
assert r.tag == '{${UNATTEND}}unattend', r.tag
c = r.find("u:settings[@pass='specialize']/u:component[@name='Microsoft-Windows-TCPIP']", ns)
ips = c.findall('u:Interfaces/u:Interface/u:UnicastIpAddresses/u:IpAddress', ns)
print(ips[0].get('{${WCM}}keyValue'), ips[0].text, c.find('u:Interfaces/u:Interface/u:Identifier', ns).text)
print(r.find("u:settings/u:component[@name='Microsoft-Windows-Shell-Setup']/u:ComputerName", ns).text)
`;
    const out = execFileSync('python3', ['-c', script, path], { encoding: 'utf8' });
    assert.equal(out, '1 10.0.0.5/24 52-54-00-12-34-56\na1\n');
  });

  it('refuses a hostname that cannot be a computer name', () => {
    const c = { ...sampleConfig(), hostname: 'a-very-long-hostname-indeed' };
    assert.throws(() => render(c, 'windows-unattend'), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
  });
});

describe('round trip and apply', () => {
  for (const fmt of NET_FORMATS) {
    it(`capture(render(cfg)) == cfg for ${fmt}`, async () => {
      const root = newRoot();
      const cfg = sampleConfig();
      const nics = fmt === 'windows-unattend' ? cfg.interfaces.map((i) => ({ name: i.name, mac: i.mac })) : [];
      if (fmt === 'windows-unattend') cfg.interfaces[1].searchDomains = []; // machine-wide there: only one list
      await apply(root, cfg, fmt);
      assert.deepEqual(await capture(root, fmt, { nics }), cfg);
    });
  }

  it('names Windows interfaces nic0, nic1 when the machine does not say', async () => {
    const root = newRoot();
    await apply(root, sampleConfig(), 'windows-unattend');
    const got = await capture(root, 'windows-unattend');
    assert.deepEqual(
      got.interfaces.map((i) => [i.name, i.mac]),
      [
        ['nic0', '52:54:00:12:34:56'],
        ['nic1', '52:54:00:00:00:01'],
      ],
    );
  });

  for (const fmt of NET_FORMATS) {
    it(`apply is idempotent and sets modes (${fmt})`, async () => {
      const root = newRoot();
      const first = await apply(root, sampleConfig(), fmt);
      assert.ok(first.written.length >= 5);
      const second = await apply(root, sampleConfig(), fmt);
      assert.deepEqual(second.written, []);
      assert.equal(second.unchanged.length, first.written.length);
      const ssh = fmt === 'windows-unattend' ? 'ProgramData/ssh' : 'etc/ssh';
      assert.equal(statSync(join(root, ssh, 'ssh_host_ed25519_key')).mode & 0o777, 0o600);
      assert.equal(statSync(join(root, ssh, 'ssh_host_ed25519_key.pub')).mode & 0o777, 0o644);
      assert.equal(statSync(join(root, fmt === 'windows-unattend' ? 'ProgramData/ssh/administrators_authorized_keys' : 'root/.ssh/authorized_keys')).mode & 0o777, 0o600);
      assert.equal(readFileSync(join(root, ssh, 'ssh_host_ed25519_key'), 'utf8'), ed.private);
    });
  }

  it('sets aside config files that would override the carried interfaces', async () => {
    const cfg = sampleConfig();
    const np = newRoot();
    mkdirSync(join(np, 'etc/netplan'), { recursive: true });
    writeFileSync(join(np, 'etc/netplan/50-cloud-init.yaml'), 'network:\n  version: 2\n  ethernets:\n    ens3:\n      dhcp4: true\n');
    writeFileSync(join(np, 'etc/netplan/60-other.yaml'), 'network:\n  version: 2\n  ethernets:\n    eth9:\n      dhcp4: true\n');
    const r1 = await apply(np, cfg, 'netplan');
    assert.deepEqual(r1.disabled, ['/etc/netplan/50-cloud-init.yaml']);
    assert.deepEqual(readdirSync(join(np, 'etc/netplan')).sort(), ['01-stagecoach.yaml', '50-cloud-init.yaml.disabled-by-stagecoach', '60-other.yaml']);

    const nd = newRoot();
    mkdirSync(join(nd, 'etc/systemd/network'), { recursive: true });
    writeFileSync(join(nd, 'etc/systemd/network/05-all.network'), '[Match]\nName=en*\n\n[Network]\nDHCP=yes\n');
    writeFileSync(join(nd, 'etc/systemd/network/99-late.network'), '[Match]\nName=en*\n\n[Network]\nDHCP=yes\n');
    assert.deepEqual((await apply(nd, cfg, 'networkd')).disabled, ['/etc/systemd/network/05-all.network']);

    const iu = newRoot();
    mkdirSync(join(iu, 'etc/network/interfaces.d'), { recursive: true });
    writeFileSync(join(iu, 'etc/network/interfaces.d/ens3'), 'auto ens3\niface ens3 inet dhcp\n');
    writeFileSync(join(iu, 'etc/network/interfaces.d/wlan'), 'iface wlan0 inet dhcp\n');
    assert.deepEqual((await apply(iu, cfg, 'ifupdown')).disabled, ['/etc/network/interfaces.d/ens3']);
    assert.deepEqual((await capture(iu, 'ifupdown')).interfaces, cfg.interfaces);
  });

  it('never writes outside the OS root, whatever its symlinks point at', async () => {
    const root = newRoot();
    const outside = join(tmp, `outside${n++}`);
    mkdirSync(outside);
    writeFileSync(join(outside, 'hostname'), 'untouched\n');
    mkdirSync(join(root, 'etc'));
    symlinkSync(outside, join(root, 'etc/ssh')); // absolute: means <root><outside> inside the OS
    symlinkSync(join(outside, 'hostname'), join(root, 'etc/hostname'));
    symlinkSync('../../../../../../..', join(root, 'root'));
    await apply(root, sampleConfig(), 'networkd');
    assert.deepEqual(readdirSync(outside), ['hostname']);
    assert.equal(readFileSync(join(outside, 'hostname'), 'utf8'), 'untouched\n');
    assert.ok(existsSync(join(root, outside, 'ssh_host_ed25519_key')), 'key written under the root, chroot-style');
    assert.equal(readFileSync(join(root, 'etc/hostname'), 'utf8'), 'a1\n');
    assert.ok(existsSync(join(root, '.ssh/authorized_keys')), "'..' stops at the root");
    assert.deepEqual(await capture(root, 'networkd'), sampleConfig());
  });
});

describe('validation', () => {
  const bad: [string, (c: CarryConfig) => void][] = [
    ['hostname with a newline', (c) => (c.hostname = 'a1\nevil')],
    ['interface name with a space', (c) => (c.interfaces[0].name = 'ens 3')],
    ['interface name injecting INI', (c) => (c.interfaces[0].name = 'x\n[Network]')],
    ['search domain with a newline', (c) => (c.interfaces[0].searchDomains = ['a.com\nnameserver 6.6.6.6'])],
    ['address without a prefix', (c) => (c.interfaces[0].addresses = ['10.0.0.5'])],
    ['uppercase MAC', (c) => (c.interfaces[0].mac = '52:54:00:12:34:5A')],
    ['IPv6 gateway', (c) => (c.interfaces[0].gateway = '2001:db8::1')],
    ['ACL path outside the list', (c) => (c.acl = [{ path: '/etc/shadow' as '/etc/hosts.allow', content: 'x' }])],
    ['host key path not matching its type', (c) => (c.hostKeys[0].path = '/etc/ssh/ssh_host_rsa_key')],
    ['public key line with a newline', (c) => (c.hostKeys[1].public = `${ed.public}\nssh-ed25519 AAAA evil`)],
    ['duplicate interface', (c) => c.interfaces.push({ ...c.interfaces[0] })],
    ['no interface', (c) => (c.interfaces = [])],
  ];
  for (const [what, mutate] of bad) {
    it(`refuses ${what}`, () => {
      const c = structuredClone(sampleConfig());
      mutate(c);
      assert.throws(() => parseCarryConfig(c), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
      assert.throws(() => render(c, 'networkd'), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
    });
  }

  it('refuses an unknown format', () => {
    assert.throws(() => render(sampleConfig(), 'wicked' as NetFormat), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
  });
});

describe('ssh host keys', () => {
  it('fingerprints like ssh-keygen -lf and writes keys ssh-keygen reads', (t) => {
    assert.match(fingerprint(ed.public), /^SHA256:[A-Za-z0-9+/]{43}$/);
    if (spawnSync('ssh-keygen', ['-?']).error) {
      t.skip('ssh-keygen not installed');
      return;
    }
    const dir = join(tmp, 'keys');
    mkdirSync(dir);
    for (const [name, k] of [
      ['ed', ed],
      ['rsa', rsa],
    ] as const) {
      writeFileSync(join(dir, name), k.private, { mode: 0o600 });
      writeFileSync(join(dir, `${name}.pub`), `${k.public}\n`);
      const lf = execFileSync('ssh-keygen', ['-lf', join(dir, `${name}.pub`)], { encoding: 'utf8' });
      assert.equal(lf.split(' ')[1], fingerprint(k.public));
      const derived = execFileSync('ssh-keygen', ['-y', '-f', join(dir, name)], { encoding: 'utf8' }).trim();
      assert.equal(derived.split(' ').slice(0, 2).join(' '), k.public.split(' ').slice(0, 2).join(' '));
    }
  });

  it('refuses a public key whose blob does not match its type', () => {
    const [, b64] = ed.public.split(' ');
    assert.throws(() => fingerprint(`ssh-rsa ${b64}`), (e) => isScError(e, 'SC_ERR_BAD_KEY'));
    assert.throws(() => fingerprint('not a key'), (e) => isScError(e, 'SC_ERR_BAD_KEY'));
  });
});

describe('XML reader', () => {
  const bad = [
    '<a><b></a></b>',
    '<!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>',
    '<a><p:b/></a>',
    '<a>fish & chips</a>',
    '<a/><b/>',
    '<a x="1" x="2"/>',
    '<a x=1/>',
    '<a>',
    'text<a/>',
    '<a><!-- a -- b --></a>',
    '<a x="<"/>',
  ];
  for (const src of bad) {
    it(`refuses ${JSON.stringify(src)}`, () => {
      assert.throws(() => parseXml(src), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
    });
  }

  it('reads text, references, CDATA and namespaces', () => {
    const el = parseXml('<?xml version="1.0"?>\n<!-- c --><r xmlns="urn:x" xmlns:p="urn:p"><p:e p:k="&lt;v&gt;">a&amp;b&#x41;<![CDATA[<raw>]]></p:e></r>\n');
    assert.equal(el.ns, 'urn:x');
    assert.equal(el.children[0].ns, 'urn:p');
    assert.equal(el.children[0].attrs['{urn:p}k'], '<v>');
    assert.equal(el.children[0].text, 'a&bA<raw>');
  });
});
