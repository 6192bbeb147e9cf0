// Restart (committed blobs served, partial fills resumed), the byte budget, pass-through.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { silentLogger } from '../../shared/log.js';
import type { StageConfigInput } from '../../services/stage/config.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import { type TestOrigin, httpGet, metricValue, startTestOrigin, waitFor } from '../helpers/test-origin.js';

const MiB = 1024 * 1024;
const cleanups: (() => Promise<unknown>)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'stage-persist-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

async function origin(rate: number | null): Promise<TestOrigin> {
  const o = await startTestOrigin({ rateBytesPerSec: rate });
  cleanups.push(() => o.close());
  return o;
}

async function stage(o: TestOrigin, cache: string, extra: Partial<StageConfigInput> = {}): Promise<RunningStage> {
  const s = await startStage(
    { listen: '127.0.0.1:0', upstreams: [o.url], cache, cacheSize: '256MiB', colo: 'persist', token: 't', backoffMs: 10, ...extra },
    { log: silentLogger },
  );
  cleanups.push(() => s.close());
  return s;
}

const prefetch = (s: RunningStage, d: string) =>
  fetch(`${s.url}/v1/prefetch`, { method: 'POST', body: JSON.stringify({ digests: [d] }), headers: { 'content-type': 'application/json', authorization: 'Bearer t' } });

test('after a restart, committed blobs are served with no upstream request and partial fills resume from their length', async () => {
  const o = await origin(null);
  const cache = join(await tempDir(), 'cache');
  const done = o.addBlob(randomBytes(2 * MiB + 7));
  const s1 = await stage(o, cache);
  const first = await httpGet(`${s1.url}/v1/blobs/${done}`);
  assert.equal(first.status, 200);
  await waitFor(() => s1.fills().some((f) => f.digest === done && f.state === 'committed'), 10_000, 'commit');

  // a fill interrupted by the stop
  const data = randomBytes(4 * MiB);
  const partial = o.addBlob(data);
  o.setRate(2 * MiB);
  assert.equal((await prefetch(s1, partial)).status, 202);
  await waitFor(() => s1.fills().some((f) => f.digest === partial && f.bytes >= MiB), 20_000, 'partial fill');
  await s1.close();
  const have = (await stat(join(cache, 'partial', partial.slice(7)))).size;
  assert.ok(have >= MiB && have < data.length, `partial holds ${have}`);
  o.setRate(8 * MiB);
  o.resetCounters();

  const s2 = await stage(o, cache);
  const again = await httpGet(`${s2.url}/v1/blobs/${done}`);
  assert.ok(again.complete && again.body.equals(first.body));
  assert.equal(o.blobGets(done), 0, 'a committed blob is served without refetch');

  const f = await waitFor(() => s2.fills().find((x) => x.digest === partial && x.state !== 'filling'), 20_000, 'resumed fill');
  assert.equal(f.state, 'committed');
  assert.equal(o.blobGets(partial), 1);
  assert.equal(o.requests[0].range, `bytes=${have}-`, 'resumed from the partial length');
  assert.equal(o.bytesSent, data.length - have);
  const r = await httpGet(`${s2.url}/v1/blobs/${partial}`);
  assert.ok(r.complete && r.body.equals(data));
  assert.equal(o.blobGets(partial), 1);
  assert.deepEqual(await readdir(join(cache, 'partial')), []);
});

