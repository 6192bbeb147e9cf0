/**
 * Bundle lifecycle on a real origin (port 0, real files): `bundles rm` (tokens, 404, the rest
 * intact, a removed version never reused with other content) and `origin gc` (only
 * unreferenced blobs older than the grace period; never a blob under upload; a manifest whose
 * blob was collected first is refused cleanly).
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { existsSync, readdirSync, utimesSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, describe, it } from 'node:test';
import { type Digest, sha256Of } from '../../shared/digest.js';
import { isScError } from '../../shared/errors.js';
import { type Manifest, manifestDigest, signManifest } from '../../shared/manifest.js';
import { cli } from '../helpers/cli.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';
import { until } from './control-fixture.js';

const release = generateKeyPairSync('ed25519').privateKey;
let origins: TestOrigin[] = [];

async function origin(): Promise<TestOrigin> {
  const o = await startTestOrigin();
  origins.push(o);
  return o;
}

afterEach(async () => {
  for (const o of origins) await o.close();
  origins = [];
});

function blobFile(o: TestOrigin, d: Digest): string {
  const hex = d.slice(7);
  return join(o.dataDir, 'blobs', 'sha256', hex.slice(0, 2), hex);
}

/** Sets a blob file's mtime `sec` seconds into the past. */
function age(o: TestOrigin, d: Digest, sec: number): void {
  const t = new Date(Date.now() - sec * 1000);
  utimesSync(blobFile(o, d), t, t);
}

function manifestFor(name: string, version: string, blob: Buffer): Manifest {
  return signManifest(
    {
      schema: 1,
      name,
      version,
      role: 'target',
      os: { id: 'debian', version: '12', family: 'linux', netFormat: 'ifupdown' },
      blob: { digest: sha256Of(blob), size: blob.length, compression: 'none', encryption: 'none' },
      publishedAt: new Date().toISOString(),
    },
    release,
  );
}

/** Uploads `blob` and a signed manifest for it. */
async function publish(o: TestOrigin, name: string, version: string, blob: Buffer): Promise<Manifest> {
  await o.client.putBlob(Readable.from([blob]), sha256Of(blob), blob.length);
  const m = manifestFor(name, version, blob);
  await o.client.putManifest(m);
  return m;
}

/** The blob's bytes as the origin serves them hash to its digest. */
async function servedDigest(o: TestOrigin, d: Digest): Promise<Digest> {
  const { stream } = await o.client.openBlob(d);
  const { createHash } = await import('node:crypto');
  const h = createHash('sha256');
  for await (const c of stream) h.update(c as Buffer);
  return `sha256:${h.digest('hex')}`;
}

async function raw(o: TestOrigin, method: string, path: string, token?: string, body?: string): Promise<{ status: number; body: { error?: { code: string } } & Record<string, unknown> }> {
  const res = await fetch(`${o.url}${path}`, {
    method,
    headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), ...(body ? { 'content-type': 'application/json' } : {}) },
    body,
  });
  return { status: res.status, body: (await res.json()) as { error?: { code: string } } };
}

function metric(text: string, name: string): number {
  const line = text.split('\n').find((l) => l.startsWith(`${name} `) || l.startsWith(`${name}{`));
  return line ? Number(line.split(' ').pop()) : 0;
}

function blobBytesIn(text: string): number {
  const line = text.split('\n').find((l) => l.startsWith('origin_bytes_in_total{') && l.includes('route="blob"'));
  return line ? Number(line.split(' ').pop()) : 0;
}

/**
 * Starts a streamed PUT of `data` and sends its first half; resolves once the origin's store is
 * reading it, with a function that sends the rest and resolves with the status.
 */
async function startUpload(o: TestOrigin, data: Buffer): Promise<() => Promise<number>> {
  const before = blobBytesIn(await o.client.metricsText());
  const d = sha256Of(data);
  let answer!: Promise<number>;
  const req = request(`${o.url}/v1/blobs/${d}`, {
    method: 'PUT',
    headers: { authorization: `Bearer ${o.token}`, 'content-type': 'application/octet-stream', 'content-length': String(data.length) },
  });
  answer = new Promise((resolve, reject) => {
    req.once('response', (res) => {
      res.resume();
      res.once('end', () => resolve(res.statusCode ?? 0));
    });
    req.once('error', reject);
  });
  const half = Math.floor(data.length / 2);
  req.write(data.subarray(0, half));
  await until('the upload to be streaming', async () => blobBytesIn(await o.client.metricsText()) > before, 10_000, 20);
  return async () => {
    req.end(data.subarray(half));
    return answer;
  };
}

