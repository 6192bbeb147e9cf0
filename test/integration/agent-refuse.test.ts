/**
 * What the agent refuses, before anything touches the machine: jobs that are forged, expired,
 * addressed to another host or unsigned, jobs of an aborted rollout; and bundles whose manifest
 * signature or blob digest fails, which are never installed.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { mkdir, open, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Queue } from 'bullmq';
import { convertSequence, hostQueueName, requestAbort, signStepJob, type StepPayload } from '../../shared/protocol/index.js';
import { createSimHosts, packBundleFile, startFleetAgents, type FleetAgents } from '../../services/demo/fleet.js';
import { makeSampleRootfs } from '../../shared/bundle/index.js';
import type { Manifest } from '../../shared/manifest.js';
import { silentLogger } from '../../shared/log.js';
import { startAgent } from '../../services/agent/runtime.js';
import { startTestFleet, type TestFleet } from '../helpers/fleet.js';
import { startTestOrigin, type TestOrigin } from '../helpers/test-origin.js';

const ref = (m: { name: string; version: string }) => ({ name: m.name, version: m.version });

async function flipByte(path: string, offset: number): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, offset);
    b[0] ^= 0xff;
    await fh.write(b, 0, 1, offset);
  } finally {
    await fh.close();
  }
}

describe('agent: refusals', () => {
  let f: TestFleet;
  let queue: Queue;
  const host = 'c1-h1';
  before(async () => {
    f = await startTestFleet({ colos: [{ name: 'c1', hosts: 1 }] });
    queue = new Queue(hostQueueName(host), { connection: f.redis, prefix: f.prefix });
  });
  after(async () => {
    await queue?.close();
    await f?.cleanup();
  });

  it('refuses forged, expired, misaddressed and unsigned jobs with SC_ERR_JOB_REJECTED and touches no disk', async () => {
    const actionsBefore = (await f.actions(host)).length;
    const payload = (over: Partial<StepPayload> = {}): StepPayload => ({
      host,
      rollout: 'evil',
      seq: 0,
      total: 1,
      step: 'partition',
      args: {},
      exp: Date.now() + 3_600_000,
      nonce: randomBytes(16).toString('base64url'),
      ...over,
    });
    const other = generateKeyPairSync('ed25519').privateKey;
    const jobs: [string, unknown, string][] = [
      ['forged', signStepJob(payload(), other), 'bad-signature'],
      ['expired', signStepJob(payload({ exp: Date.now() - 1000 }), f.keys.controlKey), 'expired'],
      ['misaddressed', signStepJob(payload({ host: 'c1-h2' }), f.keys.controlKey), 'wrong-host'],
      ['unsigned', { payload: payload() }, 'unsigned'],
      ['tampered', { ...signStepJob(payload(), f.keys.controlKey), payload: { ...payload(), step: 'wipe-target-disk' } }, 'bad-signature'],
    ];
    for (const [id, data] of jobs) await queue.add('partition', data, { jobId: id, attempts: 3, backoff: { type: 'fixed', delay: 10 } });
    for (const [id, , reason] of jobs) {
      const o = await f.waitJob(host, id);
      assert.equal(o.state, 'failed', id);
      assert.match(o.failedReason ?? '', /^SC_ERR_JOB_REJECTED: /, id);
      assert.equal(o.attemptsMade, 1, `${id} is not retried`);
      const rep = (await f.reports()).find((r) => r.event === 'refused' && r.message && r.code === 'SC_ERR_JOB_REJECTED' && r.rollout === 'evil' && r.step);
      assert.ok(rep, `${id} (${reason}) reported as refused`);
    }
    const refused = (await f.reports()).filter((r) => r.event === 'refused');
    assert.equal(refused.length, jobs.length);
    assert.equal((await f.actions(host)).length, actionsBefore, 'no driver action');
    const ins = await f.inspect(host);
    assert.deepEqual(ins.disks.disk2.partitions, []);
    assert.equal(ins.running?.device, 'disk1p1');
  });

  it('refuses to start a second agent for the same machine', async () => {
    const h = f.hosts[0];
    await assert.rejects(
      startAgent(
        {
          hostId: h.hostId,
          colo: h.colo,
          redis: f.redisUrl,
          machine: `sim:${h.dir}`,
          trustKey: [f.keys.files.releasePub],
          controlKey: f.keys.files.controlPub,
          identity: f.keys.files.fleetIdentity,
          prefix: f.prefix,
        },
        { logger: silentLogger },
      ),
      (err: { code?: string }) => err.code === 'SC_ERR_CONFLICT',
    );
  });

  it('stops an aborted rollout at the step boundary with SC_ERR_ABORTED', async () => {
    const actionsBefore = (await f.actions(host)).length;
    await requestAbort(f.redis, f.prefix, host, 'r-aborted');
    const ids = await f.enqueue(host, convertSequence(ref(f.base), ref(f.target)), { rollout: 'r-aborted' });
    const first = await f.waitJob(host, ids[0]);
    assert.equal(first.state, 'failed');
    assert.match(first.failedReason ?? '', /^SC_ERR_ABORTED: /);
    assert.equal(first.attemptsMade, 1);
    const last = await f.waitJob(host, ids[ids.length - 1]);
    assert.equal(last.state, 'failed');
    assert.match(last.failedReason ?? '', /^SC_ERR_STEP_FAILED: not run/);
    assert.equal((await f.actions(host)).length, actionsBefore, 'no driver action');
    await f.redis.hdel(`${f.prefix}:hostctl:${host}`, 'abort');
  });
});

describe('agent: bundles that fail verification are never installed', () => {
  let f: TestFleet;
  let src: TestOrigin;
  let agents: FleetAgents;
  let good: { base: Manifest; target: Manifest; baseFile: string; targetFile: string };
  let forged: Manifest;
  before(async () => {
    f = await startTestFleet({ colos: [{ name: 'c1', hosts: 1 }], agents: false });
    // A source we control: it serves correct bundles, a manifest signed by a foreign key, and
    // (on request) flipped bytes.
    src = await startTestOrigin();
    const work = join(f.root, 'work');
    await mkdir(work, { recursive: true });
    const mk = async (name: string, role: 'base' | 'target', os: { id: string; version: string; netFormat: 'ifupdown' | 'netplan' }, signingKey?: Parameters<typeof packBundleFile>[1]['signingKey']) => {
      const dir = join(work, `${name}-tree`);
      await makeSampleRootfs(dir, { id: os.id, name: os.id, version: os.version, netFormat: os.netFormat, sizeMiB: 1 });
      const file = join(work, `${name}.bundle`);
      const m = await packBundleFile(f.keys, { name, version: '1', role, dir, os, signingKey }, file);
      await src.addBlobFile(file);
      src.addManifest(m);
      return { m, file };
    };
    const b = await mk('base-os', 'base', { id: 'debian', version: '12', netFormat: 'ifupdown' });
    const t = await mk('target-os', 'target', { id: 'ubuntu', version: '24.04', netFormat: 'netplan' });
    good = { base: b.m, target: t.m, baseFile: b.file, targetFile: t.file };
    forged = (await mk('forged-os', 'base', { id: 'debian', version: '12', netFormat: 'ifupdown' }, generateKeyPairSync('ed25519').privateKey)).m;
    const hosts = await createSimHosts(join(f.root, 'more'), [{ name: 'x', hosts: 3 }]);
    f.hosts.push(...hosts);
    agents = await startFleetAgents(hosts, { redisUrl: f.redisUrl, prefix: f.prefix, keys: f.keys, stages: { x: [src.url] } });
  });
  after(async () => {
    await agents?.stop();
    await src?.close();
    await f?.cleanup();
  });

  const stateDir = (h: string) => join(f.hosts.find((x) => x.hostId === h)!.dir, 'disks/disk1/p1/var/lib/stagecoach/bundles');

  it('a manifest signed by an untrusted key: the fetch fails, nothing is downloaded or unpacked', async () => {
    const h = 'x-h1';
    const ids = await f.enqueue(h, convertSequence(ref(forged), ref(good.target)));
    const o = await f.waitJob(h, ids[0]);
    assert.equal(o.state, 'failed');
    assert.match(o.failedReason ?? '', /^SC_ERR_UNTRUSTED_KEY: /);
    assert.equal(o.attemptsMade, 1, 'a signature failure is not retried');
    assert.equal(src.blobGets(), 0, 'no blob was requested');
    const ins = await f.inspect(h);
    assert.deepEqual(ins.disks.disk2.partitions, []);
  });

  it('a blob that fails its digest at every attempt: the fetch fails after its retries, nothing is kept or unpacked', async () => {
    const h = 'x-h2';
    src.resetCounters();
    for (let i = 0; i < 3; i++) src.fault({ kind: 'flip', offset: 1000, digest: good.base.blob.digest });
    const ids = await f.enqueue(h, convertSequence(ref(good.base), ref(good.target)));
    const o = await f.waitJob(h, ids[0]);
    assert.equal(o.state, 'failed');
    assert.match(o.failedReason ?? '', /^SC_ERR_DIGEST_MISMATCH: /);
    assert.equal(o.attemptsMade, 3, 'retried with backoff, then failed');
    assert.equal(src.blobGets(good.base.blob.digest), 3);
    const files = await readdir(stateDir(h)).catch(() => []);
    assert.ok(!files.some((n) => n.endsWith('.bundle')), `no verified blob: ${files}`);
    assert.deepEqual((await f.inspect(h)).disks.disk2.partitions, []);
  });

  it('a kept blob changed on disk before install-base: the step fails on its digest and disk2p1 is left wiped, nothing installed', async () => {
    const h = 'x-h3';
    const steps = convertSequence(ref(good.base), ref(good.target));
    const first = await f.enqueue(h, steps.slice(0, 2)); // fetch, partition
    for (const o of await f.waitSequence(h, first)) assert.equal(o.state, 'completed', o.failedReason);
    // Corrupt the kept copy of B on disk2p2 (as at-rest damage or tampering would).
    const kept = join(f.hosts.find((x) => x.hostId === h)!.dir, 'disks/disk2/p2/stagecoach/bundles');
    await mkdir(kept, { recursive: true });
    const { copyFile } = await import('node:fs/promises');
    await copyFile(join(stateDir(h), `${good.base.blob.digest.slice(7)}.bundle`), join(kept, `${good.base.blob.digest.slice(7)}.bundle`));
    await copyFile(join(stateDir(h), `base-os@1.manifest.json`), join(kept, 'base-os@1.manifest.json'));
    await flipByte(join(kept, `${good.base.blob.digest.slice(7)}.bundle`), 5000);
    const second = await f.enqueue(h, steps.slice(2, 3)); // install-base
    const o = await f.waitJob(h, second[0]);
    assert.equal(o.state, 'failed');
    assert.match(o.failedReason ?? '', /^SC_ERR_DIGEST_MISMATCH: /);
    assert.equal(o.attemptsMade, 1);
    // The digest is checked in the pass that unpacks: whatever that pass wrote is wiped again.
    const p1 = (await f.inspect(h)).disks.disk2.partitions.find((p) => p.device === 'disk2p1');
    assert.equal(p1?.filesystem, null, 'disk2p1 is left without a filesystem');
    assert.equal(p1?.empty, true);
    const ops = (await f.actions(h)).filter((a) => a.device === 'disk2p1').map((a) => a.op);
    assert.deepEqual(ops.slice(-2), ['mkfs', 'wipe'], `disk2p1: ${ops}`);
    assert.ok(!ops.includes('mark-installed'), 'never marked installed');
  });
});
