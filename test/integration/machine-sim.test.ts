// The sim machine from the outside: the `stagecoach machine` CLI (init, inspect --json, fault,
// reboot, error exits), and machine.json surviving a kill -9 of a process that is busy
// rewriting it and the disks, while another process reads it.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, describe, it } from 'node:test';
import { pathToFileURL } from 'node:url';
import { initSimMachine, readSimState, SimMachine, simBoot } from '../../services/agent/machine/sim.js';

const tmp = mkdtempSync(join(tmpdir(), 'sc-simint-'));
after(() => rmSync(tmp, { recursive: true, force: true }));
const BIN = resolve('services/cli/bin.js');

function cli(...args: string[]) {
  const r = spawnSync(process.execPath, [BIN, 'machine', ...args], { encoding: 'utf8', timeout: 60_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('stagecoach machine (CLI)', () => {
  it('init, inspect --json, fault fail-boot, reboot, and coded errors', () => {
    const dir = join(tmp, 'cli');
    const init = cli('init', dir, '--host-id', 'a1', '--ip', '10.9.0.5/24', '--gateway', '10.9.0.1', '--os', 'ubuntu-22.04');
    assert.equal(init.code, 0, init.stderr);
    assert.match(init.stdout, /booted ubuntu 22\.04 from disk1p1/);

    const i = JSON.parse(cli('inspect', dir, '--json').stdout);
    assert.equal(i.hostId, 'a1');
    assert.equal(i.bootDevice, 'disk1p1');
    assert.equal(i.bootOnce, null);
    assert.deepEqual(i.running, { id: 'ubuntu', version: '22.04', device: 'disk1p1' });
    assert.equal(i.ip, '10.9.0.5');
    assert.match(i.hostKeyFingerprint, /^SHA256:/);
    assert.deepEqual(Object.keys(i.disks), ['disk1', 'disk2']);
    assert.equal(i.rescueEntry, null);

    assert.equal(cli('fault', dir, 'fail-boot', 'disk1p1').code, 0);
    const down = cli('reboot', dir);
    assert.equal(down.code, 0, down.stderr);
    assert.match(down.stdout, /machine is down: disk1p1: fail-boot fault/);
    assert.equal(cli('fault', dir, 'clear').code, 0);
    assert.match(cli('boot', dir).stdout, /booted ubuntu 22\.04 from disk1p1/);
    assert.equal(JSON.parse(cli('inspect', dir, '--json').stdout).reboots, 1);

    const bad = cli('fault', dir, 'fail-boot', '../../etc');
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /^error SC_ERR_NO_DEVICE: /);
    const again = cli('init', dir, '--host-id', 'a1', '--ip', '10.9.0.5/24', '--gateway', '10.9.0.1');
    assert.equal(again.code, 1);
    assert.match(again.stderr, /^error SC_ERR_FILE_EXISTS: /);
    const none = cli('inspect', join(tmp, 'missing'));
    assert.equal(none.code, 1);
    assert.match(none.stderr, /^error SC_ERR_NOT_FOUND: /);

    const log = cli('log', dir, '--json');
    assert.deepEqual(
      JSON.parse(log.stdout).map((a: { op: string }) => a.op),
      ['init', 'boot', 'fault', 'reboot', 'boot', 'clear-faults', 'boot'],
    );
  });
});

describe('machine.json under kill -9', () => {
  it('a process killed while rewriting state and disks leaves a readable machine; readers never see a torn file', async () => {
    const dir = join(tmp, 'atomic');
    await initSimMachine(dir, { hostId: 'k1', ip: '10.0.0.5/24', gateway: '10.0.0.1' });
    for (let i = 0; i < 40; i++) await simBoot(dir, { force: true }); // a long boot log: a bigger file to tear
    const simUrl = pathToFileURL(resolve('services/agent/machine/sim.ts')).href;
    const child = join(tmp, 'writer.mts');
    writeFileSync(
      child,
      `import { SimMachine, simFault, simClearFaults } from ${JSON.stringify(simUrl)};
const dir = process.argv[2];
const m = new SimMachine(dir);
const layouts = [[{ name: 'p1', role: 'rescue-root' }, { name: 'p2', role: 'bundle-store' }], [{ name: 'p1', role: 'bundle-store' }]];
for (let i = 0; ; i++) {
  await m.partition('disk2', layouts[i % 2]);
  await m.mkfs('disk2p1');
  const { writeFile } = await import('node:fs/promises');
  await writeFile((await m.mountPath('disk2p1')) + '/blob', Buffer.alloc(256 * 1024, i));
  await m.setBootOnce(i % 2 ? 'disk1p1' : 'disk2p1');
  await simFault(dir, 'fail-boot', 'disk2p1');
  await simClearFaults(dir);
  if (i === 5) process.stdout.write('ready\\n');
}
`,
    );
    const proc = spawn(process.execPath, ['--import', 'tsx', child, dir], { stdio: ['ignore', 'pipe', 'inherit'] });
    const exited = new Promise<void>((r) => proc.once('exit', () => r()));
    try {
      await new Promise<void>((res, rej) => {
        proc.stdout.on('data', (d: Buffer) => d.toString().includes('ready') && res());
        proc.once('exit', (c) => rej(new Error(`writer exited early (${c})`)));
      });
      // Read concurrently with the writer: every read must parse and validate.
      // …and contend for the write lock from this process (the firmware cleans leftovers under it).
      const here = new SimMachine(dir);
      for (let i = 0; i < 400; i++) {
        JSON.parse(readFileSync(join(dir, 'machine.json'), 'utf8'));
        await readSimState(dir);
        if (i % 20 === 0) await simBoot(dir, { force: true });
        if (i % 20 === 10) await here.setRescueEntry('disk1p1');
        await new Promise((r) => setImmediate(r));
      }
      assert.equal(proc.exitCode, null, 'the writer survived the contention');
    } finally {
      proc.kill('SIGKILL');
      await exited;
    }

    const s = await readSimState(dir);
    assert.equal(s.hostId, 'k1');
    // The firmware takes over a lock left by the dead writer, clears leftovers, and boots.
    const r = await simBoot(dir, { force: true });
    assert.equal(r.running?.device, 'disk1p1');
    assert.deepEqual(
      readdirSync(dir).filter((e) => e.startsWith('.tmp-') || e.startsWith('.trash-') || e === 'machine.lock'),
      [],
    );
    // The driver carries on from whatever the disks were left in.
    const m = new SimMachine(dir);
    await m.partition('disk2', [
      { name: 'p1', role: 'rescue-root' },
      { name: 'p2', role: 'bundle-store' },
    ]);
    await m.mkfs('disk2p1');
    assert.equal(await m.isEmpty('disk2p1'), true);
    assert.ok(existsSync(join(dir, 'disks/disk2/p1')));
  });
});
