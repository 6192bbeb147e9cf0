// Hostile and malformed input: each gets a clean 4xx with a code, and the stage stays up.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { request } from 'node:http';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import type { Digest } from '../../shared/digest.js';
import { silentLogger } from '../../shared/log.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import { type TestOrigin, httpGet, startTestOrigin } from '../helpers/test-origin.js';

let origin: TestOrigin;
let stage: RunningStage;
let dir: string;
let d: Digest;
const data = randomBytes(256 * 1024);

before(async () => {
  origin = await startTestOrigin();
  dir = await mkdtemp(join(tmpdir(), 'stage-input-'));
  stage = await startStage(
    { listen: '127.0.0.1:0', upstreams: [origin.url], cache: join(dir, 'cache'), cacheSize: '64MiB', colo: 'input' },
    { log: silentLogger },
  );
  d = origin.addBlob(data);
});

after(async () => {
  await stage.close();
  await origin.close();
  await rm(dir, { recursive: true, force: true });
});

/** Sends a request path verbatim (no client-side normalisation). */
function raw(path: string, method = 'GET', headers: Record<string, string> = {}): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port: stage.port, path, method, headers, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => {
        body += c;
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

const code = (body: string) => (JSON.parse(body) as { error: { code: string } }).error.code;

async function stillUp(): Promise<void> {
  const h = await raw('/healthz');
  assert.equal(h.status, 200);
}

test('malformed digests and path shapes get 400 with a code', async () => {
  const cases: [string, string][] = [
    ['/v1/blobs/sha256:abc', 'SC_ERR_BAD_DIGEST'],
    [`/v1/blobs/sha256:${'A'.repeat(64)}`, 'SC_ERR_BAD_DIGEST'],
    [`/v1/blobs/md5:${'a'.repeat(32)}`, 'SC_ERR_BAD_DIGEST'],
    [`/v1/blobs/sha256:${'a'.repeat(65)}`, 'SC_ERR_BAD_DIGEST'],
    ['/v1/blobs/', 'SC_ERR_BAD_DIGEST'],
    ['/v1/blobs', 'SC_ERR_BAD_PATH'],
    [`/v1/blobs/${d}/extra`, 'SC_ERR_BAD_DIGEST'],
    ['/v1/blobs/%zz', 'SC_ERR_BAD_DIGEST'],
    ['/v1/bundles/Bad_Name/1.0', 'SC_ERR_BAD_NAME'],
    ['/v1/bundles/ok/-bad', 'SC_ERR_BAD_VERSION'],
    ['/v1/bundles/a/b/c', 'SC_ERR_BAD_PATH'],
  ];
  for (const [path, c] of cases) {
    const r = await raw(path);
    assert.equal(r.status, 400, path);
    assert.equal(code(r.body), c, path);
  }
  await stillUp();
});

test('path traversal, plain and encoded, never reaches the disk or the upstream', async () => {
  const paths = [
    '/v1/blobs/sha256:../../etc/passwd',
    '/v1/blobs/sha256:..%2f..%2fetc%2fpasswd',
    '/v1/blobs/sha256%3a%2e%2e%2f%2e%2e%2fetc%2fpasswd',
    '/v1/blobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd',
    '/v1/blobs/sha256:%252e%252e%252fetc%252fpasswd',
    '/v1/blobs/..%5c..%5cetc%5cpasswd',
    '/v1/bundles/..%2f..%2fetc/passwd',
  ];
  origin.resetCounters();
  for (const p of paths) {
    const r = await raw(p);
    assert.ok(r.status === 400, `${p} -> ${r.status}`);
    assert.doesNotMatch(r.body, /root:/);
  }
  assert.equal(origin.requests.length, 0);
  assert.equal(origin.manifestRequests, 0);
  await stillUp();
});

test('Range: unsatisfiable 416, malformed 416, multi-range answered with the full 200', async () => {
  for (const when of ['cold', 'cached']) {
    if (when === 'cold') origin.resetCounters();
    const bad = await httpGet(`${stage.url}/v1/blobs/${d}`, { range: `bytes=${data.length + 10}-` });
    assert.equal(bad.status, 416, when);
    assert.equal(code(bad.body.toString()), 'SC_ERR_BAD_RANGE');
    const junk = await httpGet(`${stage.url}/v1/blobs/${d}`, { range: 'bytes=abc' });
    assert.equal(junk.status, 416, when);
    const multi = await httpGet(`${stage.url}/v1/blobs/${d}`, { range: 'bytes=0-9,100-199' });
    assert.equal(multi.status, 200, when);
    assert.ok(multi.complete && multi.body.equals(data));
    const other = await httpGet(`${stage.url}/v1/blobs/${d}`, { range: 'items=0-9' });
    assert.equal(other.status, 200, when);
    const inm = await httpGet(`${stage.url}/v1/blobs/${d}`, { 'if-none-match': `"${d}"` });
    assert.equal(inm.status, 304, when);
  }
  assert.equal(origin.blobGets(d), 1);
  await stillUp();
});

test('a 1 MB header gets 431 and the stage stays up', async () => {
  const reply = await new Promise<string>((resolve, reject) => {
    const s = connect(stage.port, '127.0.0.1');
    let got = '';
    s.on('data', (c) => {
      got += c.toString();
    });
    s.on('close', () => resolve(got));
    s.on('error', (err: NodeJS.ErrnoException) => (err.code === 'ECONNRESET' || err.code === 'EPIPE' ? resolve(got) : reject(err)));
    s.write(`GET /v1/blobs/${d} HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(1024 * 1024)}\r\n\r\n`);
  });
  assert.match(reply, /^HTTP\/1\.1 431 /);
  assert.match(reply, /SC_ERR_HEADER_TOO_LARGE/);
  await stillUp();
});

test('writes are refused: the stage is read-only', async () => {
  const r = await raw(`/v1/blobs/${d}`, 'PUT');
  assert.equal(r.status, 405);
  assert.equal(code(r.body), 'SC_ERR_METHOD_NOT_ALLOWED');
  const m = await raw('/v1/bundles/rescue-os/1.0.0', 'PUT');
  assert.equal(m.status, 405);
  const u = await raw('/nope');
  assert.equal(u.status, 400);
  assert.equal(code(u.body), 'SC_ERR_BAD_PATH');
  const p = await raw('/v1/prefetch', 'POST', { authorization: 'Bearer x', 'content-type': 'application/json' });
  assert.equal(p.status, 403, 'prefetch is disabled without a token');
  await stillUp();
});
