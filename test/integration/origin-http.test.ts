import assert from 'node:assert/strict';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { request } from 'node:http';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { sha256Of } from '../../shared/digest.js';
import { isScError } from '../../shared/errors.js';
import { type Manifest, manifestDigest, signManifest } from '../../shared/manifest.js';
import { type OriginClient, ReadClient } from '../../services/origin/client.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';
import { collect, testManifest } from '../helpers/store-contract.js';

interface RawResponse {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

/** One HTTP request with the path sent exactly as given (no URL normalisation). */
function raw(base: string, path: string, opts: { method?: string; headers?: Record<string, string>; body?: Buffer | string } = {}): Promise<RawResponse> {
  const u = new URL(base);
  return new Promise((resolve, reject) => {
    const req = request({ host: u.hostname, port: u.port, path, method: opts.method ?? 'GET', headers: opts.headers, agent: false }, (res) => {
      const parts: Buffer[] = [];
      res.on('data', (c: Buffer) => parts.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(parts) }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(opts.body);
  });
}

function errCode(r: RawResponse): string | undefined {
  try {
    return JSON.parse(r.body.toString()).error?.code;
  } catch {
    return undefined;
  }
}

async function metricValue(client: ReadClient, name: string): Promise<number> {
  const text = await client.metricsText();
  const line = text.split('\n').find((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `));
  return line ? Number(line.split(' ').pop()) : 0;
}

describe('origin HTTP API', () => {
  let o: TestOrigin;
  const data = randomBytes(3 * 1024 * 1024 + 123);
  const digest = sha256Of(data);
  const auth = () => ({ authorization: `Bearer ${o.token}` });

  before(async () => {
    o = await startTestOrigin();
  });
  after(async () => {
    await o.close();
  });

  it('stores an upload (201, then 200) and serves it byte-identical with the contract headers', async () => {
    const r1 = await raw(o.url, `/v1/blobs/${digest}`, { method: 'PUT', headers: auth(), body: data });
    assert.equal(r1.status, 201);
    assert.deepEqual(JSON.parse(r1.body.toString()), { digest, size: data.length, created: true });
    const r2 = await raw(o.url, `/v1/blobs/${digest}`, { method: 'PUT', headers: auth(), body: data });
    assert.equal(r2.status, 200);
    assert.equal(JSON.parse(r2.body.toString()).created, false);

    const g = await raw(o.url, `/v1/blobs/${digest}`);
    assert.equal(g.status, 200);
    assert.ok(g.body.equals(data));
    assert.equal(g.headers['content-length'], String(data.length));
    assert.equal(g.headers['accept-ranges'], 'bytes');
    assert.equal(g.headers.etag, `"${digest}"`);
    assert.equal(g.headers['cache-control'], 'public, max-age=31536000, immutable');

    const { stream, status, size } = await o.client.openBlob(digest);
    assert.equal(status, 200);
    assert.equal(size, data.length);
    assert.ok((await collect(stream)).equals(data));
  });

  it('answers single Ranges with 206 and the right bytes', async () => {
    const cases: [string, number, number][] = [
      ['bytes=0-99', 0, 99],
      ['bytes=1000000-1999999', 1_000_000, 1_999_999],
      ['bytes=-100', data.length - 100, data.length - 1],
      ['bytes=100-', 100, data.length - 1],
      [`bytes=${data.length - 1}-${data.length + 50}`, data.length - 1, data.length - 1],
    ];
    for (const [range, start, end] of cases) {
      const r = await raw(o.url, `/v1/blobs/${digest}`, { headers: { range } });
      assert.equal(r.status, 206, range);
      assert.equal(r.headers['content-range'], `bytes ${start}-${end}/${data.length}`, range);
      assert.equal(r.headers['content-length'], String(end - start + 1), range);
      assert.ok(r.body.equals(data.subarray(start, end + 1)), range);
    }
    const viaClient = await o.client.openBlob(digest, { start: 5, end: 9 });
    assert.equal(viaClient.status, 206);
    assert.equal(viaClient.size, data.length);
    assert.ok((await collect(viaClient.stream)).equals(data.subarray(5, 10)));
  });

  it('answers an unsatisfiable Range with 416 and a multi-range with the full 200', async () => {
    const r = await raw(o.url, `/v1/blobs/${digest}`, { headers: { range: `bytes=${data.length}-` } });
    assert.equal(r.status, 416);
    assert.equal(errCode(r), 'SC_ERR_BAD_RANGE');
    const m = await raw(o.url, `/v1/blobs/${digest}`, { headers: { range: 'bytes=0-1,10-20' } });
    assert.equal(m.status, 200);
    assert.ok(m.body.equals(data));
  });

  it('answers If-None-Match with 304 and HEAD with headers only', async () => {
    const r = await raw(o.url, `/v1/blobs/${digest}`, { headers: { 'if-none-match': `"${digest}"` } });
    assert.equal(r.status, 304);
    assert.equal(r.body.length, 0);
    const h = await raw(o.url, `/v1/blobs/${digest}`, { method: 'HEAD' });
    assert.equal(h.status, 200);
    assert.equal(h.headers['content-length'], String(data.length));
    assert.equal(h.body.length, 0);
    assert.deepEqual(await o.client.statBlob(digest), { size: data.length });
  });

  it('answers an unknown blob with 404 SC_ERR_BLOB_NOT_FOUND', async () => {
    const r = await raw(o.url, `/v1/blobs/${sha256Of('nothing')}`);
    assert.equal(r.status, 404);
    assert.equal(errCode(r), 'SC_ERR_BLOB_NOT_FOUND');
    await assert.rejects(o.client.openBlob(sha256Of('nothing')), (e) => isScError(e, 'SC_ERR_BLOB_NOT_FOUND'));
  });

  it('refuses an upload whose bytes do not match with 422 and stores nothing', async () => {
    const good = randomBytes(500_000);
    const d = sha256Of(good);
    const r = await raw(o.url, `/v1/blobs/${d}`, { method: 'PUT', headers: auth(), body: randomBytes(500_000) });
    assert.equal(r.status, 422);
    assert.equal(errCode(r), 'SC_ERR_DIGEST_MISMATCH');
    assert.equal((await raw(o.url, `/v1/blobs/${d}`, { method: 'HEAD' })).status, 404);
    assert.deepEqual(readdirSync(join(o.dataDir, 'tmp')), []);
    const hex = d.slice(7);
    assert.ok(!readdirSync(join(o.dataDir, 'blobs', 'sha256')).some((p) => readdirSync(join(o.dataDir, 'blobs', 'sha256', p)).includes(hex)));
    await assert.rejects(o.client.putBlob(Readable.from([randomBytes(10)]), d, 10), (e) => isScError(e, 'SC_ERR_DIGEST_MISMATCH'));
  });

  it('stores two concurrent uploads of one blob once: one 201 and one 200, correct bytes', async () => {
    const blob = randomBytes(4 * 1024 * 1024);
    const d = sha256Of(blob);
    const rs = await Promise.all([0, 1].map(() => raw(o.url, `/v1/blobs/${d}`, { method: 'PUT', headers: auth(), body: blob })));
    assert.deepEqual(rs.map((r) => r.status).sort(), [200, 201]);
    assert.ok((await raw(o.url, `/v1/blobs/${d}`)).body.equals(blob));
  });

  it('uploads from a file path with the client, skipping the upload when the origin has the blob', async () => {
    const blob = randomBytes(200_000);
    const d = sha256Of(blob);
    const file = join(o.root, 'upload.bin');
    writeFileSync(file, blob);
    let last = 0;
    const r1 = await o.client.putBlob(file, d, blob.length, { onProgress: (sent) => (last = sent) });
    assert.deepEqual(r1, { digest: d, size: blob.length, created: true });
    assert.equal(last, blob.length);
    const r2 = await o.client.putBlob(file, d, blob.length);
    assert.equal(r2.created, false);
  });

  it('publishes manifests: 422 without the blob, 201, 200 when identical, 409 when changed, 304 on ETag', async () => {
    const client = o.client;
    const missing = testManifest('rescue-os', '1.0.0', { digest: sha256Of('absent'), size: 6 });
    await assert.rejects(client.putManifest(missing), (e) => isScError(e, 'SC_ERR_MISSING_BLOB') && e.status === 422);
    const wrongSize = testManifest('rescue-os', '1.0.0', { digest, size: data.length + 1 });
    await assert.rejects(client.putManifest(wrongSize), (e) => isScError(e, 'SC_ERR_SIZE_MISMATCH'));

    const m = testManifest('rescue-os', '1.0.0', { digest, size: data.length });
    const fp = sha256Of('content');
    assert.deepEqual(await client.putManifest(m, { fingerprint: fp }), { manifestDigest: manifestDigest(m), created: true });
    assert.deepEqual(await client.putManifest(m), { manifestDigest: manifestDigest(m), created: false });
    await assert.rejects(client.putManifest({ ...m, role: 'base' }), (e) => isScError(e, 'SC_ERR_VERSION_EXISTS') && e.status === 409);

    const g = await raw(o.url, '/v1/bundles/rescue-os/1.0.0');
    assert.equal(g.status, 200);
    assert.equal(g.headers['cache-control'], 'no-cache');
    assert.equal(g.headers.etag, `"${manifestDigest(m)}"`);
    assert.equal(sha256Of(g.body), manifestDigest(m));
    assert.deepEqual(JSON.parse(g.body.toString()), m);
    const nm = await raw(o.url, '/v1/bundles/rescue-os/1.0.0', { headers: { 'if-none-match': g.headers.etag as string } });
    assert.equal(nm.status, 304);

    const rec = await client.getManifestRecord('rescue-os', '1.0.0');
    assert.deepEqual(rec, { manifest: m, manifestDigest: manifestDigest(m), fingerprint: fp });
    assert.deepEqual(await new ReadClient(o.url).getManifest('rescue-os', '1.0.0'), m);
    assert.equal(await client.findManifest('rescue-os', '9.9'), null);
    await assert.rejects(client.getManifest('rescue-os', '9.9'), (e) => isScError(e, 'SC_ERR_MANIFEST_NOT_FOUND'));

    const list = await client.listBundles();
    assert.deepEqual(list, [{ name: 'rescue-os', version: '1.0.0', role: 'target', manifestDigest: manifestDigest(m), publishedAt: m.publishedAt }]);
  });

  it('checks manifest bodies: path mismatch, bad JSON, schema, 1 MiB limit', async () => {
    const m = testManifest('other', '1', { digest, size: data.length });
    const put = (path: string, body: string | Buffer) =>
      raw(o.url, path, { method: 'PUT', headers: { ...auth(), 'content-type': 'application/json' }, body });
    let r = await put('/v1/bundles/other/2', JSON.stringify(m));
    assert.equal(r.status, 400);
    assert.equal(errCode(r), 'SC_ERR_BAD_MANIFEST');
    r = await put('/v1/bundles/other/1', '{not json');
    assert.equal(r.status, 400);
    assert.equal(errCode(r), 'SC_ERR_BAD_REQUEST');
    r = await put('/v1/bundles/other/1', JSON.stringify({ ...m, schema: 2 }));
    assert.equal(errCode(r), 'SC_ERR_BAD_MANIFEST');
    r = await put('/v1/bundles/other/1', '');
    assert.equal(errCode(r), 'SC_ERR_BAD_MANIFEST');
    r = await put('/v1/bundles/other/1', Buffer.alloc(1024 * 1024 + 10, 0x20));
    assert.equal(r.status, 413);
    assert.equal(errCode(r), 'SC_ERR_TOO_LARGE');
    r = await raw(o.url, '/v1/bundles/other/1', { method: 'PUT', headers: { ...auth(), 'fingerprint-x': '1', 'stagecoach-content-fingerprint': 'nope' }, body: JSON.stringify(m) });
    assert.equal(errCode(r), 'SC_ERR_BAD_REQUEST');
    r = await raw(o.url, '/v1/bundles/other/1', { method: 'DELETE', headers: auth() });
    assert.equal(r.status, 405);
  });

  it('counts blob body bytes served in origin_blob_bytes_out_total', async () => {
    const before = await metricValue(o.client, 'origin_blob_bytes_out_total');
    await raw(o.url, `/v1/blobs/${digest}`);
    await raw(o.url, `/v1/blobs/${digest}`, { headers: { range: 'bytes=0-999' } });
    await raw(o.url, `/v1/blobs/${digest}`, { method: 'HEAD' });
    const afterValue = await metricValue(o.client, 'origin_blob_bytes_out_total');
    assert.equal(afterValue - before, data.length + 1000);
    const text = await o.client.metricsText();
    assert.match(text, /origin_http_requests_total\{method="GET",route="blob",status="206"/);
    assert.match(text, /origin_blob_requests_total\{method="HEAD",status="200"/);
    assert.match(text, /origin_bytes_in_total\{route="blob"/);
  });

  it('answers /healthz', async () => {
    const h = await o.client.health();
    assert.equal(h.ok, true);
  });
});

describe('origin with --trust-key', () => {
  const trusted = generateKeyPairSync('ed25519');
  const stranger = generateKeyPairSync('ed25519');
  let o: TestOrigin;
  let client: OriginClient;
  let m: Manifest;
  let keyDir: string;

  before(async () => {
    keyDir = mkdtempSync(join(tmpdir(), 'sc-keys-'));
    const pub = join(keyDir, 'trusted.pub');
    writeFileSync(pub, trusted.publicKey.export({ type: 'spki', format: 'pem' }));
    o = await startTestOrigin({ trustKey: [pub] });
    client = o.client;
    const blob = randomBytes(1000);
    const d = sha256Of(blob);
    await client.putBlob(Readable.from([blob]), d, blob.length);
    m = testManifest('signed', '1', { digest: d, size: blob.length });
  });
  after(async () => {
    await o.close();
    rmSync(keyDir, { recursive: true, force: true });
  });

  it('refuses unsigned and untrusted manifests with 422, accepts a trusted signature', async () => {
    await assert.rejects(client.putManifest(m), (e) => isScError(e, 'SC_ERR_UNTRUSTED_KEY') && e.status === 422);
    await assert.rejects(client.putManifest(signManifest(m, stranger.privateKey)), (e) => isScError(e, 'SC_ERR_UNTRUSTED_KEY'));
    const signed = signManifest(m, trusted.privateKey);
    const tampered = { ...signed, role: 'base' as const };
    await assert.rejects(client.putManifest(tampered), (e) => isScError(e, 'SC_ERR_BAD_SIGNATURE') && e.status === 422);
    assert.equal((await client.putManifest(signed)).created, true);
  });
});