test('eviction under the byte budget never deletes a blob under its reader', async () => {
  const o = await origin(null);
  const cache = join(await tempDir(), 'cache');
  const s = await stage(o, cache, { cacheSize: 40 * MiB });
  const a = randomBytes(24 * MiB);
  const b = randomBytes(20 * MiB);
  const da = o.addBlob(a);
  const db = o.addBlob(b);
  assert.ok((await httpGet(`${s.url}/v1/blobs/${da}`)).body.equals(a));
  const fileA = join(cache, 'blobs', da.slice(7));
  await waitFor(() => existsSync(fileA), 10_000, 'A committed');

  // a slow reader of A: reads one chunk, then pauses
  let resume!: () => void;
  const reader = new Promise<Buffer>((resolve, reject) => {
    const req = request(`${s.url}/v1/blobs/${da}`, { agent: false }, (res) => {
      const parts: Buffer[] = [];
      res.on('data', (c: Buffer) => {
        parts.push(c);
        if (parts.length === 1) {
          res.pause();
          resume = () => res.resume();
        }
      });
      res.on('end', () => resolve(Buffer.concat(parts)));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  });
  await waitFor(() => resume !== undefined, 10_000, 'reader paused');

  const rb = await httpGet(`${s.url}/v1/blobs/${db}`);
  assert.ok(rb.complete && rb.body.equals(b));
  let m = await s.metrics.metrics();
  assert.equal(metricValue(m, 'stage_evictions_total'), 1);
  assert.equal(metricValue(m, 'stage_cache_deferred_bytes'), a.length);
  assert.ok(existsSync(fileA), 'the evicted file stays while read');

  resume();
  const got = await reader;
  assert.ok(got.equals(a), 'the reader completes with the right bytes');
  await waitFor(() => !existsSync(fileA), 5000, 'evicted file deleted');
  m = await s.metrics.metrics();
  assert.equal(metricValue(m, 'stage_cache_deferred_bytes'), 0);
  assert.equal(metricValue(m, 'stage_cache_bytes'), b.length);
  // A is gone from the cache: asking again fetches it again
  assert.ok((await httpGet(`${s.url}/v1/blobs/${da}`)).body.equals(a));
  assert.equal(o.blobGets(da), 2);
});

test('a blob larger than the whole budget is passed through, verified, counted, not cached', async () => {
  const o = await origin(8 * MiB);
  const cache = join(await tempDir(), 'cache');
  const s = await stage(o, cache, { cacheSize: MiB });
  const data = randomBytes(2 * MiB);
  const d = o.addBlob(data);
  const rs = await Promise.all([httpGet(`${s.url}/v1/blobs/${d}`), httpGet(`${s.url}/v1/blobs/${d}`, { range: 'bytes=100-199' })]);
  assert.ok(rs[0].complete && rs[0].body.equals(data));
  assert.ok(rs[1].complete && rs[1].body.equals(data.subarray(100, 200)));
  assert.equal(o.blobGets(d), 1, 'concurrent requests still share one fetch');
  const m = await s.metrics.metrics();
  assert.equal(metricValue(m, 'stage_passthrough_total'), 1);
  assert.equal(metricValue(m, 'stage_cache_bytes'), 0);
  assert.deepEqual(await readdir(join(cache, 'blobs')), []);
  await waitFor(async () => (await readdir(join(cache, 'tmp'))).length === 0, 5000, 'pass-through file removed');
  assert.ok((await httpGet(`${s.url}/v1/blobs/${d}`)).body.equals(data));
  assert.equal(o.blobGets(d), 2, 'not cached: fetched again');
});

test('a flipped byte in a pass-through aborts the response', async () => {
  const o = await origin(8 * MiB);
  const s = await stage(o, join(await tempDir(), 'cache'), { cacheSize: MiB });
  const data = randomBytes(2 * MiB);
  const d = o.addBlob(data);
  o.fault({ kind: 'flip', offset: 10 });
  const r = await httpGet(`${s.url}/v1/blobs/${d}`);
  assert.equal(r.complete, false);
  assert.equal(metricValue(await s.metrics.metrics(), 'stage_digest_failures_total'), 1);
});

test('a fill that runs out of upstreams keeps its partial; the next request continues it', async () => {
  const o = await origin(8 * MiB);
  const cache = join(await tempDir(), 'cache');
  const s = await stage(o, cache, { maxAttempts: 3, retriesPerUpstream: 5 });
  const data = randomBytes(2 * MiB);
  const d = o.addBlob(data);
  const cutAt = MiB + 17;
  o.fault({ kind: 'cut', afterBytes: cutAt });
  for (let i = 0; i < 3; i++) o.fault({ kind: 'status', status: 503 });
  const r1 = await httpGet(`${s.url}/v1/blobs/${d}`);
  assert.equal(r1.complete, false, 'the client of a failed fill sees an aborted body');
  assert.equal(s.fills().find((f) => f.digest === d)?.state, 'failed');
  const have = (await stat(join(cache, 'partial', d.slice(7)))).size;
  assert.ok(have > 0 && have <= cutAt);
  o.resetCounters();
  const r2 = await httpGet(`${s.url}/v1/blobs/${d}`);
  assert.ok(r2.complete && r2.body.equals(data));
  assert.equal(o.requests[0].range, `bytes=${have}-`);
  assert.equal(o.bytesSent, data.length - have);
});
