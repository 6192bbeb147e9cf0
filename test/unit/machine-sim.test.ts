// The sim machine driver: init and inspect, partitioning (idempotent), filesystems, the firmware
// (one-shot entry consumed, fall back to default, then rescue), faults, reboots through an
// injected exit action, the action log, and a two-reboot swap that keeps IP and host key.
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { makeSampleRootfs } from '../../shared/bundle/index.js';
import { isScError } from '../../shared/errors.js';
import { fingerprint } from '../../services/agent/carry/index.js';
import { RebootSignal } from '../../services/agent/machine/driver.js';
import { initSimMachine, readActionLog, readSimRunning, readSimState, SimMachine, simBoot, simClearFaults, simFault, simRebootPending } from '../../services/agent/machine/sim.js';

const tmp = mkdtempSync(join(tmpdir(), 'sc-sim-'));
after(() => rmSync(tmp, { recursive: true, force: true }));
let n = 0;

const throwingExit = (r: number): never => {
  throw new RebootSignal(r);
};

async function newMachine(os = 'debian-11'): Promise<{ dir: string; m: SimMachine }> {
  const dir = join(tmp, `m${n++}`);
  await initSimMachine(dir, { hostId: `h${n}`, ip: '10.0.0.5/24', gateway: '10.0.0.1', os });
  return { dir, m: new SimMachine(dir, { exit: throwingExit }) };
}

const code = (c: string) => (e: unknown) => isScError(e, c as Parameters<typeof isScError>[1]);

/** Reboot through the driver (the injected exit throws), then run the firmware as a supervisor would. */
async function rebootAndBoot(dir: string, m: SimMachine) {
  await assert.rejects(m.reboot(), RebootSignal);
  return simBoot(dir);
}

/** Installs a sample OS on a device the way install steps do: mkfs, unpack into mountPath, mark. */
async function installSample(m: SimMachine, device: string, id: string, version: string, netFormat: 'netplan' | 'networkd' | 'ifupdown') {
  await m.mkfs(device);
  await makeSampleRootfs(await m.mountPath(device), { id, name: id, version, netFormat, sizeMiB: 0 });
  await m.markInstalled(device, { id, version, netFormat });
}

