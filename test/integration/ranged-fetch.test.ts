// One set of rules for a ranged blob request (shared/fetch-range.ts), proved from both sides: a
// host download (fetchBlob) and a stage fill (its upstream fetch) against the same misbehaving
// upstream: a wrong ETag, a gzip Content-Encoding, a `*` Content-Range total, a 416, a 200 to a
// Range request, a short body, an overlong body, and silence. The upstream is a small real HTTP
// server on 127.0.0.1 port 0, defined here.
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import type { FillInfo } from '../../services/stage/fill.js';
import { startStage } from '../../services/stage/main.js';
import { type Digest, sha256Of } from '../../shared/digest.js';
import type { ScError } from '../../shared/errors.js';
import { fetchBlob } from '../../shared/fetch.js';
import { silentLogger } from '../../shared/log.js';
import { httpGet, waitFor } from '../helpers/test-origin.js';
import { pseudoRandom } from './fetch-fixture.js';

/** How the upstream answers one blob request. */
type Answer =
  | { kind: 'honest'; etag?: string }
  /** Honest head; the body is cut (socket destroyed) after `after` bytes. */
  | { kind: 'cut'; after: number }
  /** Honest, but with this ETag. */
  | { kind: 'etag'; etag: string }
  /** Honest bytes, labelled `Content-Encoding: gzip`. */
  | { kind: 'gzip' }
  /** 206 whose Content-Range total is `*` (and a weak ETag). */
  | { kind: 'star' }
  /** 416 with `Content-Range: bytes * /<total>` (the real size unless given). */
  | { kind: '416'; total?: number }
  /** The whole blob with 200, whatever the Range. */
  | { kind: 'ignoreRange' }
  /** 206 for the rest of the blob, chunked, whose body ends cleanly `missing` bytes early. */
  | { kind: 'short'; missing: number }
  /** 206 for the rest of the blob, chunked, with `extra` bytes more than announced, in one write. */
  | { kind: 'overlong'; extra: number }
  /** Headers, then silence. */
  | { kind: 'silent' };

interface Upstream {
  url: string;
  /** Range header of every blob request, in order (undefined: none). */
  ranges: (string | undefined)[];
  close(): Promise<void>;
}

const cleanups: (() => Promise<unknown>)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c().catch(() => undefined);
});

/** An upstream serving `data`, answering request n (from 0) with `script(n)`. */
async function upstream(data: Buffer, script: (n: number) => Answer): Promise<Upstream> {
  const digest = sha256Of(data);
  const size = data.length;
  const ranges: (string | undefined)[] = [];
  const handle = (req: IncomingMessage, res: ServerResponse) => {
    if (req.url === '/healthz') return void res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}');
    if (req.url !== `/v1/blobs/${digest}`) return void res.writeHead(404, { 'content-type': 'application/json' }).end('{"error":{"code":"SC_ERR_BLOB_NOT_FOUND"}}');
    const a = script(ranges.length);
    ranges.push(req.headers.range);
    const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
    const start = m && a.kind !== 'ignoreRange' ? Number(m[1]) : 0;
    const etag = a.kind === 'etag' ? a.etag : a.kind === 'star' ? `W/"${digest}"` : `"${digest}"`;
    const head: Record<string, string | number> = { etag, 'content-type': 'application/octet-stream' };
    if (a.kind === '416') {
      res.writeHead(416, { 'content-range': `bytes */${a.total ?? size}`, 'content-type': 'application/json' }).end('{"error":{"code":"SC_ERR_BAD_RANGE"}}');
      return;
    }
    if (a.kind === 'gzip') head['content-encoding'] = 'gzip';
    const chunked = a.kind === 'short' || a.kind === 'overlong';
    const total = a.kind === 'star' ? '*' : String(size);
    const status = start > 0 || chunked || a.kind === 'star' ? 206 : 200;
    if (status === 206) head['content-range'] = `bytes ${start}-${size - 1}/${total}`;
    if (!chunked) head['content-length'] = size - start;
    res.writeHead(status, head);
    const body = data.subarray(start);
    if (a.kind === 'silent') return; // close() ends it
    if (a.kind === 'cut') {
      res.write(body.subarray(0, a.after), () => res.socket?.destroy());
      return;
    }
    if (a.kind === 'short') return void res.end(body.subarray(0, body.length - a.missing));
    if (a.kind === 'overlong') return void res.end(Buffer.concat([body, Buffer.alloc(a.extra, 0x55)]));
    res.end(body);
  };
  const srv = createServer(handle);
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const u: Upstream = {
    url: `http://127.0.0.1:${(srv.address() as AddressInfo).port}`,
    ranges,
    close: () =>
      new Promise<void>((r) => {
        srv.close(() => r());
        srv.closeAllConnections();
      }),
  };
  cleanups.push(() => u.close());
  return u;
}

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'ranged-fetch-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** A host download of `data` from `sources`; resolves with its result or its error. */
async function hostFetch(data: Buffer, sources: string[], extra: { idleTimeoutMs?: number; retries?: number } = {}) {
  const out = join(await tempDir(), 'out.bin');
  try {
    const r = await fetchBlob({ sources, digest: sha256Of(data), size: data.length, out, retries: extra.retries ?? 1, stallCheckMs: 0, idleTimeoutMs: extra.idleTimeoutMs, sleep: async () => {} });
    assert.ok((await readFile(out)).equals(data), 'the host file is the blob');
    return { ok: true as const, sources: r.sources, out };
  } catch (err) {
    return { ok: false as const, error: err as ScError, out };
  }
}

