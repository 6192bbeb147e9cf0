// A stage's /healthz reports its upstreams and `degraded`, and hosts rank and leave degraded stages.
// Real servers on 127.0.0.1 port 0: test origins (services' read API), stages, and a TCP proxy that
// can freeze (a link that goes silent without closing).
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer as createHttpServer } from 'node:http';
import { createConnection, createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import type { StageConfigInput } from '../../services/stage/config.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import type { UpstreamHealth } from '../../services/stage/upstreams.js';
import { fetchBlob, selectSources } from '../../shared/fetch.js';
import { silentLogger } from '../../shared/log.js';
import { type TestOrigin, httpGet, metricValue, startTestOrigin, waitFor } from '../helpers/test-origin.js';
import { countingSleep } from './fetch-fixture.js';

const MiB = 1024 * 1024;
/** Upper bound for a stage to notice a dead upstream: checks every 3 s, down after 2 failures of at most 2 s. */
const DETECT_MS = 30_000;

const cleanups: (() => Promise<unknown>)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c().catch(() => undefined);
});

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'stage-health-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

async function origin(opts: { port?: number; rateBytesPerSec?: number } = {}): Promise<TestOrigin> {
  const o = await startTestOrigin(opts);
  cleanups.push(() => o.close());
  return o;
}

async function stage(upstreams: string[], extra: Partial<StageConfigInput> = {}): Promise<RunningStage> {
  const dir = await tempDir();
  const s = await startStage({ listen: '127.0.0.1:0', upstreams, cache: join(dir, 'cache'), cacheSize: '64MiB', colo: 'health', backoffMs: 10, ...extra }, { log: silentLogger });
  cleanups.push(() => s.close());
  return s;
}

interface Health {
  ok: boolean;
  status: string;
  upstreams: string[];
  upstreamHealth: UpstreamHealth[];
}

async function health(s: RunningStage): Promise<{ httpStatus: number; body: Health }> {
  const r = await httpGet(`${s.url}/healthz`);
  return { httpStatus: r.status, body: JSON.parse(r.body.toString()) as Health };
}

const waitStatus = (s: RunningStage, status: 'ok' | 'degraded') => waitFor(async () => (await health(s)).body.status === status, DETECT_MS, `stage ${status}`);

/** Blob requests the stage answered (any status), from its own metrics. */
async function stageBlobRequests(s: RunningStage): Promise<number> {
  const text = await s.metrics.metrics();
  return text
    .split('\n')
    .filter((l) => l.startsWith('stage_http_requests_total{') && l.includes('/v1/blobs/'))
    .reduce((n, l) => n + Number(l.slice(l.lastIndexOf(' ') + 1)), 0);
}

/**
 * A TCP proxy to `target`. `freeze()` makes the link silent without closing anything: open
 * connections stop forwarding, new ones are accepted and never answered.
 */
async function freezableProxy(targetPort: number): Promise<{ url: string; freeze(): void; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  let frozen = false;
  const pairs: [Socket, Socket][] = [];
  const srv = createServer((client) => {
    sockets.add(client);
    client.on('error', () => {});
    if (frozen) return;
    const up = createConnection({ host: '127.0.0.1', port: targetPort });
    sockets.add(up);
    up.on('error', () => client.destroy());
    client.on('close', () => up.destroy());
    up.on('close', () => client.destroy());
    client.pipe(up);
    up.pipe(client);
    pairs.push([client, up]);
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as { port: number }).port;
  const p = {
    url: `http://127.0.0.1:${port}`,
    freeze() {
      frozen = true;
      for (const [c, u] of pairs) {
        c.unpipe(u);
        u.unpipe(c);
        c.pause();
        u.pause();
      }
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => srv.close(() => r()));
    },
  };
  cleanups.push(() => p.close());
  return p;
}