describe('init and inspect', () => {
  it('creates OS A on disk1p1, disk2 empty, and reports the contract fields', async () => {
    const { dir, m } = await newMachine();
    const i = await m.inspect();
    for (const k of ['hostId', 'bootDevice', 'bootOnce', 'running', 'ip', 'hostKeyFingerprint', 'authorizedKeys', 'disks', 'rescueEntry']) assert.ok(k in i, `inspect has ${k}`);
    assert.equal(i.hostId, `h${n}`);
    assert.equal(i.state, 'running');
    assert.deepEqual(i.running, { id: 'debian', version: '11', device: 'disk1p1' });
    assert.equal(i.bootDevice, 'disk1p1');
    assert.equal(i.bootOnce, null);
    assert.equal(i.rescueEntry, null);
    assert.equal(i.ip, '10.0.0.5');
    assert.equal(i.gateway, '10.0.0.1');
    assert.equal(i.netFormat, 'ifupdown');
    const pub = readFileSync(join(dir, 'disks/disk1/p1/etc/ssh/ssh_host_ed25519_key.pub'), 'utf8');
    assert.equal(i.hostKeyFingerprint, fingerprint(pub));
    assert.equal(i.authorizedKeys.length, 1);
    assert.deepEqual(i.disks.disk2, { partitions: [] });
    assert.deepEqual(i.disks.disk1.partitions, [{ device: 'disk1p1', name: 'p1', role: 'os-root', filesystem: 'ext4', empty: false, os: { id: 'debian', version: '11' } }]);
    assert.equal(i.reboots, 0);
    assert.equal(i.problems, undefined);
    for (const f of ['etc/os-release', 'etc/network/interfaces', 'etc/ssh/ssh_host_ed25519_key', 'root/.ssh/authorized_keys', 'etc/hosts.allow', 'etc/resolv.conf']) {
      assert.ok(existsSync(join(dir, 'disks/disk1/p1', f)), f);
    }
    assert.deepEqual(readdirSync(join(dir, 'disks/disk2')), []);
  });

  it('fingerprint matches ssh-keygen -lf (when installed)', async (t) => {
    if (spawnSync('ssh-keygen', ['-?']).error) {
      t.skip('ssh-keygen not installed');
      return;
    }
    const { dir, m } = await newMachine('fedora-39');
    const out = execFileSync('ssh-keygen', ['-lf', join(dir, 'disks/disk1/p1/etc/ssh/ssh_host_ed25519_key')], { encoding: 'utf8' });
    assert.equal(out.split(' ')[1], (await m.inspect()).hostKeyFingerprint);
  });

  it('refuses a non-empty directory and bad options', async () => {
    const dir = join(tmp, `busy${n++}`);
    mkdirSync(dir);
    writeFileSync(join(dir, 'x'), '');
    await assert.rejects(initSimMachine(dir, { hostId: 'a', ip: '10.0.0.5/24', gateway: '10.0.0.1' }), code('SC_ERR_FILE_EXISTS'));
    await assert.rejects(initSimMachine(join(tmp, 'x1'), { hostId: 'a', ip: '10.0.0.5', gateway: '10.0.0.1' }), code('SC_ERR_BAD_CONFIG'));
    await assert.rejects(initSimMachine(join(tmp, 'x2'), { hostId: 'A B', ip: '10.0.0.5/24', gateway: '10.0.0.1' }), code('SC_ERR_BAD_CONFIG'));
    await assert.rejects(initSimMachine(join(tmp, 'x3'), { hostId: 'a', ip: '10.0.0.5/24', gateway: '10.0.0.1', os: 'debian' }), code('SC_ERR_BAD_CONFIG'));
    await assert.rejects(new SimMachine(join(tmp, 'nothing-here')).inspect(), code('SC_ERR_NOT_FOUND'));
  });
});

