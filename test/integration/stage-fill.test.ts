// Fill once, coalescing, mid-fill joins, resume after a cut or a stall, digest failures, preheat.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { silentLogger } from '../../shared/log.js';
import { StageClient } from '../../services/stage/client.js';
import type { StageConfigInput } from '../../services/stage/config.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import { type TestOrigin, httpGet, metricValue, startTestOrigin, waitFor } from '../helpers/test-origin.js';

const MiB = 1024 * 1024;
const cleanups: (() => Promise<unknown>)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

async function setup(rate: number | null, extra: Partial<StageConfigInput> = {}): Promise<{ origin: TestOrigin; stage: RunningStage; dir: string }> {
  const origin = await startTestOrigin({ rateBytesPerSec: rate });
  const dir = await mkdtemp(join(tmpdir(), 'stage-fill-'));
  const stage = await startStage(
    {
      listen: '127.0.0.1:0',
      upstreams: [origin.url],
      cache: join(dir, 'cache'),
      cacheSize: '256MiB',
      colo: 'test',
      token: 'sekret',
      backoffMs: 10,
      ...extra,
    },
    { log: silentLogger },
  );
  cleanups.push(
    () => stage.close(),
    () => origin.close(),
    () => rm(dir, { recursive: true, force: true }),
  );
  return { origin, stage, dir };
}

const metrics = async (s: RunningStage) => s.metrics.metrics();
/** Clients may finish as soon as the bytes verify; the commit (fsync + rename) follows. */
const committed = (s: RunningStage, d: string) => waitFor(() => s.fills().find((f) => f.digest === d && f.state === 'committed'), 10_000, 'commit');

test('100 concurrent cold clients get identical bytes from one upstream request', async () => {
  const { origin, stage } = await setup(4 * MiB);
  const data = randomBytes(4 * MiB);
  const d = origin.addBlob(data);
  const results = await Promise.all(Array.from({ length: 100 }, () => httpGet(`${stage.url}/v1/blobs/${d}`)));
  for (const r of results) {
    assert.equal(r.status, 200);
    assert.equal(r.complete, true);
    assert.ok(r.body.equals(data));
    assert.equal(r.headers.etag, `"${d}"`);
    assert.equal(r.headers['accept-ranges'], 'bytes');
  }
  assert.equal(origin.blobGets(d), 1);
  const m = await metrics(stage);
  assert.equal(metricValue(m, 'stage_misses_total'), 1);
  // a client slowed by a busy machine may arrive after the commit: then it is a hit
  assert.equal(metricValue(m, 'stage_coalesced_total') + metricValue(m, 'stage_hits_total'), 99);
  assert.equal(metricValue(m, 'stage_upstream_bytes_total'), data.length);
  await committed(stage, d);
  // now cached: a hit, still one upstream request
  const again = await httpGet(`${stage.url}/v1/blobs/${d}`, { range: 'bytes=10-19' });
  assert.equal(again.status, 206);
  assert.ok(again.body.equals(data.subarray(10, 20)));
  assert.equal(origin.blobGets(d), 1);
  const m2 = await metrics(stage);
  assert.equal(metricValue(m2, 'stage_hits_total') - metricValue(m, 'stage_hits_total'), 1);
});

test('clients arriving mid-fill, full and Range, get the right bytes', async () => {
  const { origin, stage } = await setup(3 * MiB);
  const data = randomBytes(4 * MiB);
  const d = origin.addBlob(data);
  const first = httpGet(`${stage.url}/v1/blobs/${d}`);
  await waitFor(() => stage.fills().some((f) => f.digest === d && f.bytes >= 1.5 * MiB), 20_000, 'fill at 1.5 MiB');
  const inFilled = httpGet(`${stage.url}/v1/blobs/${d}`, { range: `bytes=${MiB}-${2 * MiB - 1}` });
  const beyond = httpGet(`${stage.url}/v1/blobs/${d}`, { range: 'bytes=3000000-3500000' });
  const suffix = httpGet(`${stage.url}/v1/blobs/${d}`, { range: 'bytes=-1000' });
  const open = httpGet(`${stage.url}/v1/blobs/${d}`, { range: `bytes=${2 * MiB}-` });
  const late = httpGet(`${stage.url}/v1/blobs/${d}`);
  const head = httpGet(`${stage.url}/v1/blobs/${d}`, {}, 'HEAD');
  const [a, b, c, s, o, l, h] = await Promise.all([first, inFilled, beyond, suffix, open, late, head]);
  assert.ok(a.complete && a.body.equals(data));
  assert.ok(l.complete && l.body.equals(data));
  assert.equal(b.status, 206);
  assert.equal(b.headers['content-range'], `bytes ${MiB}-${2 * MiB - 1}/${data.length}`);
  assert.ok(b.body.equals(data.subarray(MiB, 2 * MiB)));
  assert.equal(c.status, 206);
  assert.ok(c.body.equals(data.subarray(3000000, 3500001)));
  assert.equal(s.status, 206);
  assert.ok(s.body.equals(data.subarray(data.length - 1000)));
  assert.equal(o.status, 206);
  assert.ok(o.body.equals(data.subarray(2 * MiB)));
  assert.equal(h.status, 200);
  assert.equal(h.headers['content-length'], String(data.length));
  assert.equal(origin.blobGets(d), 1);
});