test('a stage whose upstream stops reports degraded (still HTTP 200), serves hits, refuses misses at once, and recovers', async () => {
  const up = await origin();
  const s = await stage([up.url]);
  const cached = randomBytes(256 * 1024);
  const dc = up.addBlob(cached);
  assert.ok((await httpGet(`${s.url}/v1/blobs/${dc}`)).complete);

  const h0 = await health(s);
  assert.equal(h0.httpStatus, 200);
  assert.equal(h0.body.ok, true);
  assert.equal(h0.body.status, 'ok');
  assert.deepEqual(h0.body.upstreams, [up.url], 'the order list keeps its shape');
  assert.equal(h0.body.upstreamHealth[0].url, up.url);
  assert.equal(h0.body.upstreamHealth[0].reachable, true);
  assert.ok(h0.body.upstreamHealth[0].answeredAt);

  const port = up.port;
  await up.close();
  await waitStatus(s, 'degraded');
  const h1 = await health(s);
  assert.equal(h1.httpStatus, 200, 'degraded is not a 503: load balancers keep a stage that serves its cache');
  assert.equal(h1.body.ok, true);
  const u = h1.body.upstreamHealth[0];
  assert.equal(u.reachable, false);
  assert.ok(u.failures >= 2);
  assert.equal(u.lastError, 'ECONNREFUSED');
  assert.ok(u.checkedAt && u.answeredAt && u.lastErrorAt);
  assert.ok(Date.parse(u.checkedAt) >= Date.parse(u.answeredAt));
  const m = await s.metrics.metrics();
  assert.equal(metricValue(m, 'stage_degraded'), 1);
  assert.equal(metricValue(m, 'stage_upstream_up'), 0);

  // /healthz answers from state: many calls, no probe each.
  const checksBefore = metricValue(await s.metrics.metrics(), 'stage_upstream_checks_total');
  await Promise.all(Array.from({ length: 20 }, () => health(s)));
  assert.ok(metricValue(await s.metrics.metrics(), 'stage_upstream_checks_total') - checksBefore <= 2, 'at most a background round, not a check per /healthz');

  // A hit is served; a miss is refused at once with the same answer as a failed fill.
  const hit = await httpGet(`${s.url}/v1/blobs/${dc}`);
  assert.ok(hit.complete && hit.body.equals(cached));
  const miss = await httpGet(`${s.url}/v1/blobs/sha256:${'b'.repeat(64)}`);
  assert.equal(miss.status, 502);
  const err = JSON.parse(miss.body.toString()).error;
  assert.equal(err.code, 'SC_ERR_UPSTREAM');
  assert.equal(err.details.degraded, true);
  assert.equal((await httpGet(`${s.url}/v1/bundles`)).status, 503);
  assert.ok(!s.fills().some((f) => f.digest === `sha256:${'b'.repeat(64)}`), 'no fill was started for the miss');

  // The upstream comes back on the same address: the background check notices.
  const back = await origin({ port });
  await waitStatus(s, 'ok');
  const h2 = await health(s);
  assert.equal(h2.body.upstreamHealth[0].reachable, true);
  assert.equal(h2.body.upstreamHealth[0].failures, 0);
  assert.equal(metricValue(await s.metrics.metrics(), 'stage_degraded'), 0);
  const d2 = back.addBlob(randomBytes(1000));
  assert.equal((await httpGet(`${s.url}/v1/blobs/${d2}`)).status, 200, 'misses are filled again');
});

test('a stage is degraded only when no upstream answers', async () => {
  const up = await origin();
  const dead = await origin();
  const s = await stage([dead.url, up.url]);
  await dead.close();
  await waitFor(async () => (await health(s)).body.upstreamHealth[0].reachable === false, DETECT_MS, 'first upstream down');
  const h = await health(s);
  assert.equal(h.body.status, 'ok');
  assert.equal(h.body.upstreamHealth[1].reachable, true);
  assert.equal(metricValue(await s.metrics.metrics(), 'stage_degraded'), 0);
});

test('host: [degraded stage, healthy stage] ranks the healthy one first and fetches through it', async () => {
  const o = await origin();
  const deadUp = await origin();
  const data = randomBytes(MiB);
  const d = o.addBlob(data);
  const degraded = await stage([deadUp.url]);
  const healthy = await stage([o.url]);
  await deadUp.close();
  await waitStatus(degraded, 'degraded');

  const sel = await selectSources([degraded.url, healthy.url], { origin: o.url });
  assert.deepEqual(sel.stages, [healthy.url, degraded.url], 'degraded after healthy, whatever the RTT');
  assert.deepEqual(sel.sources, [healthy.url, degraded.url, o.url]);
  const p = sel.probes.find((x) => x.url === degraded.url);
  assert.equal(p?.degraded, true);
  assert.equal(p?.healthy, true);

  const dir = await tempDir();
  const backoff = countingSleep();
  const r = await fetchBlob({ sources: sel.stages, origin: sel.origin, digest: d, size: data.length, out: join(dir, 'out'), sleep: backoff.sleep });
  assert.ok((await readFile(r.path)).equals(data));
  assert.deepEqual(r.sources, [healthy.url]);
  assert.equal(await stageBlobRequests(degraded), 0, 'the degraded stage was not asked');
  assert.equal(o.blobGets(d), 1, 'one upstream copy, by the healthy stage');
});