describe('disks', () => {
  const layout = [
    { name: 'p1', role: 'rescue-root' as const },
    { name: 'p2', role: 'bundle-store' as const },
  ];

  it('partition is idempotent: the same layout again is a no-op', async () => {
    const { dir, m } = await newMachine();
    assert.deepEqual(await m.partition('disk2', layout), { changed: true });
    await m.mkfs('disk2p2');
    writeFileSync(join(await m.mountPath('disk2p2'), 'keep'), 'data');
    assert.deepEqual(await m.partition('disk2', layout), { changed: false });
    assert.equal(readFileSync(join(await m.mountPath('disk2p2'), 'keep'), 'utf8'), 'data', 'a no-op keeps the data');
    assert.equal((await readActionLog(dir)).filter((a) => a.op === 'partition').length, 1);
    const parts = (await m.disks()).find((d) => d.name === 'disk2')!.partitions;
    assert.deepEqual(
      parts.map((p) => [p.device, p.role, p.filesystem, p.empty]),
      [
        ['disk2p1', 'rescue-root', null, true],
        ['disk2p2', 'bundle-store', 'ext4', false],
      ],
    );
    // A different layout replaces the table and its contents.
    assert.deepEqual(await m.partition('disk2', [{ name: 'p1', role: 'bundle-store' }]), { changed: true });
    await assert.rejects(m.mountPath('disk2p2'), code('SC_ERR_NO_DEVICE'));
    assert.equal(await m.isEmpty('disk2p1'), true);
  });

  it('refuses the running disk, bad names and bad layouts', async () => {
    const { m } = await newMachine();
    await assert.rejects(m.partition('disk1', layout), code('SC_ERR_CONFLICT'));
    await assert.rejects(m.partition('disk3', layout), code('SC_ERR_NO_DEVICE'));
    await assert.rejects(m.partition('../x', layout), code('SC_ERR_NO_DEVICE'));
    await assert.rejects(m.partition('disk2', [{ name: 'p2', role: 'rescue-root' }]), code('SC_ERR_BAD_CONFIG'));
    await assert.rejects(m.partition('disk2', [{ name: 'p1', role: 'swap' as 'rescue-root' }]), code('SC_ERR_BAD_CONFIG'));
    await assert.rejects(m.partition('disk2', [{ name: 'p1', role: 'rescue-root', sizeMiB: 200000 }]), code('SC_ERR_BAD_CONFIG'));
    await assert.rejects(m.mkfs('disk1p1'), code('SC_ERR_CONFLICT'));
    await assert.rejects(m.wipe('disk1p1'), code('SC_ERR_CONFLICT'));
    await assert.rejects(m.mkfs('disk2p1'), code('SC_ERR_NO_DEVICE'));
    await assert.rejects(m.mountPath('disk2p9'), code('SC_ERR_NO_DEVICE'));
    await assert.rejects(m.setBootOnce('disk2p1'), code('SC_ERR_NO_DEVICE'));
    await assert.rejects(m.setDefault('/etc/passwd'), code('SC_ERR_NO_DEVICE'));
  });

  it('mkfs, mountPath, isEmpty, markInstalled, installedOs, wipe', async () => {
    const { dir, m } = await newMachine();
    await m.partition('disk2', layout);
    await assert.rejects(m.mountPath('disk2p1'), code('SC_ERR_CONFLICT'));
    assert.equal(await m.isEmpty('disk2p1'), true);
    assert.equal(await m.installedOs('disk2p1'), null);
    await m.mkfs('disk2p1');
    const root = await m.mountPath('disk2p1');
    assert.equal(root, join(dir, 'disks/disk2/p1'));
    assert.equal(await m.isEmpty('disk2p1'), true);
    await makeSampleRootfs(root, { id: 'rescue', name: 'Rescue', version: '1.0', netFormat: 'networkd', sizeMiB: 0 });
    assert.equal(await m.isEmpty('disk2p1'), false);
    assert.deepEqual(await m.installedOs('disk2p1'), { id: 'rescue', version: '1.0', netFormat: 'ifupdown', complete: false });
    await m.markInstalled('disk2p1', { id: 'rescue', version: '1.0', netFormat: 'networkd' });
    await m.markInstalled('disk2p1', { id: 'rescue', version: '1.0', netFormat: 'networkd' });
    assert.deepEqual(await m.installedOs('disk2p1'), { id: 'rescue', version: '1.0', netFormat: 'networkd', complete: true });
    assert.equal((await readActionLog(dir)).filter((a) => a.op === 'mark-installed').length, 1, 'the same mark twice is one effect');
    await m.wipe('disk2p1');
    await m.wipe('disk2p1');
    assert.equal(existsSync(root), false);
    assert.equal(await m.installedOs('disk2p1'), null);
    await assert.rejects(m.mountPath('disk2p1'), code('SC_ERR_CONFLICT'));
    assert.equal((await readActionLog(dir)).filter((a) => a.op === 'wipe').length, 1, 'wiping nothing is no effect');
  });
});

