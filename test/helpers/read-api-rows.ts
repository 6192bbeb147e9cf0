/**
 * The read API contract as a table (shared/http/read-api.ts): requests, and what every tier must
 * answer to each, compared header by header with origin's answer to the same request. Used by
 * read-api-contract.test.ts (origin, and a stage cold and warm) and stage-nginx.test.ts (a stage
 * behind nginx).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { request } from 'node:http';
import { Readable } from 'node:stream';
import { type Digest, sha256Of } from '../../shared/digest.js';
import { canonicalJson, type Manifest } from '../../shared/manifest.js';
import { startTestOrigin, type TestOrigin } from './origin.js';
import { testManifest } from './store-contract.js';

export interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

/** One request with the path sent exactly as given (no client-side normalisation). */
export function send(base: string, path: string, method = 'GET', headers: Record<string, string> = {}): Promise<Answer> {
  const u = new URL(base);
  return new Promise((resolve, reject) => {
    const req = request({ host: u.hostname, port: u.port, path, method, headers, agent: false }, (res) => {
      const parts: Buffer[] = [];
      res.on('data', (c: Buffer) => parts.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(parts) }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  });
}

export function codeOf(a: Answer): string | undefined {
  try {
    return (JSON.parse(a.body.toString()) as { error?: { code?: string } }).error?.code;
  } catch {
    return undefined;
  }
}

/** What a row may use: its own blob (a miss on a cold stage), the published manifest. */
export interface Fixture {
  data: Buffer;
  digest: Digest;
  manifest: Manifest;
}

/** One request of the table and what both tiers must answer. */
export interface Row {
  name: string;
  method?: string;
  path(f: Fixture): string;
  headers?(f: Fixture): Record<string, string>;
  status: number;
  code?: string;
  /** Headers compared between origin and stage (and present). */
  same: string[];
  /** Expected body, when the answer has one to check. */
  body?(f: Fixture): Buffer;
  /** Expected `Allow`: a function of the tier, since origin also takes PUT. */
  allow?(tier: 'origin' | 'stage'): string;
}

const BLOB = ['etag', 'accept-ranges', 'cache-control', 'content-type', 'content-length'];
const ERR = ['cache-control', 'content-type'];
const withPut = (tier: 'origin' | 'stage') => (tier === 'origin' ? 'GET, HEAD, PUT' : 'GET, HEAD');

export const ROWS: Row[] = [
  { name: 'good blob', path: (f) => `/v1/blobs/${f.digest}`, status: 200, same: BLOB, body: (f) => f.data },
  { name: 'HEAD blob', method: 'HEAD', path: (f) => `/v1/blobs/${f.digest}`, status: 200, same: BLOB, body: () => Buffer.alloc(0) },
  {
    name: 'single Range',
    path: (f) => `/v1/blobs/${f.digest}`,
    headers: () => ({ range: 'bytes=10-99' }),
    status: 206,
    same: [...BLOB, 'content-range'],
    body: (f) => f.data.subarray(10, 100),
  },
  {
    name: 'suffix Range',
    path: (f) => `/v1/blobs/${f.digest}`,
    headers: () => ({ range: 'bytes=-7' }),
    status: 206,
    same: [...BLOB, 'content-range'],
    body: (f) => f.data.subarray(f.data.length - 7),
  },
  {
    name: 'multi-range answered whole',
    path: (f) => `/v1/blobs/${f.digest}`,
    headers: () => ({ range: 'bytes=0-9,100-199' }),
    status: 200,
    same: BLOB,
    body: (f) => f.data,
  },
  {
    name: 'unsatisfiable Range',
    path: (f) => `/v1/blobs/${f.digest}`,
    headers: (f) => ({ range: `bytes=${f.data.length + 10}-` }),
    status: 416,
    code: 'SC_ERR_BAD_RANGE',
    same: ['etag', 'accept-ranges', 'content-range', ...ERR],
  },
  { name: 'malformed Range', path: (f) => `/v1/blobs/${f.digest}`, headers: () => ({ range: 'bytes=abc' }), status: 416, code: 'SC_ERR_BAD_RANGE', same: ERR },
  {
    name: 'If-None-Match',
    path: (f) => `/v1/blobs/${f.digest}`,
    headers: (f) => ({ 'if-none-match': `"sha256:${'0'.repeat(64)}", W/"${f.digest}"` }),
    status: 304,
    same: ['etag', 'cache-control'],
    body: () => Buffer.alloc(0),
  },
  { name: 'If-None-Match: *', path: (f) => `/v1/blobs/${f.digest}`, headers: () => ({ 'if-none-match': '*' }), status: 304, same: ['etag'] },
  { name: 'If-None-Match, other ETag', path: (f) => `/v1/blobs/${f.digest}`, headers: () => ({ 'if-none-match': '"x"' }), status: 200, same: BLOB },
  { name: 'unknown blob', path: () => `/v1/blobs/${sha256Of(randomBytes(8))}`, status: 404, code: 'SC_ERR_BLOB_NOT_FOUND', same: ERR },
  { name: 'short digest', path: () => '/v1/blobs/sha256:abc', status: 400, code: 'SC_ERR_BAD_DIGEST', same: ERR },
  { name: 'uppercase digest', path: (f) => `/v1/blobs/sha256:${f.digest.slice(7).toUpperCase()}`, status: 400, code: 'SC_ERR_BAD_DIGEST', same: ERR },
  { name: '/extra after the digest', path: (f) => `/v1/blobs/${f.digest}/extra`, status: 400, code: 'SC_ERR_BAD_DIGEST', same: ERR },
  { name: 'percent-encoded digest', path: (f) => `/v1/blobs/sha256%3A${f.digest.slice(7)}`, status: 400, code: 'SC_ERR_BAD_DIGEST', same: ERR },
  { name: 'empty blob segment', path: () => '/v1/blobs/', status: 400, code: 'SC_ERR_BAD_DIGEST', same: ERR },
  { name: 'blob traversal', path: () => '/v1/blobs/sha256:../../etc/passwd', status: 400, code: 'SC_ERR_BAD_DIGEST', same: ERR },
  { name: '/v1/blobs alone', path: () => '/v1/blobs', status: 400, code: 'SC_ERR_BAD_PATH', same: ERR },
  { name: 'unknown route', path: () => '/v1/nothing', status: 400, code: 'SC_ERR_BAD_PATH', same: ERR },
  { name: 'unknown top-level route', path: () => '/nope', status: 400, code: 'SC_ERR_BAD_PATH', same: ERR },
  { name: 'trailing slash', path: () => '/healthz/', status: 400, code: 'SC_ERR_BAD_PATH', same: ERR },
  { name: 'bundle traversal', path: () => '/v1/bundles/..%2f..%2fetc/passwd', status: 400, code: 'SC_ERR_BAD_PATH', same: ERR },
  { name: 'POST on a blob', method: 'POST', path: (f) => `/v1/blobs/${f.digest}`, status: 405, code: 'SC_ERR_METHOD_NOT_ALLOWED', same: ERR, allow: withPut },
  { name: 'DELETE on a blob', method: 'DELETE', path: (f) => `/v1/blobs/${f.digest}`, status: 405, code: 'SC_ERR_METHOD_NOT_ALLOWED', same: ERR, allow: withPut },
  {
    name: 'DELETE on a manifest',
    method: 'DELETE',
    path: (f) => `/v1/bundles/${f.manifest.name}/${f.manifest.version}`,
    status: 405,
    code: 'SC_ERR_METHOD_NOT_ALLOWED',
    same: ERR,
    allow: withPut,
  },
  { name: 'POST on the listing', method: 'POST', path: () => '/v1/bundles', status: 405, code: 'SC_ERR_METHOD_NOT_ALLOWED', same: [...ERR, 'allow'] },
  { name: 'DELETE on /healthz', method: 'DELETE', path: () => '/healthz', status: 405, code: 'SC_ERR_METHOD_NOT_ALLOWED', same: [...ERR, 'allow'] },
  { name: 'POST on /metrics', method: 'POST', path: () => '/metrics', status: 405, code: 'SC_ERR_METHOD_NOT_ALLOWED', same: [...ERR, 'allow'] },
  {
    name: 'manifest',
    path: (f) => `/v1/bundles/${f.manifest.name}/${f.manifest.version}`,
    status: 200,
    same: ['etag', 'cache-control', 'content-type', 'content-length'],
    body: (f) => Buffer.from(canonicalJson(f.manifest)),
  },
  {
    name: 'HEAD manifest',
    method: 'HEAD',
    path: (f) => `/v1/bundles/${f.manifest.name}/${f.manifest.version}`,
    status: 200,
    same: ['etag', 'cache-control', 'content-type', 'content-length'],
  },
  {
    name: 'manifest If-None-Match',
    path: (f) => `/v1/bundles/${f.manifest.name}/${f.manifest.version}`,
    headers: () => ({ 'if-none-match': '*' }),
    status: 304,
    same: ['etag', 'cache-control'],
  },
  { name: 'unknown manifest', path: () => '/v1/bundles/rescue-os/9.9.9', status: 404, code: 'SC_ERR_MANIFEST_NOT_FOUND', same: ERR },
  { name: 'bad name', path: () => '/v1/bundles/Bad_Name/1.0', status: 400, code: 'SC_ERR_BAD_NAME', same: ERR },
  { name: 'bad version', path: () => '/v1/bundles/ok/-bad', status: 400, code: 'SC_ERR_BAD_VERSION', same: ERR },
  { name: 'bundle path too short', path: () => '/v1/bundles/ok', status: 400, code: 'SC_ERR_BAD_PATH', same: ERR },
  { name: 'bundle path too long', path: () => '/v1/bundles/a/b/c', status: 400, code: 'SC_ERR_BAD_PATH', same: ERR },
  { name: 'listing', path: () => '/v1/bundles', status: 200, same: ['cache-control', 'content-type'] },
  { name: 'healthz', path: () => '/healthz', status: 200, same: ['cache-control', 'content-type'] },
  { name: 'metrics', path: () => '/metrics', status: 200, same: ['cache-control', 'content-type'] },
];

/** Checks answer `a` of `tier` to `row` against the row and against origin's answer `o` to the same request. */
export function checkAnswer(row: Row, f: Fixture, tier: 'origin' | 'stage', a: Answer, o: Answer, via: string = tier): void {
  const what = `${row.name} (${via}): ${row.method ?? 'GET'} ${row.path(f)}`;
  assert.equal(a.status, row.status, `${what}: ${a.body.toString().slice(0, 200)}`);
  assert.equal(codeOf(a), row.code, what);
  if (row.body) assert.ok(a.body.equals(row.body(f)), `${what}: body`);
  if (row.allow) assert.equal(a.headers.allow, row.allow(tier), `${what}: Allow`);
  for (const h of row.same) {
    assert.notEqual(a.headers[h], undefined, `${what}: no ${h}`);
    assert.deepEqual(a.headers[h], o.headers[h], `${what}: ${h}`);
  }
}

/** A real origin holding what the rows need, and its answer to every row. */
export interface ContractOrigin {
  origin: TestOrigin;
  /** One blob per row, so that on a cold stage every blob row takes the fill path. */
  blobs: { data: Buffer; digest: Digest }[];
  /** What row `i` may use: its own blob, and the published manifest (of blob 0). */
  fixture(i: number): Fixture;
  /** Origin's answer to each row, by row name. */
  answers: Map<string, Answer>;
}

/** Starts a test origin with one random blob of about `blobBytes` per row and a manifest, and asks it every row. */
export async function startContractOrigin(blobBytes: number): Promise<ContractOrigin> {
  const origin = await startTestOrigin();
  const blobs: { data: Buffer; digest: Digest }[] = [];
  for (let i = 0; i < ROWS.length; i++) {
    const data = randomBytes(blobBytes + i);
    const digest = sha256Of(data);
    await origin.client.putBlob(Readable.from([data]), digest, data.length);
    blobs.push({ data, digest });
  }
  const manifest = testManifest('rescue-os', '1.0.0', { digest: blobs[0].digest, size: blobs[0].data.length });
  await origin.client.putManifest(manifest);
  const fixture = (i: number): Fixture => ({ ...blobs[i], manifest });
  const answers = new Map<string, Answer>();
  for (const [i, row] of ROWS.entries()) {
    const f = fixture(i);
    answers.set(row.name, await send(origin.url, row.path(f), row.method, row.headers?.(f)));
  }
  return { origin, blobs, fixture, answers };
}