/** A stage fill of `data` from `upstreams` (asked by one client); resolves with the fill once it ended. */
async function stageFill(data: Buffer, upstreams: string[], extra: { idleTimeoutMs?: number; retriesPerUpstream?: number } = {}): Promise<FillInfo> {
  const dir = await tempDir();
  const s = await startStage(
    {
      listen: '127.0.0.1:0',
      upstreams,
      cache: join(dir, 'cache'),
      cacheSize: '64MiB',
      colo: 'ranged',
      backoffMs: 1,
      maxAttempts: 3,
      retriesPerUpstream: extra.retriesPerUpstream ?? 2,
      upstreamCheckIntervalMs: 0,
      ...(extra.idleTimeoutMs ? { idleTimeoutMs: extra.idleTimeoutMs } : {}),
    },
    { log: silentLogger },
  );
  cleanups.push(() => s.close());
  const d: Digest = sha256Of(data);
  // A fill that fails after its size was known ends the client's response before its head (a hang-up).
  const r = await httpGet(`${s.url}/v1/blobs/${d}`).catch(() => null);
  const fill = await waitFor(() => s.fills().find((f) => f.digest === d && f.state !== 'filling'), 20_000, 'fill ended');
  if (fill.state === 'committed') assert.ok(r?.complete && r.body.equals(data), 'the client got the blob');
  else assert.ok(!(r?.complete && r.status === 200), 'no client completes a failed fill');
  return fill;
}

/** The code of every failure a failed host download recorded, in order. */
const hostCodes = (e: ScError): string[] => ((e.details?.sources ?? []) as { code: string }[]).map((s) => s.code);

const KiB = 1024;
const data = pseudoRandom(300 * KiB, 5);

test('a wrong ETag fails every attempt with SC_ERR_UPSTREAM, on a host and on a stage', async () => {
  const bad = { kind: 'etag', etag: `"sha256:${'0'.repeat(64)}"` } as const;
  const h = await hostFetch(data, [(await upstream(data, () => bad)).url]);
  assert.equal(h.ok, false);
  assert.ok(!h.ok && hostCodes(h.error).length > 0 && hostCodes(h.error).every((c) => c === 'SC_ERR_UPSTREAM'));
  assert.match(h.ok ? '' : h.error.message, /ETag/);
  assert.equal(existsSync(`${h.out}.partial`), false, 'no byte of it was kept');
  const f = await stageFill(data, [(await upstream(data, () => bad)).url]);
  assert.equal(f.state, 'failed');
  assert.match(f.error?.message ?? '', /SC_ERR_UPSTREAM: .*ETag/);
  assert.equal(f.bytes, 0);
});

test('a gzip Content-Encoding fails every attempt with SC_ERR_UPSTREAM, on a host and on a stage', async () => {
  const h = await hostFetch(data, [(await upstream(data, () => ({ kind: 'gzip' }))).url]);
  assert.ok(!h.ok && hostCodes(h.error).every((c) => c === 'SC_ERR_UPSTREAM'));
  assert.match(h.ok ? '' : h.error.message, /Content-Encoding gzip/);
  const f = await stageFill(data, [(await upstream(data, () => ({ kind: 'gzip' }))).url]);
  assert.equal(f.state, 'failed');
  assert.match(f.error?.message ?? '', /SC_ERR_UPSTREAM: .*Content-Encoding gzip/);
});

test('a 206 whose Content-Range total is `*` (weak ETag) continues a known-size blob, on a host and on a stage', async () => {
  const script = (n: number): Answer => (n === 0 ? { kind: 'cut', after: 100 * KiB } : { kind: 'star' });
  const hu = await upstream(data, script);
  const h = await hostFetch(data, [hu.url]);
  assert.ok(h.ok, h.ok ? '' : h.error.message);
  assert.equal(hu.ranges.length, 2);
  assert.match(hu.ranges[1] ?? '', /^bytes=\d+-$/);
  const su = await upstream(data, script);
  const f = await stageFill(data, [su.url]);
  assert.equal(f.state, 'committed', f.error?.message);
  assert.equal(su.ranges.length, 2, 'the stage knew the size from the first answer: the `*` answer was accepted');
  assert.match(su.ranges[1] ?? '', /^bytes=\d+-$/);
});