describe('firmware and reboots', () => {
  it('reboot records state, ends the agent through the exit action, and simBoot runs the firmware', async () => {
    const { dir, m } = await newMachine();
    await assert.rejects(m.reboot(), (e) => e instanceof RebootSignal && e.reboots === 1);
    assert.equal(await simRebootPending(dir), true);
    assert.equal((await readSimRunning(dir)).state, 'rebooting');
    await assert.rejects(m.running(), code('SC_ERR_BOOT_FAILED'));
    const r = await simBoot(dir);
    assert.equal(r.booted, true);
    assert.deepEqual(r.running, { id: 'debian', version: '11', device: 'disk1p1' });
    assert.equal(await simRebootPending(dir), false);
    // Nothing pending: the supervisor's call on a plain restart is a no-op.
    assert.equal((await simBoot(dir)).booted, false);
    assert.equal((await simBoot(dir, { force: true })).booted, true);
    assert.equal((await m.inspect()).reboots, 1);
    await rebootAndBoot(dir, m);
    assert.equal((await m.inspect()).reboots, 2);
    const state = await readSimState(dir);
    assert.equal(state.boots, 4);
  });

  it('a one-shot entry is used once, then the default again', async () => {
    const { dir, m } = await newMachine();
    await m.partition('disk2', [
      { name: 'p1', role: 'rescue-root' },
      { name: 'p2', role: 'bundle-store' },
    ]);
    await installSample(m, 'disk2p1', 'rescue', '1.0', 'networkd');
    await m.setBootOnce('disk2p1');
    assert.deepEqual(await m.bootConfig(), { default: 'disk1p1', once: 'disk2p1', rescue: null });
    const r1 = await rebootAndBoot(dir, m);
    assert.deepEqual(r1.running, { id: 'rescue', version: '1.0', device: 'disk2p1' });
    assert.equal(r1.fellBack, false);
    assert.deepEqual(await m.bootConfig(), { default: 'disk1p1', once: null, rescue: null });
    const r2 = await rebootAndBoot(dir, m);
    assert.equal(r2.running?.device, 'disk1p1');
  });

  it('a one-shot boot into a device without an OS falls back to the default entry', async () => {
    const { dir, m } = await newMachine();
    await m.partition('disk2', [{ name: 'p1', role: 'rescue-root' }]);
    await m.mkfs('disk2p1'); // empty filesystem: no os-release
    await m.setBootOnce('disk2p1');
    const r = await rebootAndBoot(dir, m);
    assert.equal(r.running?.device, 'disk1p1');
    assert.equal(r.fellBack, true);
    assert.deepEqual(r.record?.tried, [
      { device: 'disk2p1', ok: false, reason: 'no bootable OS (no etc/os-release)' },
      { device: 'disk1p1', ok: true },
    ]);
    const i = await m.inspect();
    assert.equal(i.bootOnce, null, 'the one-shot entry is consumed even though it failed');
    assert.equal(i.lastBoot?.booted, 'disk1p1');
  });

  it('a fail-boot fault makes boots from that device fall back until cleared; --once only the next', async () => {
    const { dir, m } = await newMachine();
    await m.partition('disk2', [{ name: 'p1', role: 'rescue-root' }]);
    await installSample(m, 'disk2p1', 'rescue', '1.0', 'networkd');
    await simFault(dir, 'fail-boot', 'disk2p1');
    for (let i = 0; i < 2; i++) {
      await m.setBootOnce('disk2p1');
      const r = await rebootAndBoot(dir, m);
      assert.equal(r.running?.device, 'disk1p1');
      assert.equal(r.record?.tried[0].reason, 'fail-boot fault (always)');
    }
    await simClearFaults(dir);
    await m.setBootOnce('disk2p1');
    assert.equal((await rebootAndBoot(dir, m)).running?.device, 'disk2p1');
    await simFault(dir, 'fail-boot', 'disk2p1', 'once');
    await m.setDefault('disk2p1');
    await m.setRescueEntry('disk1p1');
    assert.equal((await rebootAndBoot(dir, m)).running?.device, 'disk1p1', 'the default fails: the rescue entry boots');
    assert.equal((await rebootAndBoot(dir, m)).running?.device, 'disk2p1', 'a once fault is consumed');
    await assert.rejects(simFault(dir, 'fail-boot', 'sda1'), code('SC_ERR_NO_DEVICE'));
  });

  it('concurrent updates from one process are serialised (no lost update)', async () => {
    const { dir, m } = await newMachine();
    await Promise.all([
      ...Array.from({ length: 9 }, (_, i) => simFault(dir, 'fail-boot', `disk2p${i + 1}`)),
      m.setRescueEntry('disk1p1'),
      new SimMachine(`${dir}/.`).setBootOnce('disk1p1'),
    ]);
    const s = await readSimState(dir);
    assert.equal(Object.keys(s.faults.failBoot).length, 9);
    assert.deepEqual(s.boot, { default: 'disk1p1', once: 'disk1p1', rescue: 'disk1p1' });
  });

  it('no bootable entry leaves the machine down, and inspect says so', async () => {
    const { dir, m } = await newMachine();
    await simFault(dir, 'fail-boot', 'disk1p1');
    const r = await rebootAndBoot(dir, m);
    assert.equal(r.running, null);
    const i = await m.inspect();
    assert.equal(i.state, 'down');
    assert.equal(i.running, null);
    assert.equal(i.ip, null);
    await assert.rejects(m.running(), code('SC_ERR_BOOT_FAILED'));
  });
});

