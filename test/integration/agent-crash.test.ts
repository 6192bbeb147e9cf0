/**
 * The crash/reboot guarantee, with real processes: the agent runs under `stagecoach agent
 * --supervise` (a child process, restarted after every exit; sim reboots run the firmware
 * first) and is killed with SIGKILL at every step boundary and in the middle of fetch,
 * install-base and install-target (crash points, services/agent/hooks.ts: the agent freezes at
 * the point and the test kills it there). After each kill the machine must be bootable; in the
 * end the host runs C, and no finished step ran twice (the sim action log).
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { CONVERT_STEPS, convertSequence } from '../../shared/protocol/index.js';
import { SimMachine } from '../../services/agent/machine/sim.js';
import { startTestFleet, type TestFleet } from '../helpers/fleet.js';

const BIN = fileURLToPath(new URL('../../services/cli/bin.js', import.meta.url));

/** Every crash point armed in this test: each kills the agent once. */
const POINTS = [
  ...CONVERT_STEPS.filter((s) => s !== 'verify').map((s) => `${s}:after`),
  'fetch:mid',
  'install-base:mid',
  'install-target:mid',
  'boot-base:before',
  'commit-base:before',
  'boot-target:before',
];

/** The one-shot and default boot entries lead to a completely installed OS. */
async function assertBootable(m: SimMachine, at: string): Promise<void> {
  const b = await m.bootConfig();
  assert.ok(b.default, `${at}: a default entry`);
  for (const dev of [b.once, b.default]) {
    if (!dev) continue;
    const os = await m.installedOs(dev);
    assert.ok(os?.complete, `${at}: boot entry ${dev} leads to a complete OS (found ${JSON.stringify(os)})`);
  }
}

describe('agent: kill -9 at every step boundary and mid-step', () => {
  let f: TestFleet;
  let sup: ChildProcess | undefined;
  let logs = '';
  before(async () => {
    f = await startTestFleet({ colos: [{ name: 'c1', hosts: 1 }], bundleMiB: 4, agents: false });
  });
  after(async () => {
    if (sup && sup.exitCode === null && sup.signalCode === null) {
      const gone = new Promise((r) => sup!.once('exit', r));
      sup.kill('SIGTERM');
      await gone;
    }
    await f?.cleanup();
  });

  it('always ends on C, bootable after every kill, no finished step run twice', async (t) => {
    const host = f.hosts[0];
    const hooks = join(f.root, 'hooks');
    await mkdir(hooks, { recursive: true });
    for (const p of POINTS) await writeFile(join(hooks, `${p}.arm`), '');
    const args = [
      BIN,
      'agent',
      '--supervise',
      '--host-id', host.hostId,
      '--colo', host.colo,
      '--redis', f.redisUrl,
      '--machine', `sim:${host.dir}`,
      '--stages', f.stages.c1.map((s) => s.url).join(','),
      '--origin', f.origin.url,
      '--trust-key', f.keys.files.releasePub,
      '--control-key', f.keys.files.controlPub,
      '--identity', f.keys.files.fleetIdentity,
      '--prefix', f.prefix,
      '--test-hook-dir', hooks,
      '--log-level', 'warn',
    ];
    sup = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    sup.stderr!.on('data', (d: Buffer) => {
      logs += d.toString();
    });
    let ok = false;
    t.after(() => {
      if (!ok) process.stderr.write(`--- agent logs ---\n${logs.slice(-20_000)}\n`);
    });

    const ids = await f.enqueue(host.hostId, convertSequence({ name: f.base.name, version: f.base.version }, { name: f.target.name, version: f.target.version }));
    const machine = new SimMachine(host.dir);
    const killed: string[] = [];
    const deadline = Date.now() + 150_000;
    for (;;) {
      assert.ok(Date.now() < deadline, `the conversion finished in time (killed at ${killed.join(', ')})`);
      for (const name of (await readdir(hooks)).filter((n) => n.endsWith('.reached')).sort()) {
        const point = name.slice(0, -'.reached'.length);
        if (killed.includes(point)) continue;
        const pid = Number((await readFile(join(hooks, name), 'utf8')).trim());
        if (!pid) continue; // being written
        await assertBootable(machine, `killed at ${point}`);
        process.kill(pid, 'SIGKILL');
        killed.push(point);
      }
      const out = await Promise.all(ids.map((id) => f.waitJob(host.hostId, id, 1).catch(() => null)));
      const failed = out.find((o) => o?.state === 'failed');
      assert.equal(failed, undefined, `no step failed: ${failed?.id}: ${failed?.failedReason}`);
      if (out.every((o) => o?.state === 'completed')) break;
      await new Promise((r) => setTimeout(r, 25));
    }

    assert.deepEqual([...killed].sort(), [...POINTS].sort(), 'the agent was killed at every armed point');
    const ins = await f.inspect(host.hostId);
    assert.deepEqual(ins.running, { id: 'ubuntu', version: '24.04', device: 'disk1p1' });
    assert.equal(ins.bootDevice, 'disk1p1');
    assert.equal(ins.rescueEntry, 'disk2p1');
    assert.equal(ins.reboots, 2, 'exactly two reboots: kills are not reboots');

    // No finished step produced its effect twice. Steps killed in the middle (install-base,
    // install-target) legitimately format their partition again.
    const acts = await f.actions(host.hostId);
    const count = (op: string, device?: string) => acts.filter((a) => a.op === op && (device === undefined || a.device === device)).length;
    assert.equal(count('partition'), 1);
    assert.equal(count('mkfs', 'disk2p2'), 1);
    assert.equal(count('mkfs', 'disk2p1'), 2, 'install-base ran again once, after the mid-step kill');
    assert.equal(count('mark-installed', 'disk2p1'), 1);
    assert.equal(count('apply-config', 'disk2p1'), 1);
    assert.equal(count('set-boot-once', 'disk2p1'), 1);
    assert.equal(count('set-rescue', 'disk2p1'), 1);
    assert.equal(count('set-default', 'disk2p1'), 1);
    assert.equal(count('wipe', 'disk1p1'), 1);
    assert.equal(count('mkfs', 'disk1p1'), 2, 'install-target ran again once, after the mid-step kill');
    assert.equal(count('apply-config', 'disk1p1'), 1);
    assert.equal(count('mark-installed', 'disk1p1'), 1);
    assert.equal(count('set-boot-once', 'disk1p1'), 1);
    assert.equal(count('set-default', 'disk1p1'), 1);
    assert.equal(count('reboot'), 2);
    // Every job completed at its first attempt: kills and reboots are not failed attempts.
    const attempts = await Promise.all(ids.map(async (id) => (await f.waitJob(host.hostId, id)).attemptsMade));
    assert.deepEqual(attempts, ids.map(() => 1));

    // A second agent for the same machine is refused while the first one runs (exit 3).
    const second = spawn(process.execPath, args.filter((a) => a !== '--supervise'), { stdio: ['ignore', 'ignore', 'pipe'] });
    let err2 = '';
    second.stderr!.on('data', (d: Buffer) => {
      err2 += d.toString();
    });
    const code = await new Promise((r) => second.once('exit', r));
    assert.equal(code, 3, err2);
    assert.match(err2, /SC_ERR_CONFLICT/);
    ok = true;
  });
});
