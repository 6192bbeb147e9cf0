// The reconcile pass (services/stage/reconcile.ts): a stage drops what its upstream no longer
// lists, and only on a complete, valid answer. A real origin (bundles rm, gc) and real stages on
// 127.0.0.1 port 0; the passes are run with `RunningStage.reconcile()` instead of waiting.
import assert from 'node:assert/strict';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { type IncomingMessage, type Server, createServer, request } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { after, test } from 'node:test';
import { type Digest, sha256Of } from '../../shared/digest.js';
import { silentLogger } from '../../shared/log.js';
import { type Manifest, signManifest } from '../../shared/manifest.js';
import { type Clock, realClock } from '../../services/stage/clock.js';
import type { StageConfigInput } from '../../services/stage/config.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import { type TestOrigin, startTestOrigin } from '../helpers/origin.js';
import { httpGet, metricValue, waitFor } from '../helpers/test-origin.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const release = generateKeyPairSync('ed25519').privateKey;
const cleanups: (() => Promise<unknown>)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

async function origin(): Promise<TestOrigin> {
  const o = await startTestOrigin();
  let closed = false;
  const close = o.close;
  o.close = async () => {
    if (closed) return;
    closed = true;
    await close();
  };
  cleanups.push(() => o.close());
  return o;
}

async function stage(upstreams: string[], extra: Partial<StageConfigInput> = {}, clock?: Clock): Promise<RunningStage> {
  const dir = await mkdtemp(join(tmpdir(), 'stage-reconcile-'));
  const s = await startStage(
    { listen: '127.0.0.1:0', upstreams, cache: join(dir, 'cache'), cacheSize: '256MiB', colo: 'rec', backoffMs: 10, reconcileIntervalMs: 0, ...extra },
    { log: silentLogger, clock },
  );
  cleanups.push(
    () => s.close(),
    () => rm(dir, { recursive: true, force: true }),
  );
  return s;
}

/** Uploads `blob` and a signed manifest `name@1` for it; returns the blob digest. */
async function publish(o: TestOrigin, name: string, blob: Buffer): Promise<Digest> {
  const d = sha256Of(blob);
  await o.client.putBlob(Readable.from([blob]), d, blob.length);
  const m: Manifest = signManifest(
    {
      schema: 1,
      name,
      version: '1',
      role: 'target',
      os: { id: 'debian', version: '12', family: 'linux', netFormat: 'ifupdown' },
      blob: { digest: d, size: blob.length, compression: 'none', encryption: 'none' },
      publishedAt: new Date().toISOString(),
    },
    release,
  );
  await o.client.putManifest(m);
  return d;
}

const blobFile = (s: RunningStage, d: Digest) => join(s.config.cache, 'blobs', d.slice(7));
const manifestFile = (s: RunningStage, name: string) => join(s.config.cache, 'manifests', name, '1.json');

/** Requests this stage sent upstream, of one kind (blob, manifest, listing). */
async function upstreamRequests(s: RunningStage, kind: string): Promise<number> {
  return (await s.metrics.metrics())
    .split('\n')
    .filter((l) => l.startsWith('stage_upstream_requests_total{') && l.includes(`kind="${kind}"`))
    .reduce((n, l) => n + Number(l.slice(l.lastIndexOf(' ') + 1)), 0);
}

async function runs(s: RunningStage, outcome: string): Promise<number> {
  const line = (await s.metrics.metrics()).split('\n').find((l) => l.startsWith('stage_reconcile_runs_total{') && l.includes(`outcome="${outcome}"`));
  return line ? Number(line.slice(line.lastIndexOf(' ') + 1)) : 0;
}

/** Gets name@1's manifest and blob through `s`, so both are cached there. */
async function warm(s: RunningStage, name: string, d: Digest, data: Buffer): Promise<void> {
  assert.equal((await httpGet(`${s.url}/v1/bundles/${name}/1`)).status, 200);
  const r = await httpGet(`${s.url}/v1/blobs/${d}`);
  assert.ok(r.status === 200 && r.complete && r.body.equals(data));
  await waitFor(() => existsSync(blobFile(s, d)), 10_000, `${name}'s blob committed`);
}

