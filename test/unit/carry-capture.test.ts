// Capture from OS roots as their installers write them: a sim machine of each OS flavour, and
// native variants (netmask style, sourced files, resolv.conf behind a symlink, gateway4, routes,
// [Route] sections, .link pins). Then a real carry: capture from Debian, apply into a sample
// Ubuntu root built by the codec, capture again in netplan: the same identity.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { makeSampleRootfs } from '../../shared/bundle/index.js';
import { isScError } from '../../shared/errors.js';
import { apply, capture } from '../../services/agent/carry/index.js';
import { initSimMachine, SimMachine } from '../../services/agent/machine/sim.js';

const tmp = mkdtempSync(join(tmpdir(), 'sc-capture-'));
after(() => rmSync(tmp, { recursive: true, force: true }));
let n = 0;
const dirOf = (name: string) => join(tmp, `${name}-${n++}`);

function put(root: string, rel: string, content: string): void {
  mkdirSync(join(root, rel, '..'), { recursive: true });
  writeFileSync(join(root, rel), content);
}

describe('capture from sim machines of every OS flavour', () => {
  for (const [os, fmt] of [
    ['debian-11', 'ifupdown'],
    ['ubuntu-22.04', 'netplan'],
    ['fedora-39', 'networkd'],
    ['windows-2022', 'windows-unattend'],
  ] as const) {
    it(`${os} (${fmt})`, async () => {
      const dir = dirOf(os);
      await initSimMachine(dir, {
        hostId: 'host-a1',
        ip: '10.1.2.5/23',
        gateway: '10.1.2.1',
        os,
        mac: '52:54:00:AA:BB:CC',
        nic: 'eno1',
        dns: ['10.1.0.53', '10.1.0.54'],
        search: ['colo1.example.net'],
      });
      const m = new SimMachine(dir);
      const cfg = await m.captureConfig();
      assert.equal(cfg.hostname, 'host-a1');
      assert.deepEqual(cfg.interfaces, [
        { name: 'eno1', mac: '52:54:00:aa:bb:cc', addresses: ['10.1.2.5/23'], gateway: '10.1.2.1', dns: ['10.1.0.53', '10.1.0.54'], searchDomains: ['colo1.example.net'] },
      ]);
      const sshDir = fmt === 'windows-unattend' ? 'ProgramData/ssh' : 'etc/ssh';
      const root = join(dir, 'disks/disk1/p1');
      assert.deepEqual(cfg.hostKeys, [
        {
          path: '/etc/ssh/ssh_host_ed25519_key',
          type: 'ed25519',
          private: readFileSync(join(root, sshDir, 'ssh_host_ed25519_key'), 'utf8'),
          public: readFileSync(join(root, sshDir, 'ssh_host_ed25519_key.pub'), 'utf8').trim(),
        },
      ]);
      assert.match(cfg.authorizedKeys, /^ssh-ed25519 \S+ operator@stagecoach\n$/);
      assert.deepEqual(
        cfg.acl.map((a) => a.path),
        ['/etc/hosts.allow', '/etc/hosts.deny'],
      );
      assert.match(cfg.acl[0].content, /sshd: 10\.1\.2\.0\/23/);
    });
  }
});