describe('a two-reboot swap through the driver', () => {
  it('keeps IP and host key when the config is carried, and shows the loss when it is not', async () => {
    const { dir, m } = await newMachine('debian-11');
    const before = await m.inspect();
    await m.partition('disk2', [
      { name: 'p1', role: 'rescue-root' },
      { name: 'p2', role: 'bundle-store' },
    ]);
    await installSample(m, 'disk2p1', 'rescue', '1.0', 'networkd');
    await m.mkfs('disk2p2');
    const cfg = await m.captureConfig();
    writeFileSync(join(await m.mountPath('disk2p2'), 'carry.json'), JSON.stringify(cfg));
    await m.applyConfig('disk2p1', cfg, 'networkd');
    await m.applyConfig('disk2p1', cfg, 'networkd');
    await m.setBootOnce('disk2p1');
    await rebootAndBoot(dir, m);
    const onB = await m.inspect();
    assert.deepEqual(onB.running, { id: 'rescue', version: '1.0', device: 'disk2p1' });
    assert.equal(onB.netFormat, 'networkd');
    assert.equal(onB.ip, before.ip);
    assert.equal(onB.hostKeyFingerprint, before.hostKeyFingerprint);
    await m.setDefault('disk2p1');
    await m.setRescueEntry('disk2p1');
    await m.wipe('disk1p1');
    await installSample(m, 'disk1p1', 'ubuntu', '24.04', 'netplan');
    const carried = JSON.parse(readFileSync(join(await m.mountPath('disk2p2'), 'carry.json'), 'utf8'));
    await m.applyConfig('disk1p1', carried, 'netplan');
    await m.setDefault('disk1p1');
    await rebootAndBoot(dir, m);
    const onC = await m.inspect();
    assert.deepEqual(onC.running, { id: 'ubuntu', version: '24.04', device: 'disk1p1' });
    assert.equal(onC.ip, before.ip);
    assert.equal(onC.hostKeyFingerprint, before.hostKeyFingerprint);
    assert.deepEqual(onC.authorizedKeys, before.authorizedKeys);
    assert.equal(onC.rescueEntry, 'disk2p1');
    assert.equal(onC.reboots, 2);
    assert.deepEqual(await m.bootPath(), ['disk1p1', 'disk2p1', 'disk1p1'], 'the boot path the demo shows: A, then B, then C');
    const ops = (await readActionLog(dir)).map((a) => a.op);
    assert.equal(ops.filter((o) => o === 'apply-config').length, 2, 'applying the same config twice is one effect');
    assert.equal(ops.filter((o) => o === 'reboot').length, 2);

    // Without the carry-over the new OS comes up without the host's identity, and inspect shows it.
    await m.wipe('disk2p1'); // not running: C runs from disk1p1
    await installSample(m, 'disk2p1', 'rescue', '2.0', 'networkd');
    await m.setBootOnce('disk2p1');
    await rebootAndBoot(dir, m);
    const lost = await m.inspect();
    assert.equal(lost.running?.device, 'disk2p1');
    assert.equal(lost.ip, null);
    assert.equal(lost.hostKeyFingerprint, null);
    assert.ok(lost.problems?.some((p) => p.startsWith('network')));
  });
});