/** Two bundles published, both cached by a fresh stage: alpha (to be removed) and beta. */
async function twoBundles(extra: Partial<StageConfigInput> = {}) {
  const o = await origin();
  const a = randomBytes(300 * KiB);
  const b = randomBytes(200 * KiB);
  const da = await publish(o, 'alpha', a);
  const db = await publish(o, 'beta', b);
  const s = await stage([o.url], extra);
  await warm(s, 'alpha', da, a);
  await warm(s, 'beta', db, b);
  return { o, s, a, b, da, db };
}

/** A GET whose client reads its first chunk, then stops reading until `finish()`. */
function slowGet(url: string): { started: Promise<void>; finish(): Promise<{ status: number; body: Buffer; complete: boolean }> } {
  const parts: Buffer[] = [];
  let res: IncomingMessage | undefined;
  const started = new Promise<void>((resolve, reject) => {
    const req = request(url, { agent: false }, (r) => {
      res = r;
      r.once('data', (c: Buffer) => {
        parts.push(c);
        r.pause();
        resolve();
      });
    });
    req.on('error', reject);
    req.end();
  });
  return {
    started,
    finish: () =>
      new Promise((resolve) => {
        const r = res!;
        r.on('data', (c: Buffer) => parts.push(c));
        r.once('end', () => resolve({ status: r.statusCode ?? 0, body: Buffer.concat(parts), complete: r.complete }));
        r.once('error', () => resolve({ status: r.statusCode ?? 0, body: Buffer.concat(parts), complete: false }));
        r.resume();
      }),
  };
}

test('a pass drops the blob and manifest of a bundle removed at origin and keeps the others, served from cache', async () => {
  const { o, s, b, da, db } = await twoBundles();
  await o.client.removeManifest('alpha', '1');

  const r = await s.reconcile();
  assert.deepEqual(r, { outcome: 'ok', listed: 1, droppedBlobs: 1, droppedBytes: 300 * KiB, heldBlobs: 0, droppedManifests: 1 });
  await waitFor(() => !existsSync(blobFile(s, da)), 10_000, "alpha's blob file deleted");
  assert.equal(existsSync(manifestFile(s, 'alpha')), false);
  assert.ok(existsSync(blobFile(s, db)) && existsSync(manifestFile(s, 'beta')));

  const blobs = await upstreamRequests(s, 'blob');
  const manifests = await upstreamRequests(s, 'manifest');
  const gone = await httpGet(`${s.url}/v1/bundles/alpha/1`);
  assert.equal(gone.status, 404);
  assert.equal(JSON.parse(gone.body.toString()).error.code, 'SC_ERR_MANIFEST_NOT_FOUND');
  assert.equal(await upstreamRequests(s, 'manifest'), manifests + 1, 'alpha asked upstream again (its 404)');
  assert.equal((await httpGet(`${s.url}/v1/bundles/beta/1`)).status, 200);
  const kept = await httpGet(`${s.url}/v1/blobs/${db}`);
  assert.ok(kept.status === 200 && kept.complete && kept.body.equals(b));
  assert.equal(await upstreamRequests(s, 'blob'), blobs, "beta's blob served from the cache");
  assert.equal(await upstreamRequests(s, 'manifest'), manifests + 1, "beta's manifest served from the cache");

  const m = await s.metrics.metrics();
  assert.equal(await runs(s, 'ok'), 1);
  assert.equal(metricValue(m, 'stage_reconcile_dropped_blobs_total'), 1);
  assert.equal(metricValue(m, 'stage_reconcile_dropped_bytes_total'), 300 * KiB);
  assert.equal(metricValue(m, 'stage_reconcile_dropped_manifests_total'), 1);
  assert.ok(metricValue(m, 'stage_reconcile_last_success_timestamp_seconds') > 0);

  // A second pass costs one listing request and no manifest request, and drops nothing more.
  const listings = await upstreamRequests(s, 'listing');
  assert.deepEqual(await s.reconcile(), { outcome: 'ok', listed: 1, droppedBlobs: 0, droppedBytes: 0, heldBlobs: 0, droppedManifests: 0 });
  assert.equal(await upstreamRequests(s, 'listing'), listings + 1);
  assert.equal(await upstreamRequests(s, 'manifest'), manifests + 1);

  // Once origin collected the blob, the stage answers 404 for it too.
  const gc = await o.client.collectGarbage({ graceSec: 0 });
  assert.equal(gc.removed.blobs, 1);
  assert.equal((await httpGet(`${s.url}/v1/blobs/${da}`)).status, 404);
});

