// Three-tier chains, failover between upstreams, negative caching, manifests and listings.
import assert from 'node:assert/strict';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import type { Digest } from '../../shared/digest.js';
import { silentLogger } from '../../shared/log.js';
import { type Manifest, signManifest } from '../../shared/manifest.js';
import { type Clock, realClock } from '../../services/stage/clock.js';
import type { StageConfigInput } from '../../services/stage/config.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import { type TestOrigin, httpGet, metricValue, startTestOrigin } from '../helpers/test-origin.js';
import { startTestOrigin as startRealOrigin } from '../helpers/origin.js';
import { ReadClient } from '../../services/origin/client.js';
import { Readable } from 'node:stream';
import { sha256Of } from '../../shared/digest.js';

const MiB = 1024 * 1024;
const cleanups: (() => Promise<unknown>)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

async function origin(rate: number | null = null): Promise<TestOrigin> {
  const o = await startTestOrigin({ rateBytesPerSec: rate });
  cleanups.push(() => o.close());
  return o;
}

async function stage(upstreams: string[], extra: Partial<StageConfigInput> = {}, clock?: Clock): Promise<RunningStage> {
  const dir = await mkdtemp(join(tmpdir(), 'stage-tiers-'));
  const s = await startStage(
    { listen: '127.0.0.1:0', upstreams, cache: join(dir, 'cache'), cacheSize: '256MiB', colo: 'tier', backoffMs: 10, ...extra },
    { log: silentLogger, clock },
  );
  cleanups.push(
    () => s.close(),
    () => rm(dir, { recursive: true, force: true }),
  );
  return s;
}

async function deadUrl(): Promise<string> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as AddressInfo).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return `http://127.0.0.1:${port}`;
}

const blobUpstreamRequests = async (s: RunningStage) => {
  const text = await s.metrics.metrics();
  return text
    .split('\n')
    .filter((l) => l.startsWith('stage_upstream_requests_total{') && l.includes('kind="blob"'))
    .reduce((n, l) => n + Number(l.slice(l.lastIndexOf(' ') + 1)), 0);
};

function manifestFor(d: Digest, size: number, version: string): Omit<Manifest, 'signatures'> {
  return {
    schema: 1,
    name: 'rescue-os',
    version,
    role: 'base',
    os: { id: 'debian', version: '12', family: 'linux', netFormat: 'ifupdown' },
    blob: { digest: d, size, compression: 'zstd', encryption: 'age' },
    publishedAt: new Date('2025-01-01T00:00:00Z').toISOString(),
  };
}

test('a three-level chain (colo -> region -> origin) fetches once per level', async () => {
  const o = await origin(4 * MiB);
  const region = await stage([o.url], { colo: 'region' });
  const colo = await stage([region.url], { colo: 'colo-a' });
  const data = randomBytes(3 * MiB);
  const d = o.addBlob(data);
  const rs = await Promise.all([
    ...Array.from({ length: 20 }, () => httpGet(`${colo.url}/v1/blobs/${d}`)),
    httpGet(`${colo.url}/v1/blobs/${d}`, { range: `bytes=${MiB}-${2 * MiB}` }),
    ...Array.from({ length: 5 }, () => httpGet(`${region.url}/v1/blobs/${d}`)),
  ]);
  for (const r of rs.filter((x) => x.status === 200)) assert.ok(r.complete && r.body.equals(data));
  assert.ok(rs[20].complete && rs[20].body.equals(data.subarray(MiB, 2 * MiB + 1)));
  assert.equal(o.blobGets(d), 1, 'origin: one blob request');
  assert.equal(await blobUpstreamRequests(region), 1, 'region: one upstream request');
  assert.equal(await blobUpstreamRequests(colo), 1, 'colo: one upstream request');
  assert.equal(o.bytesSent, data.length);
  // a second colo under the same region costs the origin nothing
  const colo2 = await stage([region.url], { colo: 'colo-b' });
  assert.ok((await httpGet(`${colo2.url}/v1/blobs/${d}`)).body.equals(data));
  assert.equal(o.blobGets(d), 1);
});