test('a 416 to the resume point is SC_ERR_BAD_RANGE (SC_ERR_SIZE_MISMATCH when its total differs), on a host and on a stage', async () => {
  for (const total of [undefined, data.length - 1]) {
    const code = total === undefined ? 'SC_ERR_BAD_RANGE' : 'SC_ERR_SIZE_MISMATCH';
    const script = (n: number): Answer => (n === 0 ? { kind: 'cut', after: 100 * KiB } : { kind: '416', total });
    const hu = await upstream(data, script);
    const h = await hostFetch(data, [hu.url]);
    assert.ok(!h.ok);
    assert.equal(hostCodes(h.error).at(-1), code);
    assert.ok(existsSync(`${h.out}.partial`), 'the host keeps its partial for a later resume');
    const su = await upstream(data, script);
    const f = await stageFill(data, [su.url]);
    assert.equal(f.state, 'failed');
    assert.match(f.error?.message ?? '', new RegExp(`${code}: `));
    // The stage knows the size from its first answer: a 416 does not make it forget what it holds.
    const held = su.ranges[1];
    assert.ok(held && su.ranges.slice(1).every((r) => r === held), `every retry asked from the same offset: ${su.ranges.join(', ')}`);
  }
});

test('a 200 to a Range request continues after the bytes held, on a host and on a stage', async () => {
  const a1 = await upstream(data, () => ({ kind: 'cut', after: 100 * KiB }));
  const b1 = await upstream(data, () => ({ kind: 'ignoreRange' }));
  const h = await hostFetch(data, [a1.url, b1.url]);
  assert.ok(h.ok, h.ok ? '' : h.error.message);
  assert.deepEqual(h.sources, [a1.url, b1.url], 'both pieces are in the file');
  assert.match(b1.ranges[0] ?? '', /^bytes=\d+-$/);
  const a2 = await upstream(data, () => ({ kind: 'cut', after: 100 * KiB }));
  const b2 = await upstream(data, () => ({ kind: 'ignoreRange' }));
  const f = await stageFill(data, [a2.url, b2.url], { retriesPerUpstream: 0 });
  assert.equal(f.state, 'committed', f.error?.message);
  assert.deepEqual(f.sources, [a2.url, b2.url], 'both pieces are in the fill');
  assert.equal(b2.ranges.length, 1);
  assert.match(b2.ranges[0] ?? '', /^bytes=\d+-$/);
});

test('a body that ends short of its range is resumed from the last byte received, on a host and on a stage', async () => {
  const missing = 1000;
  const script = (n: number): Answer => (n === 0 ? { kind: 'short', missing } : { kind: 'honest' });
  for (const side of ['host', 'stage'] as const) {
    const u = await upstream(data, script);
    if (side === 'host') assert.ok((await hostFetch(data, [u.url])).ok);
    else assert.equal((await stageFill(data, [u.url])).state, 'committed');
    assert.deepEqual(u.ranges, [undefined, `bytes=${data.length - missing}-`], side);
  }
});

test('an overlong body fails with SC_ERR_SIZE_MISMATCH and no byte past the announced end is kept, on a host and on a stage', async () => {
  // Small enough to arrive in one chunk: the chunk that runs past the end is not written at all.
  const small = pseudoRandom(1000, 9);
  const h = await hostFetch(small, [(await upstream(small, () => ({ kind: 'overlong', extra: 1000 }))).url]);
  assert.ok(!h.ok && hostCodes(h.error).length > 0 && hostCodes(h.error).every((c) => c === 'SC_ERR_SIZE_MISMATCH'), h.ok ? '' : hostCodes(h.error).join());
  assert.equal(existsSync(`${h.out}.partial`), false);
  const f = await stageFill(small, [(await upstream(small, () => ({ kind: 'overlong', extra: 1000 }))).url]);
  assert.equal(f.state, 'failed');
  assert.match(f.error?.message ?? '', /SC_ERR_SIZE_MISMATCH: /);
  assert.equal(f.bytes, 0);
});

test('silence after the headers is SC_ERR_TIMEOUT at the idle timeout, on a host and on a stage', async () => {
  const h = await hostFetch(data, [(await upstream(data, () => ({ kind: 'silent' }))).url], { idleTimeoutMs: 200, retries: 0 });
  assert.ok(!h.ok);
  assert.deepEqual(hostCodes(h.error), ['SC_ERR_TIMEOUT']);
  const f = await stageFill(data, [(await upstream(data, () => ({ kind: 'silent' }))).url], { idleTimeoutMs: 200 });
  assert.equal(f.state, 'failed');
  assert.match(f.error?.message ?? '', /SC_ERR_TIMEOUT: /);
});