test('with the origin down during the pass, nothing is dropped', async () => {
  const { o, s, a, b, da, db } = await twoBundles();
  await o.client.removeManifest('alpha', '1');
  await o.close();

  const r = await s.reconcile();
  assert.equal(r.outcome, 'upstream_error');
  assert.equal(r.droppedBlobs + r.droppedManifests, 0);
  assert.equal(await runs(s, 'upstream_error'), 1);
  assert.equal(await runs(s, 'ok'), 0);
  for (const [name, d, data] of [['alpha', da, a], ['beta', db, b]] as const) {
    assert.ok(existsSync(blobFile(s, d)) && existsSync(manifestFile(s, name)), `${name} kept on disk`);
    assert.equal((await httpGet(`${s.url}/v1/bundles/${name}/1`)).status, 200, `${name}'s manifest still served`);
    const got = await httpGet(`${s.url}/v1/blobs/${d}`);
    assert.ok(got.status === 200 && got.complete && got.body.equals(data), `${name}'s blob still served`);
  }
});

test('an error, malformed, empty, timed-out, cut or unresolvable listing drops nothing; the next valid one does', async () => {
  const o = await origin();
  const a = randomBytes(300 * KiB);
  const da = await publish(o, 'alpha', a);
  await publish(o, 'beta', randomBytes(200 * KiB));
  // A proxy in front of the origin whose listing answer the test chooses.
  let mode = 'pass';
  const ghost = { name: 'ghost', version: '1', role: 'target', manifestDigest: sha256Of('ghost'), publishedAt: new Date().toISOString() };
  const proxy: Server = createServer((req, res) => {
    if (req.url === '/v1/bundles' && mode !== 'pass') {
      if (mode === '500') res.writeHead(500, { 'content-type': 'application/json' }).end('{"error":{"code":"SC_ERR_INTERNAL"}}');
      else if (mode === '404') res.writeHead(404, { 'content-type': 'application/json' }).end('{"error":{"code":"SC_ERR_BAD_PATH"}}');
      else if (mode === 'garbage') res.writeHead(200, { 'content-type': 'application/json' }).end('[{"name":"beta",');
      else if (mode === 'object') res.writeHead(200, { 'content-type': 'application/json' }).end('{"bundles":[]}');
      else if (mode === 'empty') res.writeHead(200, { 'content-type': 'application/json' }).end('[]');
      else if (mode === 'bad-entry') res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify([{ name: 'beta', version: '1', manifestDigest: 'sha256:nope' }]));
      else if (mode === 'cut') {
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': '4096' });
        res.write('[');
        setTimeout(() => res.destroy(), 20);
      } else if (mode === 'hang') res.writeHead(200, { 'content-type': 'application/json' }).write('['); // never ends
      else if (mode === 'ghost') {
        void fetch(`${o.url}/v1/bundles`)
          .then((r) => r.json() as Promise<unknown[]>)
          .then((list) => res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify([...list, ghost])));
      }
      return;
    }
    const up = request(`${o.url}${req.url}`, { method: req.method, headers: req.headers }, (ur) => {
      res.writeHead(ur.statusCode ?? 502, ur.headers);
      ur.pipe(res);
    });
    up.on('error', () => res.destroy());
    req.pipe(up);
  });
  await new Promise<void>((r) => proxy.listen(0, '127.0.0.1', r));
  cleanups.push(
    () =>
      new Promise<void>((r) => {
        proxy.close(() => r());
        proxy.closeAllConnections();
      }),
  );
  const s = await stage([`http://127.0.0.1:${(proxy.address() as AddressInfo).port}`], { idleTimeoutMs: 500 });
  await warm(s, 'alpha', da, a);
  await o.client.removeManifest('alpha', '1');

  const expect: [string, string][] = [
    ['500', 'upstream_error'],
    ['404', 'upstream_error'],
    ['garbage', 'invalid_listing'],
    ['object', 'invalid_listing'],
    ['bad-entry', 'invalid_listing'],
    ['empty', 'empty_listing'],
    ['cut', 'upstream_error'],
    ['ghost', 'incomplete'],
    ['hang', 'upstream_error'],
  ];
  for (const [m, outcome] of expect) {
    mode = m;
    const r = await s.reconcile();
    assert.equal(r.outcome, outcome, `listing answer ${m}`);
    assert.equal(r.droppedBlobs + r.droppedManifests, 0, `listing answer ${m}`);
    assert.ok(existsSync(blobFile(s, da)) && existsSync(manifestFile(s, 'alpha')), `listing answer ${m}: alpha kept`);
  }
  assert.equal(await runs(s, 'ok'), 0);
  assert.equal(await runs(s, 'upstream_error'), 4);
  assert.equal(await runs(s, 'invalid_listing'), 3);
  assert.equal(await runs(s, 'empty_listing'), 1);
  assert.equal(await runs(s, 'incomplete'), 1);

  mode = 'pass';
  await waitFor(async () => !(await httpGet(`${s.url}/healthz`)).body.toString().includes('"degraded"'), 10_000, 'the stage to see its upstream');
  const r = await s.reconcile();
  assert.equal(r.outcome, 'ok');
  assert.equal(r.droppedBlobs, 1);
  await waitFor(() => !existsSync(blobFile(s, da)), 10_000, "alpha's blob file deleted");
});

