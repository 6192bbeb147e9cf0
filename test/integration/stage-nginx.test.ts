// A stage behind a real nginx (services/stage/accel.ts): nginx sends committed blobs from the
// cache with X-Accel-Redirect, and every answer through nginx must still be the read API's:
// the contract table (test/helpers/read-api-rows.ts) is run through nginx cold and warm and
// compared with origin's answers, header by header.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { type Digest, sha256Of } from '../../shared/digest.js';
import { silentLogger } from '../../shared/log.js';
import { freePort } from '../../shared/redis.js';
import { renderNginxMain, renderNginxSite } from '../../services/stage/accel.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';
import { type ContractOrigin, checkAnswer, ROWS, send, startContractOrigin } from '../helpers/read-api-rows.js';
import { metricValue, waitFor } from '../helpers/test-origin.js';

const NGINX = '/usr/sbin/nginx';

describe('stage behind nginx (X-Accel-Redirect)', { skip: existsSync(NGINX) ? false : 'nginx is not installed (/usr/sbin/nginx)' }, () => {
  let origin: TestOrigin;
  let stage: RunningStage;
  let nginx: ChildProcess;
  let nginxLog = '';
  let front: string;
  let dir: string;
  let c: ContractOrigin;
  let blobs: ContractOrigin['blobs'];
  const metric = async (name: string) => metricValue(await stage.metrics.metrics(), name);

  before(async () => {
    c = await startContractOrigin(256 * 1024);
    origin = c.origin;
    blobs = c.blobs;
    dir = await mkdtemp(join(tmpdir(), 'stage-nginx-'));
    chmodSync(dir, 0o755); // nginx's workers read the cache
    stage = await startStage(
      { listen: `127.0.0.1:${await freePort()}`, upstreams: [origin.url], cache: join(dir, 'cache'), cacheSize: '64MiB', colo: 'front', accelRedirect: '/_stagecoach' },
      { log: silentLogger },
    );
    const port = await freePort();
    front = `http://127.0.0.1:${port}`;
    const prefix = join(dir, 'nginx');
    mkdirSync(prefix);
    const site = renderNginxSite(stage.config, { front: `127.0.0.1:${port}` });
    writeFileSync(join(prefix, 'nginx.conf'), renderNginxMain(prefix, site, process.getuid?.() === 0 ? 'root' : undefined));
    nginx = spawn(NGINX, ['-p', prefix, '-c', join(prefix, 'nginx.conf'), '-g', 'daemon off;'], { stdio: ['ignore', 'ignore', 'pipe'] });
    nginx.stderr?.on('data', (b: Buffer) => {
      nginxLog += b.toString();
    });
    await waitFor(
      async () => {
        if (nginx.exitCode !== null) throw new Error(`nginx exited: ${nginxLog}`);
        return (await send(front, '/healthz').catch(() => null))?.status === 200;
      },
      20_000,
      'nginx to answer',
    );
  });

  after(async () => {
    if (nginx && nginx.exitCode === null) {
      const exited = new Promise((r) => nginx.once('exit', r));
      nginx.kill('SIGTERM');
      await exited;
    }
    await stage?.close();
    await origin?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  for (const pass of ['cold', 'warm'] as const) {
    it(`through nginx, a ${pass} stage answers every row as origin does`, async () => {
      if (pass === 'warm') {
        await waitFor(() => stage.fills().every((x) => x.state !== 'filling'), 20_000, 'the fills to finish');
        assert.ok(stage.fills().filter((x) => x.state === 'committed').length >= 10, 'the cold pass filled the row blobs');
      }
      const handoffs = await metric('stage_accel_handoffs_total');
      for (const [i, row] of ROWS.entries()) {
        const f = c.fixture(i);
        const a = await send(front, row.path(f), row.method, row.headers?.(f));
        checkAnswer(row, f, 'stage', a, c.answers.get(row.name)!, `stage via nginx, ${pass}`);
        if (a.status < 300) assert.equal(a.headers['last-modified'], undefined, `${row.name}: no Last-Modified from nginx`);
      }
      // Cold: every blob was a miss, streamed by the stage. Warm: the two whole-blob GETs without
      // a range or a precondition ("good blob", "If-None-Match, other ETag") went to nginx.
      assert.equal((await metric('stage_accel_handoffs_total')) - handoffs, pass === 'cold' ? 0 : 2);
    });
  }

  it('a warm whole-blob GET is sent by nginx from the file, with the blob headers', async () => {
    const { data, digest } = blobs[0];
    const before = { handoffs: await metric('stage_accel_handoffs_total'), accel: await metric('stage_accel_bytes_total'), served: await metric('stage_bytes_served_total') };
    const a = await send(front, `/v1/blobs/${digest}`);
    assert.equal(a.status, 200);
    assert.ok(a.body.equals(data));
    assert.equal(a.headers.etag, `"${digest}"`);
    assert.equal(a.headers['content-length'], String(data.length));
    assert.equal(a.headers['content-type'], 'application/octet-stream');
    assert.equal(a.headers['cache-control'], 'public, max-age=31536000, immutable');
    assert.equal(a.headers['x-accel-redirect'], undefined, 'nginx consumes the redirect');
    assert.equal((await metric('stage_accel_handoffs_total')) - before.handoffs, 1);
    assert.equal((await metric('stage_accel_bytes_total')) - before.accel, data.length);
    assert.equal((await metric('stage_bytes_served_total')) - before.served, data.length, 'handed-off bytes count as served');
  });

  it('a client that reaches the stage directly gets the body; only the front header asks for a handoff', async () => {
    const { data, digest } = blobs[0];
    const direct = await send(stage.url, `/v1/blobs/${digest}`);
    assert.equal(direct.status, 200);
    assert.ok(direct.body.equals(data));
    assert.equal(direct.headers['x-accel-redirect'], undefined);
    const asked = await send(stage.url, `/v1/blobs/${digest}`, 'GET', { 'stagecoach-accel': '1' });
    assert.equal(asked.status, 200);
    assert.equal(asked.headers['x-accel-redirect'], `/_stagecoach/blobs/${digest.slice(7)}`);
    assert.equal(asked.body.length, 0);
    assert.equal(asked.headers['content-length'], '0');
  });

  it("nginx refuses its internal blob location from outside, and a client cannot set the front header's value", async () => {
    const { digest } = blobs[0];
    const a = await send(front, `/_stagecoach/blobs/${digest.slice(7)}`);
    assert.notEqual(a.status, 200, 'the internal location is not reachable from outside');
    assert.equal(a.body.includes(blobs[0].data.subarray(0, 64)), false);
    // A client's own Stagecoach-Accel is replaced by nginx's; a range still gets the stage's 206.
    const r = await send(front, `/v1/blobs/${digest}`, 'GET', { 'stagecoach-accel': '0', range: 'bytes=5-9' });
    assert.equal(r.status, 206);
    assert.ok(r.body.equals(blobs[0].data.subarray(5, 10)));
  });
});

describe('stage accel: a handed-off blob stays on disk for the front server', () => {
  it('eviction right after a handoff leaves the file until the pin ends; without a handoff it goes at once', async () => {
    const origin = await startTestOrigin();
    const dir = await mkdtemp(join(tmpdir(), 'stage-accel-pin-'));
    const blobs: { data: Buffer; digest: Digest }[] = [];
    for (let i = 0; i < 4; i++) {
      const data = randomBytes(300 * 1024 + i);
      const digest = sha256Of(data);
      await origin.client.putBlob(Readable.from([data]), digest, data.length);
      blobs.push({ data, digest });
    }
    // Room for two blobs: each new fill evicts the oldest.
    const stage = await startStage(
      { listen: '127.0.0.1:0', upstreams: [origin.url], cache: join(dir, 'cache'), cacheSize: 700 * 1024, colo: 'pin', accelRedirect: '/_sc' },
      { log: silentLogger },
    );
    const onDisk = (i: number) => existsSync(join(dir, 'cache', 'blobs', blobs[i].digest.slice(7)));
    const fetchWhole = async (i: number) => assert.ok((await send(stage.url, `/v1/blobs/${blobs[i].digest}`)).body.equals(blobs[i].data));
    try {
      await fetchWhole(0);
      await fetchWhole(1);
      await waitFor(() => onDisk(0) && onDisk(1), 10_000, 'blobs 0 and 1 committed');
      // Blob 0 is handed off (the front's header); blob 1 only read by the stage itself.
      const a = await send(stage.url, `/v1/blobs/${blobs[0].digest}`, 'GET', { 'stagecoach-accel': '1' });
      assert.equal(a.headers['x-accel-redirect'], `/_sc/blobs/${blobs[0].digest.slice(7)}`);
      await fetchWhole(1); // blob 1 is now the most recent: blob 0 goes first
      await fetchWhole(2); // evicts blob 0, which nginx may not have opened yet
      await waitFor(() => onDisk(2), 10_000, 'blob 2 committed');
      assert.ok(onDisk(0), 'the handed-off blob is still on disk after its eviction');
      assert.ok(metricValue(await stage.metrics.metrics(), 'stage_cache_deferred_bytes') >= blobs[0].data.length);
      await fetchWhole(3); // evicts blob 1: read by the stage only, nothing pins it
      await waitFor(() => !onDisk(1), 10_000, 'blob 1 unlinked at its eviction');
    } finally {
      await stage.close();
      await origin.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