test('host: the only stage is degraded and lacks the blob: origin serves it after one refused request, no idle wait, no backoff', async () => {
  const o = await origin();
  const deadUp = await origin();
  const data = randomBytes(MiB);
  const d = o.addBlob(data);
  const s = await stage([deadUp.url]);
  await deadUp.close();
  await waitStatus(s, 'degraded');

  const sel = await selectSources([s.url], { origin: o.url });
  assert.deepEqual(sel.sources, [s.url, o.url], 'still a candidate: it serves what it holds');
  const dir = await tempDir();
  const backoff = countingSleep();
  const r = await fetchBlob({
    sources: sel.stages,
    origin: sel.origin,
    digest: d,
    size: data.length,
    out: join(dir, 'out'),
    // An idle wait would outlast the test: completing proves the stage was left on its answer.
    idleTimeoutMs: 600_000,
    sleep: backoff.sleep,
    signal: AbortSignal.timeout(120_000),
  });
  assert.ok((await readFile(r.path)).equals(data));
  assert.deepEqual(r.sources, [o.url]);
  assert.equal(await stageBlobRequests(s), 1, 'one request to the degraded stage');
  assert.equal(metricValue(await s.metrics.metrics(), 'stage_bytes_served_total'), 0);
  assert.equal(backoff.calls, 0, 'origin joined at once, without a backoff pass');
  assert.equal(o.blobGets(d), 1);
});

test('host: a degraded stage still serves a blob it has cached; origin is not asked', async () => {
  const o = await origin();
  const up = await origin();
  const data = randomBytes(MiB);
  const d = up.addBlob(data);
  o.addBlob(data);
  const s = await stage([up.url]);
  assert.ok((await httpGet(`${s.url}/v1/blobs/${d}`)).complete, 'warm the stage');
  await up.close();
  await waitStatus(s, 'degraded');

  const sel = await selectSources([s.url], { origin: o.url });
  const dir = await tempDir();
  const r = await fetchBlob({ sources: sel.stages, origin: sel.origin, digest: d, size: data.length, out: join(dir, 'out') });
  assert.ok((await readFile(r.path)).equals(data));
  assert.deepEqual(r.sources, [s.url]);
  assert.equal(o.blobGets(d), 0);
});

test('host: a stage that goes silent mid-body is left once it reports degraded, and origin serves the rest with Range', async () => {
  const o = await origin({ rateBytesPerSec: 4 * MiB });
  const data = randomBytes(8 * MiB);
  const d = o.addBlob(data);
  const link = await freezableProxy(o.port);
  // The stage's own idle timeout is long: only its upstream checks can tell the link is dead.
  const s = await stage([link.url], { idleTimeoutMs: 600_000 });
  const dir = await tempDir();
  let frozenAt = -1;
  const r = await fetchBlob({
    sources: [s.url],
    origin: o.url,
    digest: d,
    size: data.length,
    out: join(dir, 'out'),
    idleTimeoutMs: 600_000,
    stallCheckMs: 300,
    probeTimeoutMs: 1000,
    signal: AbortSignal.timeout(120_000),
    onProgress: (p) => {
      if (frozenAt < 0 && p.source === s.url && p.bytes >= MiB) {
        frozenAt = p.bytes;
        link.freeze();
      }
    },
  });
  assert.ok((await readFile(r.path)).equals(data));
  assert.ok(frozenAt > 0);
  assert.deepEqual(r.sources, [s.url, o.url]);
  assert.equal((await health(s)).body.status, 'degraded');
  const fromHost = o.requests.filter((q) => q.range !== undefined && q.start > 0);
  assert.equal(fromHost.length, 1, 'origin was asked once, for the rest');
  assert.ok(fromHost[0].start >= MiB);
});