test('a blob being read during the pass is served completely to its slow reader, and deleted after', async () => {
  const o = await origin();
  const a = randomBytes(32 * MiB);
  const da = await publish(o, 'alpha', a);
  await publish(o, 'beta', randomBytes(64 * KiB)); // stays listed: an empty listing drops nothing
  const s = await stage([o.url]);
  await warm(s, 'alpha', da, a);
  await o.client.removeManifest('alpha', '1');

  const slow = slowGet(`${s.url}/v1/blobs/${da}`);
  await slow.started;
  const r = await s.reconcile();
  assert.equal(r.outcome, 'ok');
  assert.equal(r.droppedBlobs, 1);
  assert.equal(r.heldBlobs, 1);
  assert.ok(existsSync(blobFile(s, da)), 'the file stays while it is read');
  assert.equal(metricValue(await s.metrics.metrics(), 'stage_cache_deferred_bytes'), a.length);

  const got = await slow.finish();
  assert.equal(got.status, 200);
  assert.ok(got.complete && got.body.equals(a), 'the slow reader got every byte');
  await waitFor(() => !existsSync(blobFile(s, da)), 10_000, 'the file deleted after its reader');
  assert.equal(metricValue(await s.metrics.metrics(), 'stage_cache_deferred_bytes'), 0);
});

