/**
 * A fleet converted by control: 40 sim hosts in 4 colos, two colos in relay mode (hosts without
 * Redis, their stage runs the colo relay) and two in direct mode. Invariants, not times: every
 * host converted; origin blob bytes = bundle bytes × colos; the in-flight limits held; Redis
 * connections within the documented bound (2 per direct host, 0 per relay host, 3 per relay),
 * counted in CLIENT LIST by connection name.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Redis } from 'ioredis';
import { type Fleet, startFleet } from '../../services/demo/fleet.js';
import { counterValue } from '../../services/demo/demo.js';
import { readAllReports, readHosts } from '../../shared/protocol/index.js';
import { ControlClient } from '../../services/control/client.js';
import { type RunningControl, startControl } from '../../services/control/main.js';
import { ReadClient } from '../../services/origin/client.js';
import { silentLogger } from '../../shared/log.js';
import { deletePrefix, REDIS_URL } from './control-fixture.js';
import { until } from '../helpers/fleet.js';

const TAG = randomBytes(3).toString('hex');
const COLOS = ['a', 'b', 'c', 'd'].map((c) => `f${TAG}${c}`);
const RELAY = COLOS.slice(0, 2);
const MAX_IN_FLIGHT = 12;
const PER_COLO = 4;

/** Largest number of [start, end] intervals open at once. */
function maxOverlap(iv: [number, number][]): number {
  const ev = iv.flatMap(([s, e]) => [
    [s, 1],
    [e, -1],
  ]);
  ev.sort((x, y) => x[0] - y[0] || x[1] - y[1]);
  let cur = 0;
  let max = 0;
  for (const [, d] of ev) {
    cur += d;
    max = Math.max(max, cur);
  }
  return max;
}