describe('bundles rm', () => {
  it('removes one manifest (token needed, 404 for an unknown one) and leaves everything else intact', async () => {
    const o = await origin();
    const shared = randomBytes(100_000);
    const other = randomBytes(50_000);
    const a1 = await publish(o, 'alpha', '1', shared);
    const a2 = await publish(o, 'alpha', '2', other);
    const b1 = await publish(o, 'beta', '1', shared);
    const listBefore = await o.client.listBundles();

    assert.equal((await raw(o, 'DELETE', '/v1/admin/bundles/alpha/1')).status, 401);
    const wrong = await raw(o, 'DELETE', '/v1/admin/bundles/alpha/1', `${o.token}x`);
    assert.equal(wrong.status, 403);
    assert.equal(wrong.body.error?.code, 'SC_ERR_FORBIDDEN');
    const unknown = await raw(o, 'DELETE', '/v1/admin/bundles/alpha/9', o.token);
    assert.equal(unknown.status, 404);
    assert.equal(unknown.body.error?.code, 'SC_ERR_MANIFEST_NOT_FOUND');
    assert.equal((await raw(o, 'GET', '/v1/admin/bundles/alpha/1')).status, 405);
    assert.deepEqual(await o.client.listBundles(), listBefore, 'refused removals change nothing');

    const r = await cli(['bundles', 'rm', 'alpha@1', '--origin', o.url, '--token-file', o.tokenFile, '--json']);
    assert.equal(r.code, 0, r.stderr);
    const out = JSON.parse(r.stdout);
    assert.equal(out.manifestDigest, manifestDigest(a1));
    assert.equal(out.blob.digest, a1.blob.digest);

    await assert.rejects(o.client.getManifest('alpha', '1'), (err) => isScError(err, 'SC_ERR_MANIFEST_NOT_FOUND'));
    assert.equal(await o.client.lookupManifest('alpha', '1'), 'removed');
    assert.equal(await o.client.lookupManifest('alpha', '7'), null);
    assert.deepEqual(await o.client.getManifest('alpha', '2'), a2);
    assert.deepEqual(await o.client.getManifest('beta', '1'), b1);
    assert.deepEqual(
      (await o.client.listBundles()).map((b) => `${b.name}@${b.version}`),
      ['alpha@2', 'beta@1'],
    );
    // The blob stays (beta@1 uses it too, and only gc frees blobs); both blobs are intact.
    assert.equal(await servedDigest(o, a1.blob.digest), a1.blob.digest);
    assert.equal(await servedDigest(o, a2.blob.digest), a2.blob.digest);
    assert.equal(existsSync(join(o.dataDir, 'meta', 'alpha', '1.json')), false);

    // Removing it again: 404, exit 1.
    const again = await cli(['bundles', 'rm', 'alpha@1', '--origin', o.url, '--token-file', o.tokenFile]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /error SC_ERR_MANIFEST_NOT_FOUND: alpha@1 was removed/);
    // A removed version is never reused with other content.
    await assert.rejects(o.client.putManifest(manifestFor('alpha', '1', other)), (err) => isScError(err, 'SC_ERR_VERSION_EXISTS'));
    await assert.rejects(o.client.getManifest('alpha', '1'), (err) => isScError(err, 'SC_ERR_MANIFEST_NOT_FOUND'));
    // Without a token the CLI does not even start.
    const noToken = await cli(['bundles', 'rm', 'alpha@2', '--origin', o.url], { env: { PATH: process.env.PATH, STAGECOACH_PROFILE: '/dev/null' } });
    assert.equal(noToken.code, 2);
    assert.match(noToken.stderr, /SC_ERR_USAGE: .*--token-file/);
    assert.deepEqual(await o.client.getManifest('alpha', '2'), a2);
  });
});

