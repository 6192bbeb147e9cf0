/**
 * The stage's pass-through cap (maxPassthroughBytes): a blob larger than the whole cache budget
 * is streamed through only up to the cap; a larger one is refused with 507
 * SC_ERR_PASSTHROUGH_TOO_LARGE before its body is fetched, leaving nothing in the cache dir.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { loadStageConfig } from '../../services/stage/config.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import { sha256Of } from '../../shared/digest.js';
import { silentLogger } from '../../shared/log.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';
import { httpGet, metricValue } from '../helpers/test-origin.js';
import { filesUnder } from '../helpers/tree.js';

const MiB = 1024 * 1024;


describe('stage pass-through cap', () => {
  let o: TestOrigin;
  let s: RunningStage;
  let dir: string;
  const big = randomBytes(3 * MiB);
  const mid = randomBytes(MiB + MiB / 2);
  before(async () => {
    o = await startTestOrigin();
    await o.client.putBlob(Readable.from([big]), sha256Of(big), big.length);
    await o.client.putBlob(Readable.from([mid]), sha256Of(mid), mid.length);
    dir = await mkdtemp(join(tmpdir(), 'stage-ptcap-'));
    s = await startStage(
      { listen: '127.0.0.1:0', upstreams: [o.url], cache: join(dir, 'cache'), cacheSize: '1MiB', maxPassthroughBytes: '2MiB', colo: 'cap', backoffMs: 10 },
      { log: silentLogger },
    );
  });
  after(async () => {
    await s?.close();
    await o?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('refuses a pass-through over the cap with 507 SC_ERR_PASSTHROUGH_TOO_LARGE, whole or ranged, and keeps nothing', async () => {
    const d = sha256Of(big);
    for (const headers of [{}, { range: 'bytes=0-99' }] as Record<string, string>[]) {
      const r = await httpGet(`${s.url}/v1/blobs/${d}`, headers);
      assert.equal(r.status, 507);
      assert.equal(JSON.parse(r.body.toString()).error.code, 'SC_ERR_PASSTHROUGH_TOO_LARGE');
    }
    const f = s.fills().find((x) => x.digest === d);
    assert.equal(f?.state, 'failed');
    assert.equal(f?.error?.code, 'SC_ERR_PASSTHROUGH_TOO_LARGE');
    assert.equal(f?.bytes, 0, 'no byte of the body was written');
    const m = await s.metrics.metrics();
    assert.equal(metricValue(m, 'stage_passthrough_total'), 0);
    assert.deepEqual(filesUnder(join(dir, 'cache')).filter((p) => !p.startsWith('manifests')), []);
  });

  it('still passes through a blob over the budget but within the cap, with Range', async () => {
    const d = sha256Of(mid);
    const r = await httpGet(`${s.url}/v1/blobs/${d}`);
    assert.equal(r.status, 200);
    assert.ok(r.complete && r.body.equals(mid));
    const rr = await httpGet(`${s.url}/v1/blobs/${d}`, { range: 'bytes=100-199' });
    assert.equal(rr.status, 206);
    assert.ok(rr.body.equals(mid.subarray(100, 200)));
    assert.ok(metricValue(await s.metrics.metrics(), 'stage_passthrough_total') >= 1);
  });

  it('reads maxPassthroughBytes from flags, env and file (default 64 GiB)', () => {
    const base = { upstreams: ['http://127.0.0.1:1'], cache: '/tmp/c', colo: 'x' };
    assert.equal(loadStageConfig({ flags: base, env: {} }).maxPassthroughBytes, 64 * 1024 ** 3);
    assert.equal(loadStageConfig({ flags: base, env: { STAGECOACH_STAGE_MAX_PASSTHROUGH_BYTES: '20GiB' } }).maxPassthroughBytes, 20 * 1024 ** 3);
  });
});