test('host: a stage that goes silent and stops answering /healthz is left at the idle timeout (a timed-out check is busy, not down), and origin serves the rest', async () => {
  const o = await origin({ rateBytesPerSec: 4 * MiB });
  const data = randomBytes(8 * MiB);
  const d = o.addBlob(data);
  const s = await stage([o.url]);
  // The host reaches the stage through a link that goes silent (a stage machine gone without a FIN).
  const link = await freezableProxy(s.port);
  const dir = await tempDir();
  const backoff = countingSleep();
  let frozen = false;
  const r = await fetchBlob({
    sources: [link.url],
    origin: o.url,
    digest: d,
    size: data.length,
    out: join(dir, 'out'),
    // Its /healthz checks time out, which means busy, not down: each request to it ends at the
    // idle timeout, and origin joins once 1 + retries passes made no progress.
    idleTimeoutMs: 2000,
    stallCheckMs: 300,
    probeTimeoutMs: 500,
    retries: 1,
    sleep: backoff.sleep,
    signal: AbortSignal.timeout(120_000),
    onProgress: (p) => {
      if (!frozen && p.source === link.url && p.bytes >= MiB) {
        frozen = true;
        link.freeze();
      }
    },
  });
  assert.ok((await readFile(r.path)).equals(data));
  assert.deepEqual(r.sources, [link.url, o.url]);
  assert.equal(backoff.calls, 1, 'the silent stage had its retry pass before origin joined');
  const fromHost = o.requests.filter((q) => q.range !== undefined && q.start > 0);
  assert.equal(fromHost.length, 1, 'origin was asked once, for the rest');
  assert.ok(fromHost[0].start >= MiB);
  assert.equal((await health(s)).body.status, 'ok', 'the stage itself is fine');
});

test('busy is not down: an upstream whose /healthz does not answer while a fill from it receives bytes keeps the stage ok, and the fill completes', async () => {
  // 8 MiB at 1 MiB/s: the fill runs ~8 s, through at least two background checks (every 3 s,
  // 2 s deadline) that time out; without the rule they would mark the stage degraded and end it.
  const up = await origin({ rateBytesPerSec: MiB });
  const data = randomBytes(8 * MiB);
  const d = up.addBlob(data);
  const s = await stage([up.url]);
  up.hangHealth(true);
  const got = await httpGet(`${s.url}/v1/blobs/${d}`);
  assert.ok(got.complete, 'the host got the whole blob');
  assert.ok(got.body.equals(data));
  const h = await health(s);
  assert.equal(h.body.status, 'ok', 'the stage never took the busy upstream for a dead one');
  assert.equal(h.body.upstreamHealth[0].reachable, true);
  const metrics = (await httpGet(`${s.url}/metrics`)).body.toString('utf8');
  const busy = metrics.split('\n').filter((l) => l.startsWith('stage_upstream_checks_total{') && l.includes('outcome="busy"'));
  assert.ok(busy.length === 1 && Number(busy[0].slice(busy[0].lastIndexOf(' ') + 1)) >= 1, `a timed-out check during the fill counted as busy:\n${busy.join('\n')}`);
  up.hangHealth(false);
});

test('background checks reuse one pooled connection to the upstream; an answer over the size limit, or one whose body stalls, is a failure with its own code', async () => {
  // A plain upstream that counts its connections and answers /healthz: a check that closed its
  // connection would open one per check (and cost the stage a TCP handshake and a socket each time).
  let connections = 0;
  let checks = 0;
  let answer: 'ok' | 'huge' | 'stall' = 'ok';
  const srv = createHttpServer((req, res) => {
    if (req.url !== '/healthz') return void res.writeHead(404).end();
    checks++;
    res.setHeader('content-type', 'application/json');
    if (answer === 'stall') return void res.writeHead(200, { 'content-length': '100' }).write('{"ok":');
    res.end(answer === 'huge' ? Buffer.alloc(1024 * 1024 + 1, 0x20) : JSON.stringify({ ok: true, status: 'ok' }));
  });
  srv.keepAliveTimeout = 60_000;
  srv.on('connection', () => connections++);
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  cleanups.push(() => new Promise((r) => srv.close(r)));
  const url = `http://127.0.0.1:${(srv.address() as { port: number }).port}`;
  const s = await stage([url], { upstreamCheckIntervalMs: 50, upstreamCheckTimeoutMs: 300 });
  await waitFor(async () => checks >= 6, 10_000, 'six background checks');
  assert.equal(connections, 1, `${checks} checks took ${connections} connections`);
  const h = await health(s);
  assert.equal(h.body.upstreamHealth[0].reachable, true);
  assert.equal(h.body.status, 'ok');
  // A body over the small-document limit is not an answer: the upstream goes down, the stage degraded.
  answer = 'huge';
  await waitStatus(s, 'degraded');
  assert.equal((await health(s)).body.upstreamHealth[0].lastError, 'SC_ERR_UPSTREAM');
  // Back up, then an answer whose body stops halfway: a timed-out check, named as such.
  answer = 'ok';
  await waitStatus(s, 'ok');
  answer = 'stall';
  await waitStatus(s, 'degraded');
  assert.equal((await health(s)).body.upstreamHealth[0].lastError, 'SC_ERR_TIMEOUT');
});