describe('origin gc', () => {
  it('frees only the unreferenced blobs older than the grace period', async () => {
    const o = await origin();
    const x1 = await publish(o, 'x', '1', randomBytes(120_000));
    const x2 = await publish(o, 'x', '2', randomBytes(80_000));
    const x3 = await publish(o, 'x', '3', randomBytes(60_000));
    const orphan = randomBytes(70_000);
    await o.client.putBlob(Readable.from([orphan]), sha256Of(orphan), orphan.length);
    const young = randomBytes(30_000);
    await o.client.putBlob(Readable.from([young]), sha256Of(young), young.length);
    await o.client.removeManifest('x', '1');
    for (const d of [x1.blob.digest, x2.blob.digest, x3.blob.digest, sha256Of(orphan)]) age(o, d, 2 * 3600);

    assert.equal((await raw(o, 'POST', '/v1/admin/gc')).status, 401);
    assert.equal((await raw(o, 'POST', '/v1/admin/gc', 'nope')).status, 403);
    assert.equal((await raw(o, 'POST', '/v1/admin/gc', o.token, '{"graceSec":-1}')).body.error?.code, 'SC_ERR_BAD_REQUEST');
    assert.equal((await raw(o, 'GET', '/v1/admin/gc', o.token)).status, 405);

    const expected = [x1.blob.digest, sha256Of(orphan)].sort();
    const dry = await cli(['origin', 'gc', '--origin', o.url, '--token-file', o.tokenFile, '--dry-run', '--json']);
    assert.equal(dry.code, 0, dry.stderr);
    const dr = JSON.parse(dry.stdout);
    assert.equal(dr.dryRun, true);
    assert.deepEqual([...dr.removed.digests].sort(), expected);
    for (const d of expected) assert.ok(existsSync(blobFile(o, d)), 'a dry run removes nothing');

    const r = await cli(['origin', 'gc', '--origin', o.url, '--token-file', o.tokenFile, '--json']);
    assert.equal(r.code, 0, r.stderr);
    const rep = JSON.parse(r.stdout);
    assert.equal(rep.graceSec, 3600);
    assert.deepEqual([...rep.removed.digests].sort(), expected);
    assert.equal(rep.removed.blobs, 2);
    assert.equal(rep.removed.bytes, 120_000 + 70_000);
    assert.deepEqual(rep.kept, { referenced: 2, young: 1, uploading: 0 });
    assert.equal(rep.scanned.blobs, 5);
    for (const d of expected) assert.equal(existsSync(blobFile(o, d)), false);
    for (const m of [x2, x3]) {
      assert.equal(await servedDigest(o, m.blob.digest), m.blob.digest);
      assert.deepEqual(await o.client.getManifest(m.name, m.version), m);
    }
    assert.equal(await servedDigest(o, sha256Of(young)), sha256Of(young));
    const text = await o.client.metricsText();
    assert.equal(metric(text, 'origin_gc_freed_bytes_total'), 190_000);
    assert.equal(metric(text, 'origin_gc_removed_blobs_total'), 2);

    // Human output, and a zero grace: the young orphan goes too, referenced blobs never.
    const human = await cli(['origin', 'gc', '--origin', o.url, '--token-file', o.tokenFile, '--grace', '0s']);
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, /^freed 30000 bytes \(0\.0 MiB\) in 1 blob\(s\) of 3/);
    assert.equal(existsSync(blobFile(o, sha256Of(young))), false);
    for (const m of [x2, x3]) assert.equal(await servedDigest(o, m.blob.digest), m.blob.digest);
    const bad = await cli(['origin', 'gc', '--origin', o.url, '--token-file', o.tokenFile, '--grace', 'soon']);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /SC_ERR_BAD_REQUEST: --grace/);
  });

  it('never removes a blob under upload: a new one, or one already stored and unreferenced', async () => {
    const o = await origin();
    // A re-upload of a stored, unreferenced, old blob, and a brand new blob, both in flight.
    const again = randomBytes(3 << 20);
    await o.client.putBlob(Readable.from([again]), sha256Of(again), again.length);
    age(o, sha256Of(again), 48 * 3600);
    const fresh = randomBytes(3 << 20);
    const finishAgain = await startUpload(o, again);
    const finishFresh = await startUpload(o, fresh);

    const rep = await o.client.collectGarbage({ graceSec: 0 });
    assert.equal(rep.removed.blobs, 0, JSON.stringify(rep));
    assert.equal(rep.kept.uploading, 1, 'the stored blob being uploaded again is pinned');
    assert.ok(existsSync(blobFile(o, sha256Of(again))));

    assert.equal(await finishAgain(), 200);
    assert.equal(await finishFresh(), 201);
    for (const [name, data] of [
      ['again', again],
      ['fresh', fresh],
    ] as const) {
      const m = manifestFor(name, '1', data);
      assert.equal((await o.client.putManifest(m)).created, true);
      const got = await o.client.getManifest(name, '1');
      assert.equal(await servedDigest(o, got.blob.digest), m.blob.digest, `${name}: the bundle verifies`);
    }
    // Referenced now: a collection with no grace keeps both.
    const after = await o.client.collectGarbage({ graceSec: 0 });
    assert.equal(after.removed.blobs, 0);
    assert.equal(after.kept.referenced, 2);
  });

  it('refuses a manifest whose blob was collected before it (SC_ERR_MISSING_BLOB): nothing is half-published', async () => {
    const o = await origin();
    const data = randomBytes(10_000);
    await o.client.putBlob(Readable.from([data]), sha256Of(data), data.length);
    const rep = await o.client.collectGarbage({ graceSec: 0 });
    assert.deepEqual(rep.removed.digests, [sha256Of(data)]);
    await assert.rejects(o.client.putManifest(manifestFor('late', '1', data)), (err) => isScError(err, 'SC_ERR_MISSING_BLOB'));
    assert.deepEqual(await o.client.listBundles(), []);
    assert.deepEqual(readdirSync(join(o.dataDir, 'tmp')), []);
  });
});