test('fails over to the next upstream when the first is down', async () => {
  const o = await origin();
  const dead = await deadUrl();
  const s = await stage([dead, o.url]);
  const data = randomBytes(MiB);
  const d = o.addBlob(data);
  const r = await httpGet(`${s.url}/v1/blobs/${d}`);
  assert.ok(r.complete && r.body.equals(data));
  const f = s.fills().find((x) => x.digest === d);
  assert.deepEqual(f?.sources, [o.url]);
  assert.ok((f?.resumes ?? 0) >= 1);
  // the dead one is now tried last: the next fill goes straight to the live upstream
  const d2 = o.addBlob(randomBytes(1000));
  assert.equal((await httpGet(`${s.url}/v1/blobs/${d2}`)).status, 200);
  assert.equal(s.fills().find((x) => x.digest === d2)?.resumes, 0);
});

test('a fill cut on the first upstream continues from the second with Range', async () => {
  const a = await origin(4 * MiB);
  const b = await origin(4 * MiB);
  const data = randomBytes(2 * MiB);
  const d = a.addBlob(data);
  b.addBlob(data);
  const cutAt = Math.floor(0.3 * data.length);
  a.fault({ kind: 'cut', afterBytes: cutAt });
  for (let i = 0; i < 5; i++) a.fault({ kind: 'status', status: 500 });
  const s = await stage([a.url, b.url], { retriesPerUpstream: 2 });
  const rs = await Promise.all([httpGet(`${s.url}/v1/blobs/${d}`), httpGet(`${s.url}/v1/blobs/${d}`)]);
  for (const r of rs) assert.ok(r.complete && r.body.equals(data));
  assert.equal(a.blobGets(d), 3, 'the first upstream: the cut attempt and two retries');
  assert.equal(b.blobGets(d), 1);
  assert.ok(b.requests[0].start > 0 && b.requests[0].start <= cutAt);
  assert.ok(a.bytesSent + b.bytesSent <= 1.02 * data.length);
  assert.deepEqual(s.fills().find((x) => x.digest === d)?.sources, [a.url, b.url]);
});

test('404s are remembered only for the negative TTL', async () => {
  const o = await origin();
  let offset = 0;
  const clock: Clock = { ...realClock, now: () => Date.now() + offset };
  const s = await stage([o.url], { negativeTtlMs: 5000 }, clock);
  const data = randomBytes(1000);
  const d: Digest = `sha256:${(await import('node:crypto')).createHash('sha256').update(data).digest('hex')}`;
  const r1 = await httpGet(`${s.url}/v1/blobs/${d}`);
  assert.equal(r1.status, 404);
  assert.equal(JSON.parse(r1.body.toString()).error.code, 'SC_ERR_BLOB_NOT_FOUND');
  assert.equal((await httpGet(`${s.url}/v1/blobs/${d}`)).status, 404);
  assert.equal(o.blobGets(d), 1, 'the second 404 came from the negative cache');
  o.addBlob(data);
  assert.equal((await httpGet(`${s.url}/v1/blobs/${d}`)).status, 404, 'still remembered within the TTL');
  offset += 5001;
  const r2 = await httpGet(`${s.url}/v1/blobs/${d}`);
  assert.equal(r2.status, 200);
  assert.ok(r2.body.equals(data));
  assert.equal(o.blobGets(d), 2);
  assert.equal(metricValue(await s.metrics.metrics(), 'stage_negative_hits_total'), 2);

  // manifests too
  assert.equal((await httpGet(`${s.url}/v1/bundles/rescue-os/9.9.9`)).status, 404);
  assert.equal((await httpGet(`${s.url}/v1/bundles/rescue-os/9.9.9`)).status, 404);
  assert.equal(o.manifestRequests, 1);
  const { privateKey } = generateKeyPairSync('ed25519');
  o.addManifest(signManifest(manifestFor(d, data.length, '9.9.9'), privateKey));
  offset += 5001;
  assert.equal((await httpGet(`${s.url}/v1/bundles/rescue-os/9.9.9`)).status, 200);
});