test('a dropped blob filled again while its old copy is still read stays cached after that reader', async () => {
  const o = await origin();
  const a = randomBytes(32 * MiB);
  const da = await publish(o, 'alpha', a);
  await publish(o, 'beta', randomBytes(64 * KiB)); // stays listed: an empty listing drops nothing
  const s = await stage([o.url]);
  await warm(s, 'alpha', da, a);
  await o.client.removeManifest('alpha', '1'); // removed, not collected: origin still serves the blob

  const slow = slowGet(`${s.url}/v1/blobs/${da}`);
  await slow.started;
  assert.equal((await s.reconcile()).heldBlobs, 1);
  const blobs = await upstreamRequests(s, 'blob');
  const again = await httpGet(`${s.url}/v1/blobs/${da}`);
  assert.ok(again.status === 200 && again.complete && again.body.equals(a));
  assert.equal(await upstreamRequests(s, 'blob'), blobs + 1, 'filled again from origin');
  await waitFor(() => s.fills().some((f) => f.digest === da && f.state === 'committed' && f.finishedAt !== null && f.bytes === a.length), 10_000, 'the new fill committed');

  const got = await slow.finish();
  assert.ok(got.complete && got.body.equals(a));
  await waitFor(async () => metricValue(await s.metrics.metrics(), 'stage_cache_deferred_bytes') === 0, 10_000, 'the old copy released');
  await new Promise((r) => setTimeout(r, 200)); // an unlink of the old copy would have run by now
  assert.ok(existsSync(blobFile(s, da)), "the new copy's file is still there");
  const third = await httpGet(`${s.url}/v1/blobs/${da}`);
  assert.ok(third.status === 200 && third.complete && third.body.equals(a));
  assert.equal(await upstreamRequests(s, 'blob'), blobs + 1, 'served from the cache');
});

test('in a chain, a child stage reconciles against its parent stage, which passes on the origin listing', async () => {
  const o = await origin();
  const a = randomBytes(100 * KiB);
  const b = randomBytes(100 * KiB);
  const da = await publish(o, 'alpha', a);
  const db = await publish(o, 'beta', b);
  const region = await stage([o.url], { colo: 'region' });
  const colo = await stage([region.url], { colo: 'colo' });
  await warm(colo, 'alpha', da, a);
  await warm(colo, 'beta', db, b);
  await o.client.removeManifest('alpha', '1');

  const r = await colo.reconcile();
  assert.equal(r.outcome, 'ok');
  assert.equal(r.droppedBlobs, 1);
  assert.equal(r.droppedManifests, 1);
  await waitFor(() => !existsSync(blobFile(colo, da)), 10_000, "alpha's blob file deleted in the colo");
  assert.ok(existsSync(blobFile(colo, db)));
  // The region still holds alpha until its own pass; after it, the colo answers 404 like origin.
  assert.ok(existsSync(blobFile(region, da)));
  assert.equal((await region.reconcile()).droppedBlobs, 1);
  assert.equal((await httpGet(`${colo.url}/v1/bundles/alpha/1`)).status, 404);
  assert.equal((await httpGet(`${colo.url}/v1/bundles/beta/1`)).status, 200);
});

test('reconcileIntervalMs sets the timer of the passes (0: none)', async () => {
  const timers: (() => void)[] = [];
  const clock: Clock = {
    ...realClock,
    setTimeout: (fn, ms) => {
      if (ms !== 123_456) return realClock.setTimeout(fn, ms);
      timers.push(fn);
      return fn;
    },
    clearTimeout: (h) => {
      if (typeof h !== 'function') realClock.clearTimeout(h);
    },
  };
  const { o, s: off } = await twoBundles();
  assert.equal(off.config.reconcileIntervalMs, 0);
  const s = await stage([o.url], { reconcileIntervalMs: 123_456 }, clock);
  const d = await publish(o, 'gamma', randomBytes(1000));
  assert.equal((await httpGet(`${s.url}/v1/blobs/${d}`)).status, 200);
  await waitFor(() => existsSync(blobFile(s, d)), 10_000, 'gamma cached');
  await o.client.removeManifest('gamma', '1');
  assert.equal(timers.length, 1, 'one pass scheduled');
  timers.shift()!();
  await waitFor(() => !existsSync(blobFile(s, d)), 10_000, "gamma's blob dropped by the timed pass");
  await waitFor(() => timers.length === 1, 10_000, 'the next pass scheduled');
  assert.equal(await runs(s, 'ok'), 1);
  assert.equal(await runs(off, 'ok'), 0);
});