test('an upstream cut at 40 % is resumed with Range; clients see only a pause', async () => {
  const { origin, stage } = await setup(4 * MiB);
  const data = randomBytes(4 * MiB);
  const d = origin.addBlob(data);
  const cutAt = Math.floor(0.4 * data.length);
  origin.fault({ kind: 'cut', afterBytes: cutAt });
  const results = await Promise.all(Array.from({ length: 10 }, () => httpGet(`${stage.url}/v1/blobs/${d}`)));
  for (const r of results) assert.ok(r.complete && r.status === 200 && r.body.equals(data));
  assert.equal(origin.blobGets(d), 2);
  const resumed = origin.requests[1];
  assert.ok(resumed.start > 0 && resumed.start <= cutAt, `resumed at ${resumed.start}`);
  assert.equal(resumed.range, `bytes=${resumed.start}-`);
  assert.ok(origin.bytesSent <= 1.02 * data.length, `origin sent ${origin.bytesSent}`);
  assert.equal(metricValue(await metrics(stage), 'stage_resumes_total'), 1);
  const f = await committed(stage, d);
  assert.equal(f?.state, 'committed');
  assert.equal(f?.resumes, 1);
});

test('an upstream that stalls is abandoned after the idle timeout and resumed', async () => {
  const { origin, stage } = await setup(8 * MiB, { idleTimeoutMs: 300 });
  const data = randomBytes(3 * MiB);
  const d = origin.addBlob(data);
  origin.fault({ kind: 'stall', afterBytes: MiB });
  const r = await httpGet(`${stage.url}/v1/blobs/${d}`);
  assert.ok(r.complete && r.body.equals(data));
  assert.equal(origin.blobGets(d), 2);
  assert.equal(origin.requests[1].range, `bytes=${origin.requests[1].start}-`);
  assert.ok(origin.bytesSent <= 1.02 * data.length);
});

test('a flipped byte aborts every response, caches nothing, and the next request is good', async () => {
  const { origin, stage, dir } = await setup(4 * MiB);
  const data = randomBytes(3 * MiB);
  const d = origin.addBlob(data);
  origin.fault({ kind: 'flip', offset: 2 * MiB + 5 });
  const reqs = [
    ...Array.from({ length: 5 }, () => httpGet(`${stage.url}/v1/blobs/${d}`)),
    httpGet(`${stage.url}/v1/blobs/${d}`, { range: 'bytes=0-999' }), // ends long before the bad byte
    httpGet(`${stage.url}/v1/blobs/${d}`, { range: `bytes=${MiB}-` }),
  ];
  const results = await Promise.all(reqs);
  for (const r of results) {
    assert.ok([200, 206].includes(r.status));
    assert.equal(r.complete, false, 'no response may complete with bytes that fail sha256');
  }
  assert.equal(metricValue(await metrics(stage), 'stage_digest_failures_total'), 1);
  assert.equal(stage.fills().find((f) => f.digest === d)?.state, 'failed');
  await waitFor(async () => (await readdir(join(dir, 'cache', 'partial'))).length === 0, 5000, 'partial deleted');
  assert.deepEqual(await readdir(join(dir, 'cache', 'blobs')), []);
  const good = await httpGet(`${stage.url}/v1/blobs/${d}`);
  assert.ok(good.complete && good.body.equals(data));
  assert.equal(origin.blobGets(d), 2);
  await committed(stage, d);
  assert.deepEqual(await readdir(join(dir, 'cache', 'blobs')), [d.slice(7)]);
});

test('prefetch needs the token, starts a fill, and the next GET is a hit', async () => {
  const { origin, stage } = await setup(8 * MiB);
  const client = new StageClient(stage.url);
  const data = randomBytes(2 * MiB);
  const d = origin.addBlob(data);
  const noAuth = await fetch(`${stage.url}/v1/prefetch`, { method: 'POST', body: JSON.stringify({ digests: [d] }), headers: { 'content-type': 'application/json' } });
  assert.equal(noAuth.status, 401);
  assert.equal(((await noAuth.json()) as { error: { code: string } }).error.code, 'SC_ERR_UNAUTHORIZED');
  await assert.rejects(client.prefetch([d], 'wrong'), { code: 'SC_ERR_FORBIDDEN' });
  await assert.rejects(client.prefetch(['sha256:nope'], 'sekret'), { code: 'SC_ERR_BAD_DIGEST' });
  const bad = await fetch(`${stage.url}/v1/prefetch`, {
    method: 'POST',
    body: JSON.stringify({ digests: ['sha256:../../etc/passwd'] }),
    headers: { 'content-type': 'application/json', authorization: 'Bearer sekret' },
  });
  assert.equal(bad.status, 400);
  assert.equal(origin.blobGets(), 0);
  const res = await client.prefetch([d], 'sekret');
  assert.deepEqual(res.accepted, [d]);
  const done = await waitFor(async () => (await client.fills()).find((f) => f.digest === d && f.state !== 'filling'), 20_000, 'prefetch fill');
  assert.equal(done.state, 'committed');
  assert.equal(done.bytes, data.length);
  assert.equal(done.size, data.length);
  assert.equal(done.source, origin.url);
  assert.ok(done.startedAt && done.finishedAt);
  const r = await httpGet(`${stage.url}/v1/blobs/${d}`);
  assert.ok(r.complete && r.body.equals(data));
  assert.equal(origin.blobGets(d), 1);
  assert.equal(metricValue(await client.metricsText(), 'stage_hits_total'), 1);
  const h = await client.health();
  assert.equal(h.ok, true);
  assert.equal(h.colo, 'test');
  assert.equal(h.cacheBytes, data.length);
});