test('manifests are cached once verified; bad or untrusted signatures are refused and never cached', async () => {
  const o = await origin();
  const keys = generateKeyPairSync('ed25519');
  const other = generateKeyPairSync('ed25519');
  const dir = await mkdtemp(join(tmpdir(), 'stage-keys-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  const pub = join(dir, 'release.pub');
  await writeFile(pub, keys.publicKey.export({ type: 'spki', format: 'pem' }));
  const d = o.addBlob(randomBytes(100));
  const good = signManifest(manifestFor(d, 100, '1.0.0'), keys.privateKey);
  const tampered = { ...signManifest(manifestFor(d, 100, '1.0.1'), keys.privateKey), role: 'target' as const };
  const foreign = signManifest(manifestFor(d, 100, '1.0.2'), other.privateKey);
  for (const m of [good, tampered, foreign]) o.addManifest(m);

  const region = await stage([o.url], { colo: 'region' });
  const colo = await stage([region.url], { colo: 'colo', trustKeys: [pub] });
  const r = await httpGet(`${colo.url}/v1/bundles/rescue-os/1.0.0`);
  assert.equal(r.status, 200);
  assert.deepEqual(JSON.parse(r.body.toString()), good);
  assert.equal(r.headers['cache-control'], 'no-cache');
  const etag = String(r.headers.etag);
  assert.match(etag, /^"sha256:[0-9a-f]{64}"$/);
  assert.equal((await httpGet(`${colo.url}/v1/bundles/rescue-os/1.0.0`, { 'if-none-match': etag })).status, 304);
  assert.equal(o.manifestRequests, 1, 'cached at both levels');

  const t = await httpGet(`${colo.url}/v1/bundles/rescue-os/1.0.1`);
  assert.equal(t.status, 422);
  assert.equal(JSON.parse(t.body.toString()).error.code, 'SC_ERR_BAD_SIGNATURE');
  const f = await httpGet(`${colo.url}/v1/bundles/rescue-os/1.0.2`);
  assert.equal(f.status, 422);
  assert.equal(JSON.parse(f.body.toString()).error.code, 'SC_ERR_UNTRUSTED_KEY');
  assert.equal((await httpGet(`${colo.url}/v1/bundles/rescue-os/1.0.1`)).status, 422, 'refused again: never cached');
  assert.equal(existsSync(join(colo.config.cache, 'manifests', 'rescue-os', '1.0.1.json')), false);
  assert.equal(existsSync(join(colo.config.cache, 'manifests', 'rescue-os', '1.0.0.json')), true);

  const list = await httpGet(`${colo.url}/v1/bundles`);
  assert.equal(list.status, 200);
  const items = JSON.parse(list.body.toString()) as { name: string; version: string }[];
  assert.deepEqual(items.map((i) => i.version).sort(), ['1.0.0', '1.0.1', '1.0.2']);
});

test('the listing fails over and answers 503 with a code when no upstream answers', async () => {
  const o = await origin();
  const dead = await deadUrl();
  const s = await stage([dead, o.url]);
  assert.equal((await httpGet(`${s.url}/v1/bundles`)).status, 200);
  const lonely = await stage([await deadUrl()]);
  const r = await httpGet(`${lonely.url}/v1/bundles`);
  assert.equal(r.status, 503);
  assert.equal(JSON.parse(r.body.toString()).error.code, 'SC_ERR_NO_UPSTREAM');
  const b = await httpGet(`${lonely.url}/v1/blobs/sha256:${'a'.repeat(64)}`);
  assert.equal(b.status, 502);
  assert.equal(JSON.parse(b.body.toString()).error.code, 'SC_ERR_UPSTREAM');
});

test('with the real origin: colo -> region -> origin, one copy per level, and a ReadClient cannot tell the stage from origin', async () => {
  const real = await startRealOrigin();
  cleanups.push(() => real.close());
  const data = randomBytes(2 * MiB + 3);
  const d = sha256Of(data);
  await real.client.putBlob(Readable.from([data]), d, data.length);
  const { privateKey } = generateKeyPairSync('ed25519');
  const m = signManifest(manifestFor(d, data.length, '2.0.0'), privateKey);
  await real.client.putManifest(m);
  const region = await stage([real.url], { colo: 'region' });
  const colo = await stage([region.url], { colo: 'colo' });
  const rs = await Promise.all(Array.from({ length: 10 }, () => httpGet(`${colo.url}/v1/blobs/${d}`)));
  for (const r of rs) assert.ok(r.complete && r.body.equals(data));
  const reader = new ReadClient(colo.url);
  assert.deepEqual(await reader.getManifest('rescue-os', '2.0.0'), m);
  const { stream, status } = await reader.openBlob(d, { start: 5, end: 9 });
  const parts: Buffer[] = [];
  for await (const c of stream) parts.push(c as Buffer);
  assert.equal(status, 206);
  assert.ok(Buffer.concat(parts).equals(data.subarray(5, 10)));
  assert.equal(metricValue(await real.client.metricsText(), 'origin_blob_bytes_out_total'), data.length, 'one copy left the origin');
  assert.equal(await blobUpstreamRequests(region), 1);
  assert.equal(await blobUpstreamRequests(colo), 1);
  assert.ok((await reader.listBundles()).some((b) => b.version === '2.0.0'));
});
