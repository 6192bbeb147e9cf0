/**
 * The two-reboot OS swap on sim machines with in-process agents, a real origin, a real stage
 * and real Redis: the full conversion, a failed one-shot boot into B, and the rescue,
 * reinstall and install-other sequences.
 */
import assert from 'node:assert/strict';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Queue } from 'bullmq';
import { convertSequence, hostQueueName, installOtherSequence, reinstallSequence, rescueSequence } from '../../shared/protocol/index.js';
import { simFault } from '../../services/agent/machine/sim.js';
import { publishSampleBundle } from '../../services/demo/fleet.js';
import { startTestFleet, type TestFleet } from '../helpers/fleet.js';

const ref = (m: { name: string; version: string }) => ({ name: m.name, version: m.version });

describe('agent: OS swap', () => {
  let f: TestFleet;
  before(async () => {
    f = await startTestFleet({ colos: [{ name: 'c1', hosts: 2 }], bundleMiB: 2 });
  });
  after(async () => {
    await f?.cleanup();
  });

  it('converts A to C through B in exactly two reboots, keeping IP and host keys', async () => {
    const host = 'c1-h1';
    const before = await f.inspect(host);
    assert.equal(before.running?.device, 'disk1p1');
    assert.equal(before.running?.id, 'debian');
    const ids = await f.enqueue(host, convertSequence(ref(f.base), ref(f.target)));
    const out = await f.waitSequence(host, ids);
    assert.deepEqual(
      out.map((o) => o.state),
      ids.map(() => 'completed'),
      out.map((o) => `${o.id}: ${o.failedReason ?? o.state}`).join('\n'),
    );
    const now = await f.inspect(host);
    assert.deepEqual(now.running, { id: 'ubuntu', version: '24.04', device: 'disk1p1' });
    assert.equal(now.bootDevice, 'disk1p1');
    assert.equal(now.bootOnce, null);
    assert.equal(now.rescueEntry, 'disk2p1');
    assert.equal(now.ip, before.ip);
    assert.equal(now.hostKeyFingerprint, before.hostKeyFingerprint);
    assert.ok(now.hostKeyFingerprint);
    assert.deepEqual(now.authorizedKeys, before.authorizedKeys);
    assert.equal(now.reboots, 2);
    const p1 = now.disks.disk2.partitions.find((p) => p.device === 'disk2p1');
    assert.deepEqual(p1?.os, { id: 'debian', version: '12' });
    // Both packed bundles (and their manifests) are kept on disk2p2.
    const kept = await readdir(join(f.hosts[0].dir, 'disks/disk2/p2/stagecoach/bundles'));
    for (const m of [f.base, f.target]) {
      assert.ok(kept.includes(`${m.blob.digest.slice(7)}.bundle`), `${m.name} blob kept`);
      assert.ok(kept.includes(`${m.name}@${m.version}.manifest.json`), `${m.name} manifest kept`);
    }
    // Progress and logs also go to BullMQ.
    const q = new Queue(hostQueueName(host), { connection: f.redis, prefix: f.prefix });
    try {
      const fetchJob = await q.getJob(ids[0]);
      assert.equal((fetchJob?.progress as { percent?: number } | undefined)?.percent, 100);
      const logs = await q.getJobLogs(ids[0]);
      assert.ok(logs.logs.some((l) => l.startsWith('sources: ')), logs.logs.join('\n'));
    } finally {
      await q.close();
    }
    const verify = out[out.length - 1].returnvalue as { converted: boolean };
    assert.equal(verify.converted, true);
    // Reports: every step started and completed, the two boot steps rebooted.
    const reports = (await f.reports()).filter((r) => r.host === host);
    for (const s of ids.map((id) => id.split('.')[2])) {
      assert.ok(reports.some((r) => r.step === s && r.event === 'completed'), `${s} completed report`);
    }
    assert.equal(reports.filter((r) => r.event === 'rebooting').length, 2);
    const reg = await f.redis.hgetall(`${f.prefix}:agent:${host}`);
    assert.equal(JSON.parse(reg.colo), 'c1');
    assert.deepEqual(JSON.parse(reg.running), { id: 'ubuntu', version: '24.04', device: 'disk1p1' });
    assert.deepEqual(JSON.parse(reg.stages), [f.stages.c1[0].url]);
  });

  it('rescue then reinstall C from disk2p2, then rescue then install D through the stage', async () => {
    const host = 'c1-h1';
    const fp = (await f.inspect(host)).hostKeyFingerprint;
    let ids = await f.enqueue(host, rescueSequence());
    let out = await f.waitSequence(host, ids);
    assert.equal(out[0].state, 'completed', out[0].failedReason);
    let now = await f.inspect(host);
    assert.deepEqual(now.running, { id: 'debian', version: '12', device: 'disk2p1' });
    assert.equal(now.bootDevice, 'disk2p1');

    ids = await f.enqueue(host, reinstallSequence());
    out = await f.waitSequence(host, ids);
    assert.ok(out.every((o) => o.state === 'completed'), out.map((o) => `${o.id}: ${o.failedReason ?? o.state}`).join('\n'));
    now = await f.inspect(host);
    assert.deepEqual(now.running, { id: 'ubuntu', version: '24.04', device: 'disk1p1' });
    assert.equal(now.rescueEntry, 'disk2p1');
    assert.equal(now.hostKeyFingerprint, fp);

    const d = await publishSampleBundle(f.origin.client, f.keys, {
      name: 'other-os',
      version: '3.1',
      role: 'target',
      os: { id: 'fedora', version: '40', netFormat: 'networkd' },
      workDir: join(f.root, 'publish'),
      sizeMiB: 1,
    });
    const reboots = now.reboots;
    ids = await f.enqueue(host, installOtherSequence(ref(d)));
    out = await f.waitSequence(host, ids);
    assert.ok(out.every((o) => o.state === 'completed'), out.map((o) => `${o.id}: ${o.failedReason ?? o.state}`).join('\n'));
    now = await f.inspect(host);
    assert.deepEqual(now.running, { id: 'fedora', version: '40', device: 'disk1p1' });
    assert.equal(now.netFormat, 'networkd');
    assert.equal(now.ip, '10.1.0.11');
    assert.equal(now.hostKeyFingerprint, fp);
    assert.equal(now.reboots, reboots + 2);
    const kept = await readdir(join(f.hosts[0].dir, 'disks/disk2/p2/stagecoach/bundles'));
    assert.ok(kept.includes('other-os@3.1.manifest.json'));
  });

  it('a failed one-shot boot into B comes back to A and fails the step with SC_ERR_BOOT_FAILED', async () => {
    const host = 'c1-h2';
    const dir = f.hosts[1].dir;
    await simFault(dir, 'fail-boot', 'disk2p1', 'once');
    const ids = await f.enqueue(host, convertSequence(ref(f.base), ref(f.target)));
    const bootBase = ids.find((id) => id.endsWith('.boot-base'))!;
    const o = await f.waitJob(host, bootBase);
    assert.equal(o.state, 'failed');
    assert.match(o.failedReason ?? '', /^SC_ERR_BOOT_FAILED: /);
    assert.equal(o.attemptsMade, 1, 'a failed boot is not retried');
    const now = await f.inspect(host);
    assert.deepEqual(now.running, { id: 'debian', version: '11', device: 'disk1p1' });
    assert.equal(now.bootDevice, 'disk1p1');
    assert.equal(now.bootOnce, null);
    assert.equal(now.reboots, 1);
    // Later steps never ran: the sequence is failed from the boot on.
    const commit = await f.waitJob(host, ids.find((id) => id.endsWith('.commit-base'))!);
    assert.equal(commit.state, 'failed');
    const reports = (await f.reports()).filter((r) => r.host === host);
    assert.ok(reports.some((r) => r.step === 'boot-base' && r.event === 'failed' && r.code === 'SC_ERR_BOOT_FAILED'));
    assert.ok(!reports.some((r) => r.step === 'commit-base' && r.event === 'started'));
  });
});