describe('capture of native variants', () => {
  it('ifupdown: netmask, sourced files, resolv.conf behind a symlink, MAC from a .link pin', async () => {
    const root = dirOf('ifupdown');
    put(root, 'etc/hostname', 'web1\n');
    put(root, 'etc/network/interfaces', 'auto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n');
    put(root, 'etc/network/interfaces.d/eth0', 'auto eth0\niface eth0 inet static\n  address 192.0.2.10\n  netmask 255.255.255.128\n  gateway 192.0.2.1\n\niface eth0 inet6 static\n  address 2001:db8:1::10\n  netmask 64\n');
    put(root, 'etc/network/interfaces.d/eth1', 'auto eth1\niface eth1 inet dhcp\n');
    put(root, 'run/resolvconf/resolv.conf', '# generated\nnameserver 192.0.2.53\nsearch example.org\n');
    symlinkSync('/run/resolvconf/resolv.conf', join(root, 'etc/resolv.conf')); // absolute, root-relative
    put(root, 'etc/systemd/network/70-eth0.link', '[Match]\nMACAddress=00:16:3E:00:00:10\n\n[Link]\nName=eth0\n');
    const cfg = await capture(root, 'ifupdown');
    assert.deepEqual(cfg.interfaces, [
      { name: 'eth0', mac: '00:16:3e:00:00:10', addresses: ['192.0.2.10/25', '2001:db8:1::10/64'], gateway: '192.0.2.1', dns: ['192.0.2.53'], searchDomains: ['example.org'] },
    ]);
  });

  it('ifupdown: a NIC the config does not give a MAC for takes it from the machine, else fails', async () => {
    const root = dirOf('ifupdown-nomac');
    put(root, 'etc/hostname', 'web1\n');
    put(root, 'etc/network/interfaces', 'auto ens3\niface ens3 inet static\n address 10.0.0.5/24\n');
    await assert.rejects(capture(root, 'ifupdown'), (e) => isScError(e, 'SC_ERR_BAD_CONFIG') && /MAC/.test((e as Error).message));
    const cfg = await capture(root, 'ifupdown', { nics: [{ name: 'ens3', mac: '52:54:00:00:00:05' }] });
    assert.equal(cfg.interfaces[0].mac, '52:54:00:00:00:05');
    assert.equal(cfg.interfaces[0].gateway, null);
  });

  it('netplan: files merged in order, routes to default, mapping-form addresses, /lib overridden by /etc', async () => {
    const root = dirOf('netplan');
    put(root, 'etc/hostname', 'db1\n');
    put(root, 'lib/netplan/00-base.yaml', 'network:\n  version: 2\n  ethernets:\n    id0:\n      dhcp4: true\n');
    put(root, 'etc/netplan/10-static.yaml', 'network:\n  version: 2\n  ethernets:\n    id0:\n      match: {macaddress: "00:16:3e:00:00:20"}\n      set-name: enp1s0\n      addresses:\n        - 198.51.100.7/24:\n            lifetime: forever\n');
    put(root, 'etc/netplan/20-routes.yaml', 'network:\n  ethernets:\n    id0:\n      routes:\n        - to: 0.0.0.0/0\n          via: 198.51.100.1\n      nameservers: {addresses: [198.51.100.53]}\n');
    const cfg = await capture(root, 'netplan');
    assert.deepEqual(cfg.interfaces, [{ name: 'enp1s0', mac: '00:16:3e:00:00:20', addresses: ['198.51.100.7/24'], gateway: '198.51.100.1', dns: ['198.51.100.53'], searchDomains: [] }]);
  });

  it('netplan: invalid YAML is a clear error', async () => {
    const root = dirOf('netplan-bad');
    put(root, 'etc/hostname', 'db1\n');
    put(root, 'etc/netplan/50.yaml', 'network: [unclosed\n');
    await assert.rejects(capture(root, 'netplan'), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
  });

  it('networkd: [Address] sections, [Route] gateway, name from a .link pin when [Match] has only a MAC', async () => {
    const root = dirOf('networkd');
    put(root, 'etc/hostname', 'fw1\n');
    put(root, 'etc/systemd/network/10-uplink.network', '[Match]\nMACAddress=00:16:3e:00:00:30\n\n[Network]\nDNS=203.0.113.53\nDomains=a.example ~routing.only\n\n[Address]\nAddress=203.0.113.9/28\n\n[Route]\nDestination=10.0.0.0/8\nGateway=203.0.113.2\n\n[Route]\nGateway=203.0.113.1\n');
    put(root, 'etc/systemd/network/80-dhcp.network', '[Match]\nName=en*\n\n[Network]\nDHCP=yes\n');
    put(root, 'etc/systemd/network/10-uplink.link', '[Match]\nMACAddress=00:16:3e:00:00:30\n\n[Link]\nName=uplink0\n');
    const cfg = await capture(root, 'networkd');
    assert.deepEqual(cfg.interfaces, [{ name: 'uplink0', mac: '00:16:3e:00:00:30', addresses: ['203.0.113.9/28'], gateway: '203.0.113.1', dns: ['203.0.113.53'], searchDomains: ['a.example'] }]);
  });

  it('a root without static network config or hostname is refused', async () => {
    const root = dirOf('empty');
    put(root, 'etc/hostname', 'x\n');
    await assert.rejects(capture(root, 'networkd'), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
    put(root, 'etc/systemd/network/1.network', '[Match]\nName=a\nMACAddress=00:16:3e:00:00:01\n[Network]\nAddress=10.0.0.1/8\n');
    rmSync(join(root, 'etc/hostname'));
    await assert.rejects(capture(root, 'networkd'), (e) => isScError(e, 'SC_ERR_BAD_CONFIG') && /hostname/.test((e as Error).message));
  });
});

describe('carry from one OS to another', () => {
  for (const [target, fmt] of [
    ['ubuntu', 'netplan'],
    ['fedora', 'networkd'],
    ['debian', 'ifupdown'],
    ['windows', 'windows-unattend'],
  ] as const) {
    it(`debian-11 (ifupdown) → sample ${target} root (${fmt}): same identity`, async () => {
      const dir = dirOf('carry');
      await initSimMachine(dir, { hostId: 'a7', ip: '10.0.0.7/24', gateway: '10.0.0.1', os: 'debian-11', search: ['example.com'] });
      const m = new SimMachine(dir);
      const cfg = await m.captureConfig();
      const root = dirOf(`sample-${target}`);
      await makeSampleRootfs(root, { id: target, name: target, version: '1', netFormat: fmt, sizeMiB: 0 });
      await apply(root, cfg, fmt);
      const nics = [{ name: 'ens3', mac: cfg.interfaces[0].mac }];
      assert.deepEqual(await capture(root, fmt, { nics }), cfg);
      assert.deepEqual((await apply(root, cfg, fmt)).written, []);
    });
  }
});