describe('fleet: 40 hosts in 4 colos, half of them through relays', () => {
  let root: string;
  let fleet: Fleet;
  let control: RunningControl;
  let redis: Redis;
  before(async () => {
    root = mkdtempSync(join(tmpdir(), 'sc-fleet-test-'));
    redis = new Redis(REDIS_URL, { maxRetriesPerRequest: null });
    fleet = await startFleet({
      root,
      redisUrl: REDIS_URL,
      prefix: `t-fleet-${TAG}`,
      colos: COLOS.map((name) => ({ name, hosts: 10 })),
      bundleMiB: 1,
      relayColos: RELAY,
      heartbeatMs: 1000,
    });
    writeFileSync(join(root, 'control.tokens'), 'ops:fleet-test-token\n');
    control = await startControl(
      {
        listen: '127.0.0.1:0',
        redis: REDIS_URL,
        origin: fleet.origin.url,
        tokenFile: join(root, 'control.tokens'),
        signingKey: fleet.keys.files.controlKey,
        prefix: fleet.prefix,
        trustKey: [fleet.keys.files.releasePub],
        tickMs: 100,
        logLevel: 'silent',
      },
      { logger: silentLogger },
    );
    await until(async () => (await readHosts(redis, fleet.prefix)).length === 40, 60_000, 'every host registered');
  });
  after(async () => {
    await control?.close();
    await fleet?.close();
    if (fleet) await deletePrefix(redis, fleet.prefix);
    redis?.disconnect();
    if (root) rmSync(root, { recursive: true, force: true });
  });

  it('stays within the Redis connection bound while idle', async () => {
    const hosts = await readHosts(redis, fleet.prefix);
    assert.equal(hosts.filter((h) => h.transport === 'relay').length, 20, 'relay colos registered as relay');
    assert.ok(hosts.filter((h) => RELAY.includes(h.colo)).every((h) => h.transport === 'relay'));
    const names = ((await redis.client('LIST')) as string)
      .split('\n')
      .map((l) => /(?:^| )name=(\S*)/.exec(l)?.[1] ?? '')
      .filter((n) => n.includes(TAG));
    const direct = names.filter((n) => n.startsWith('agent:'));
    const relays = names.filter((n) => n.startsWith('relay:'));
    const relayWriters = names.filter((n) => n.startsWith('relay-writes:'));
    const bullNamed = names.filter((n) => n.startsWith(`${fleet.prefix}:`));
    // Relay hosts hold no connection at all; a direct host holds its own and its Worker's blocking one.
    for (const c of RELAY) assert.ok(!direct.some((n) => n.includes(`agent:${c}-`)), `no connection of a relay host in ${c}`);
    assert.equal(direct.length, 20, 'one named connection per direct host');
    assert.equal(relays.length, RELAY.length, 'one named connection per relay');
    assert.equal(relayWriters.length, RELAY.length, 'one connection for its own writes per relay');
    assert.ok(names.length <= 2 * 20 + 3 * RELAY.length, `at most 2 per direct host + 3 per relay; saw ${names.length}: ${[...new Set(bullNamed)].length} BullMQ-named`);
  });

  it('converts every host within the in-flight limits, one origin copy per colo', async () => {
    const api = new ControlClient(control.url, { token: 'fleet-test-token', actor: 'test' });
    const r = await api.createRollout({
      base: `${fleet.base.name}@${fleet.base.version}`,
      target: `${fleet.target.name}@${fleet.target.version}`,
      colos: COLOS,
      plan: { canary: 1, waves: ['50%', '100%'], maxInFlight: MAX_IN_FLIGHT, maxInFlightPerColo: PER_COLO, failureBudget: 0 },
    });
    const done = await until(
      async () => {
        const d = await api.rollout(r.spec.id);
        return ['completed', 'failed', 'aborted'].includes(d.status.state) ? d : null;
      },
      150_000,
      'the rollout',
    );
    assert.equal(done.status.state, 'completed');
    const inR = new Set(done.hosts.map((h) => h.host));
    assert.equal(done.status.counts.converted, 40, JSON.stringify({ missing: fleet.hosts.filter((h) => !inR.has(h.hostId)).map((h) => h.hostId), hostsNow: (await api.hosts({})).length, waves: done.spec.waves.map((w) => w.length) }));
    for (const h of fleet.hosts) {
      const m = await import('../../services/agent/machine/sim.js').then((s) => new s.SimMachine(h.dir).inspect());
      assert.deepEqual(m.running, { id: 'ubuntu', version: '24.04', device: 'disk1p1' }, h.hostId);
    }
    // One copy of each bundle per colo left the origin.
    const egress = counterValue(await new ReadClient(fleet.origin.url).metricsText(), 'origin_blob_bytes_out_total');
    assert.equal(egress, (fleet.base.blob.size + fleet.target.blob.size) * COLOS.length);
    // In-flight limits: each host's first step start → last step completion lies inside its
    // in-flight window, so these intervals never overlap more than the limits.
    const all = await readAllReports(redis, fleet.prefix);
    const reps = all.filter((x) => x.rollout === r.spec.id);
    const iv = new Map<string, [number, number]>();
    for (const x of reps) {
      const cur = iv.get(x.host) ?? [Number.POSITIVE_INFINITY, 0];
      if (x.event === 'started') cur[0] = Math.min(cur[0], x.ts);
      if (x.event === 'completed') cur[1] = Math.max(cur[1], x.ts);
      iv.set(x.host, cur);
    }
    const missing = fleet.hosts.filter((h) => !iv.has(h.hostId)).map((h) => h.hostId);
    assert.equal(iv.size, 40, `reports of ${missing.join(',')}: ${JSON.stringify(all.filter((x) => missing.includes(x.host)).slice(0, 5))} / rollout ${r.spec.id}`);
    assert.ok(maxOverlap([...iv.values()]) <= MAX_IN_FLIGHT, 'maxInFlight held');
    for (const c of COLOS) {
      const inColo = [...iv].filter(([h]) => h.startsWith(`${c}-`)).map(([, v]) => v);
      assert.ok(maxOverlap(inColo) <= PER_COLO, `maxInFlightPerColo held in ${c}`);
    }
  });

  it("bull-board shows the relay colos' queues and the direct hosts' queues", async () => {
    const names = await until(
      async () => {
        const r = await fetch(`${control.url}/queues/api/queues?page=1&jobsPerPage=1`, { headers: { authorization: 'Bearer fleet-test-token' } });
        const n = ((await r.json()) as { queues: { name: string }[] }).queues.map((q) => q.name);
        return n.includes(`colo.${RELAY[0]}`) && n.includes(`colo.${RELAY[1]}`) ? n : null;
      },
      20_000,
      'the board',
    );
    assert.ok(names.includes(`host.${COLOS[2]}-h1`), 'a direct host has its queue');
    assert.ok(!names.some((n) => n.startsWith(`host.${RELAY[0]}-`)), 'relay hosts have no queue of their own');
  });
});
