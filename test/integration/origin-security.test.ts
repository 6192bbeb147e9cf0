import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { connect } from 'node:net';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { pino } from 'pino';
import { sha256Of } from '../../shared/digest.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';
import { testManifest } from '../helpers/store-contract.js';

interface RawResponse {
  status: number;
  body: string;
}

/** One request with the path sent byte for byte (no client-side normalisation). */
function raw(base: string, path: string, opts: { method?: string; headers?: Record<string, string>; body?: Buffer | string } = {}): Promise<RawResponse> {
  const u = new URL(base);
  return new Promise((resolve, reject) => {
    const req = request({ host: u.hostname, port: u.port, path, method: opts.method ?? 'GET', headers: opts.headers, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => {
        body += c;
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end(opts.body);
  });
}

function codeOf(r: RawResponse): string | undefined {
  try {
    return JSON.parse(r.body).error?.code;
  } catch {
    return undefined;
  }
}

/** Polls `cond` until true or the deadline passes (then fails). */
async function until(cond: () => boolean, what: string, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('origin security', () => {
  let o: TestOrigin;
  let logs = '';
  const blob = randomBytes(10_000);
  const digest = sha256Of(blob);

  before(async () => {
    const sink = new Writable({
      write(chunk, _enc, cb) {
        logs += chunk.toString();
        cb();
      },
    });
    o = await startTestOrigin({ logger: pino({ level: 'debug' }, sink) });
    // A canary outside the data dir, where a traversal from blobs/ or manifests/ would land.
    writeFileSync(join(o.root, 'canary'), 'CANARY-OUTSIDE-DATA');
    writeFileSync(join(o.root, 'canary.json'), 'CANARY-OUTSIDE-DATA');
    mkdirSync(join(o.root, 'etc'), { recursive: true });
    writeFileSync(join(o.root, 'etc', 'passwd'), 'CANARY-OUTSIDE-DATA');
    await o.client.putBlob(Readable.from([blob]), digest, blob.length);
  });
  after(async () => {
    await o.close();
  });

  it('answers writes without a token 401 and with a wrong token 403, and never logs a token', async () => {
    const wrong = `${o.token.slice(0, -4)}beef`;
    const d = sha256Of('x');
    let r = await raw(o.url, `/v1/blobs/${d}`, { method: 'PUT', body: 'x' });
    assert.equal(r.status, 401);
    assert.equal(codeOf(r), 'SC_ERR_UNAUTHORIZED');
    r = await raw(o.url, `/v1/blobs/${d}`, { method: 'PUT', headers: { authorization: `Bearer ${wrong}` }, body: 'x' });
    assert.equal(r.status, 403);
    assert.equal(codeOf(r), 'SC_ERR_FORBIDDEN');
    r = await raw(o.url, `/v1/blobs/${d}`, { method: 'PUT', headers: { authorization: `Basic ${o.token}` }, body: 'x' });
    assert.equal(r.status, 401);
    const m = JSON.stringify(testManifest('tok', '1', { digest, size: blob.length }));
    r = await raw(o.url, '/v1/bundles/tok/1', { method: 'PUT', headers: { authorization: `Bearer ${wrong}` }, body: m });
    assert.equal(r.status, 403);
    r = await raw(o.url, '/v1/bundles/tok/1', { method: 'PUT', body: m });
    assert.equal(r.status, 401);
    assert.equal((await raw(o.url, `/v1/blobs/${sha256Of('x')}`, { method: 'HEAD' })).status, 404, 'nothing was stored');
    r = await raw(o.url, `/v1/blobs/${d}`, { method: 'PUT', headers: { authorization: `Bearer ${o.token}` }, body: 'x' });
    assert.equal(r.status, 201);
    r = await raw(o.url, `/v1/blobs/${sha256Of('y')}`, { method: 'PUT', headers: { authorization: `Bearer ${o.token}` }, body: 'z' });
    assert.equal(r.status, 422);
    await until(() => logs.includes('"status":422'), 'the request log line');
    assert.ok(logs.includes('"status":403'), 'requests are logged at debug');
    assert.ok(!logs.includes(o.token), 'the token appears in the logs');
    assert.ok(!logs.includes(wrong), 'the wrong token appears in the logs');
  });

  it('answers malformed digests 400 SC_ERR_BAD_DIGEST', async () => {
    const hex = digest.slice(7);
    const bad = [
      `/v1/blobs/${hex}`,
      `/v1/blobs/sha256:${hex.toUpperCase()}`,
      `/v1/blobs/sha256:${hex.slice(1)}`,
      `/v1/blobs/sha256:${hex}0`,
      `/v1/blobs/sha512:${hex}`,
      `/v1/blobs/sha256:${hex.slice(0, 63)}g`,
      `/v1/blobs/sha256%3A${hex}`,
      `/v1/blobs/sha256:${hex}/extra`,
    ];
    for (const p of bad) {
      const r = await raw(o.url, p);
      assert.equal(r.status, 400, p);
      assert.equal(codeOf(r), 'SC_ERR_BAD_DIGEST', p);
    }
    assert.equal((await raw(o.url, `/v1/blobs/${digest}`)).status, 200);
  });

  it('answers traversal attempts 400 and never serves a file outside the data dir', async () => {
    const attempts = [
      '/v1/blobs/sha256:../../etc/passwd',
      '/v1/blobs/sha256:../../../../canary',
      '/v1/blobs/..%2F..%2F..%2F..%2Fcanary',
      '/v1/blobs/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fcanary',
      '/v1/blobs/%252e%252e%252f%252e%252e%252fcanary',
      '/v1/blobs/sha256:%2F..%2F..%2Fcanary',
      `/v1/blobs/${digest}/../../../../../canary`,
      '/v1/blobs/..\\..\\..\\..\\canary',
      '/v1/bundles/../../canary',
      '/v1/bundles/..%2F..%2F/canary',
      '/v1/bundles/%2e%2e/canary',
      '/v1/bundles/%252e%252e/canary',
      '/v1/bundles/x/..%2F..%2F..%2Fcanary',
      '/v1/bundles/./../canary',
      '/v1/bundles/x/../../../canary',
      '//etc/passwd',
      '/../../etc/passwd',
      '/v1/../../canary',
      '/v1/bundles/a%00/1',
    ];
    for (const p of attempts) {
      const r = await raw(o.url, p);
      assert.equal(r.status, 400, `${p} → ${r.status} ${r.body}`);
      assert.match(codeOf(r) ?? '', /^SC_ERR_BAD_(PATH|DIGEST|NAME|VERSION)$/, p);
      assert.ok(!r.body.includes('CANARY'), p);
    }
    // Over a raw socket too, where no client library can tidy the path up.
    for (const p of ['/v1/blobs/sha256:../../../../canary', '/v1/bundles/../../canary.json', '/v1/bundles/..%2f..%2fcanary/x']) {
      const text = await new Promise<string>((resolve, reject) => {
        const s = connect(Number(new URL(o.url).port), '127.0.0.1');
        let got = '';
        s.on('data', (c) => {
          got += c.toString();
        });
        s.on('end', () => resolve(got));
        s.on('error', reject);
        s.write(`GET ${p} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
      });
      assert.match(text, /^HTTP\/1\.1 400 /, p);
      assert.ok(!text.includes('CANARY'), p);
    }
  });

  it('answers names and versions outside the grammar 400', async () => {
    for (const [p, code] of [
      ['/v1/bundles/Upper/1', 'SC_ERR_BAD_NAME'],
      ['/v1/bundles/.hidden/1', 'SC_ERR_BAD_NAME'],
      ['/v1/bundles/x/-1', 'SC_ERR_BAD_VERSION'],
      [`/v1/bundles/${'a'.repeat(65)}/1`, 'SC_ERR_BAD_NAME'],
      ['/v1/bundles/x/1:2', 'SC_ERR_BAD_VERSION'],
      ['/v1/bundles/x', 'SC_ERR_BAD_PATH'],
      ['/v1/bundles/x/1/2', 'SC_ERR_BAD_PATH'],
      ['/v1/nothing', 'SC_ERR_BAD_PATH'],
    ] as const) {
      const r = await raw(o.url, p);
      assert.equal(r.status, 400, p);
      assert.equal(codeOf(r), code, p);
    }
  });

  it('removes a killed upload: nothing visible, no temp file left', async () => {
    const big = randomBytes(8 * 1024 * 1024);
    const d = sha256Of(big);
    const u = new URL(o.url);
    const req = request({
      host: u.hostname,
      port: u.port,
      path: `/v1/blobs/${d}`,
      method: 'PUT',
      agent: false,
      headers: { authorization: `Bearer ${o.token}`, 'content-length': String(big.length) },
    });
    req.on('error', () => {});
    req.write(big.subarray(0, 2 * 1024 * 1024));
    const tmp = join(o.dataDir, 'tmp');
    const partSize = () => readdirSync(tmp).reduce((n, f) => n + statSync(join(tmp, f)).size, 0);
    await until(() => readdirSync(tmp).length > 0 && partSize() > 0, 'the upload to reach the temp file');
    req.destroy();
    await until(() => readdirSync(tmp).length === 0, 'the temp file to be removed');
    assert.equal((await raw(o.url, `/v1/blobs/${d}`, { method: 'HEAD' })).status, 404);
    assert.equal((await o.client.health()).ok, true);
  });

  it('answers a 1 MB header with 431 and stays up', async () => {
    const text = await new Promise<string>((resolve) => {
      const s = connect(Number(new URL(o.url).port), '127.0.0.1');
      let got = '';
      s.on('data', (c) => {
        got += c.toString();
      });
      s.on('close', () => resolve(got));
      s.on('error', () => {});
      s.write(`GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(1024 * 1024)}\r\n\r\n`);
    });
    assert.match(text, /^HTTP\/1\.1 431 /);
    assert.equal((await o.client.health()).ok, true);
  });
});
