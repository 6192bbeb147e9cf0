/**
 * A controllable upstream for stage tests and benchmarks: a real HTTP server on 127.0.0.1 (port 0)
 * that speaks the read API (blobs with Range/206/416/ETag/304/HEAD, manifests, listing,
 * /healthz), serving blobs from memory or files. Knobs: a shared byte-rate limiter, one-shot
 * faults (cut the connection after N bytes, stall after N bytes, flip one byte, answer a status)
 * and a persistent status; it records every blob request and counts body bytes sent.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { open, stat } from 'node:fs/promises';
import { type IncomingMessage, type Server, type ServerResponse, createServer, request } from 'node:http';
import type { AddressInfo } from 'node:net';
import parseRange from 'range-parser';
import type { Digest } from '../../shared/digest.js';
import { type Manifest, canonicalJson, manifestDigest } from '../../shared/manifest.js';

/** A one-shot fault, applied to the next GET of a blob (of `digest`, if given). */
export type Fault =
  | { kind: 'cut'; afterBytes: number; digest?: Digest }
  | { kind: 'stall'; afterBytes: number; digest?: Digest }
  | { kind: 'flip'; offset: number; digest?: Digest }
  | { kind: 'status'; status: number; digest?: Digest };

/** One recorded blob request. `start` is the first body byte asked for (0 without Range). */
export interface BlobRequest {
  method: string;
  digest: string;
  range?: string;
  start: number;
  status: number;
}

interface Source {
  size: number;
  data?: Buffer;
  path?: string;
}

/** Options of `startTestOrigin`. */
export interface TestOriginOptions {
  /** Shared body rate limit for all connections, bytes per second (null: unlimited). */
  rateBytesPerSec?: number | null;
  /** Body write size. */
  chunkSize?: number;
  /** Port to listen on (default 0: a free one). */
  port?: number;
}

/** A running test origin. */
export interface TestOrigin {
  url: string;
  port: number;
  server: Server;
  /** Adds an in-memory blob; returns its digest. */
  addBlob(data: Buffer): Digest;
  /** Adds a blob served from a file (hashed once here); returns its digest. */
  addBlobFile(path: string): Promise<Digest>;
  /** Makes a blob unknown (404) again. */
  removeBlob(d: Digest): void;
  /** Adds a manifest (served as canonical JSON) and lists it. */
  addManifest(m: Manifest): void;
  /** Changes the shared rate limit (bytes/s, null for none). */
  setRate(bytesPerSec: number | null): void;
  /** Queues a one-shot fault. */
  fault(f: Fault): void;
  /** Every blob request answers this status until set back to null. */
  setStatus(status: number | null): void;
  /** While true, /healthz never answers (a busy upstream: blobs still flow). */
  hangHealth(on: boolean): void;
  /** Every blob request seen, in order. */
  readonly requests: BlobRequest[];
  /** GET blob requests seen (HEAD excluded). */
  blobGets(digest?: Digest): number;
  /** Body bytes written for blobs. */
  readonly bytesSent: number;
  /** Manifest GETs seen. */
  readonly manifestRequests: number;
  /** Resets the request log and counters. */
  resetCounters(): void;
  /** Stops the server and drops every connection (stalled ones too). */
  close(): Promise<void>;
}

class Limiter {
  rate: number | null;
  #next = 0;
  constructor(rate: number | null) {
    this.rate = rate;
  }
  async take(n: number): Promise<void> {
    if (!this.rate) return;
    const now = performance.now();
    const start = Math.max(now - 20, this.#next); // a late timer may catch up 20 ms, so the long-run rate is exact
    this.#next = start + (n * 1000) / this.rate;
    const wait = this.#next - now;
    if (wait >= 1) await new Promise((r) => setTimeout(r, wait));
  }
}

const BLOB_RE = /^\/v1\/blobs\/(sha256:[0-9a-f]{64})$/;
const MANIFEST_RE = /^\/v1\/bundles\/([^/]+)\/([^/]+)$/;

/** Starts a test origin on 127.0.0.1, port 0. */
export async function startTestOrigin(opts: TestOriginOptions = {}): Promise<TestOrigin> {
  const blobs = new Map<string, Source>();
  const manifests = new Map<string, Manifest>();
  const faults: Fault[] = [];
  const limiter = new Limiter(opts.rateBytesPerSec ?? null);
  const chunkSize = opts.chunkSize ?? 64 * 1024;
  const requests: BlobRequest[] = [];
  let bytesSent = 0;
  let manifestRequests = 0;
  let forcedStatus: number | null = null;

  const json = (res: ServerResponse, status: number, body: unknown) => {
    const s = JSON.stringify(body);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(s) }).end(s);
  };

  const takeFault = (digest: string): Fault | undefined => {
    const i = faults.findIndex((f) => !f.digest || f.digest === digest);
    return i < 0 ? undefined : faults.splice(i, 1)[0];
  };

  async function sendBody(req: IncomingMessage, res: ServerResponse, src: Source, start: number, end: number, fault?: Fault): Promise<void> {
    const fh = src.path ? await open(src.path, 'r') : null;
    let sentHere = 0;
    try {
      let pos = start;
      while (pos <= end) {
        if (res.destroyed) return;
        let n = Math.min(chunkSize, end + 1 - pos);
        if (fault && (fault.kind === 'cut' || fault.kind === 'stall')) {
          const left = fault.afterBytes - sentHere;
          if (left <= 0) {
            if (fault.kind === 'cut') res.destroy();
            // stall: keep the socket open and silent until the client or close() ends it
            return;
          }
          n = Math.min(n, left);
        }
        let chunk: Buffer;
        if (src.data) chunk = Buffer.from(src.data.subarray(pos, pos + n));
        else {
          chunk = Buffer.allocUnsafe(n);
          const { bytesRead } = await fh!.read(chunk, 0, n, pos);
          chunk = chunk.subarray(0, bytesRead);
        }
        if (fault?.kind === 'flip' && fault.offset >= pos && fault.offset < pos + chunk.length) chunk[fault.offset - pos] ^= 0xff;
        await limiter.take(chunk.length);
        if (res.destroyed) return;
        const ok = res.write(chunk);
        bytesSent += chunk.length;
        sentHere += chunk.length;
        pos += chunk.length;
        if (!ok) {
          await new Promise<void>((r) => {
            const done = () => {
              res.off('drain', done);
              res.off('close', done);
              r();
            };
            res.on('drain', done);
            res.on('close', done);
          });
        }
      }
      res.end();
    } finally {
      await fh?.close();
      void req;
    }
  }

  let healthHangs = false;
  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = req.url ?? '/';
    if (url === '/healthz') {
      if (healthHangs) return; // the request stays open until the client gives up
      return json(res, 200, { ok: true, role: 'origin' });
    }
    if (url === '/metrics') {
      const gets = requests.filter((r) => r.method === 'GET').length;
      res.writeHead(200, { 'content-type': 'text/plain' }).end(`origin_blob_bytes_out_total ${bytesSent}\norigin_blob_requests_total ${gets}\n`);
      return;
    }
    if (url === '/v1/bundles') {
      return json(
        res,
        200,
        [...manifests.values()].map((m) => ({ name: m.name, version: m.version, role: m.role, manifestDigest: manifestDigest(m), publishedAt: m.publishedAt })),
      );
    }
    const mm = MANIFEST_RE.exec(url);
    if (mm) {
      manifestRequests++;
      const m = manifests.get(`${mm[1]}/${mm[2]}`);
      if (!m) return json(res, 404, { error: { code: 'SC_ERR_MANIFEST_NOT_FOUND', message: 'Manifest not found' } });
      const body = canonicalJson(m);
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), etag: `"${manifestDigest(m)}"` });
      res.end(body);
      return;
    }
    const bm = BLOB_RE.exec(url);
    if (!bm) return json(res, 400, { error: { code: 'SC_ERR_BAD_PATH', message: 'Malformed request path' } });
    const digest = bm[1];
    const rec: BlobRequest = { method: req.method ?? 'GET', digest, range: req.headers.range, start: 0, status: 0 };
    requests.push(rec);
    const fault = req.method === 'GET' ? takeFault(digest) : undefined;
    const forced = fault?.kind === 'status' ? fault.status : forcedStatus;
    const src = blobs.get(digest);
    if (forced !== null || !src) {
      rec.status = forced ?? 404;
      return json(res, rec.status, { error: { code: rec.status === 404 ? 'SC_ERR_BLOB_NOT_FOUND' : 'SC_ERR_INTERNAL', message: `HTTP ${rec.status}` } });
    }
    const headers: Record<string, string | number> = {
      'accept-ranges': 'bytes',
      etag: `"${digest}"`,
      'cache-control': 'public, max-age=31536000, immutable',
      'content-type': 'application/octet-stream',
    };
    if (req.headers['if-none-match'] === `"${digest}"`) {
      rec.status = 304;
      res.writeHead(304, headers).end();
      return;
    }
    let start = 0;
    let end = src.size - 1;
    let status = 200;
    if (req.headers.range) {
      const r = parseRange(src.size, req.headers.range, { combine: true });
      if (r === -1 || r === -2) {
        rec.status = 416;
        res.writeHead(416, { 'content-range': `bytes */${src.size}`, 'content-type': 'application/json' }).end('{"error":{"code":"SC_ERR_BAD_RANGE"}}');
        return;
      }
      if (r.type === 'bytes' && r.length === 1) {
        start = r[0].start;
        end = r[0].end;
        status = 206;
        headers['content-range'] = `bytes ${start}-${end}/${src.size}`;
      }
    }
    rec.start = start;
    rec.status = status;
    headers['content-length'] = end - start + 1;
    res.writeHead(status, headers);
    if (req.method === 'HEAD' || src.size === 0) {
      res.end();
      return;
    }
    await sendBody(req, res, src, start, end, fault);
  }

  const server = createServer((req, res) => {
    handle(req, res).catch(() => res.destroy());
  });
  await new Promise<void>((r) => server.listen(opts.port ?? 0, '127.0.0.1', r));
  const port = (server.address() as AddressInfo).port;

  return {
    url: `http://127.0.0.1:${port}`,
    port,
    server,
    addBlob(data) {
      const d: Digest = `sha256:${createHash('sha256').update(data).digest('hex')}`;
      blobs.set(d, { size: data.length, data });
      return d;
    },
    async addBlobFile(path) {
      const h = createHash('sha256');
      for await (const c of createReadStream(path, { highWaterMark: 1 << 20 })) h.update(c as Buffer);
      const d: Digest = `sha256:${h.digest('hex')}`;
      blobs.set(d, { size: (await stat(path)).size, path });
      return d;
    },
    removeBlob(d) {
      blobs.delete(d);
    },
    addManifest(m) {
      manifests.set(`${m.name}/${m.version}`, m);
    },
    setRate(r) {
      limiter.rate = r;
    },
    fault(f) {
      faults.push(f);
    },
    setStatus(s) {
      forcedStatus = s;
    },
    hangHealth(on) {
      healthHangs = on;
    },
    requests,
    blobGets: (d) => requests.filter((r) => r.method === 'GET' && (!d || r.digest === d)).length,
    get bytesSent() {
      return bytesSent;
    },
    get manifestRequests() {
      return manifestRequests;
    },
    resetCounters() {
      requests.length = 0;
      bytesSent = 0;
      manifestRequests = 0;
    },
    close: () =>
      new Promise<void>((r) => {
        server.close(() => r());
        server.closeAllConnections();
      }),
  };
}

/** The outcome of `httpGet`: `complete` is false when the body ended short of Content-Length or the socket broke. */
export interface GetResult {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
  complete: boolean;
}

/**
 * GET (or HEAD) with node:http, never throwing for HTTP statuses or a broken body: a response
 * aborted mid-body resolves with `complete: false` and the bytes received.
 */
export function httpGet(url: string, headers: Record<string, string> = {}, method = 'GET'): Promise<GetResult> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method, headers, agent: false }, (res) => {
      const parts: Buffer[] = [];
      let settled = false;
      const finish = (ok: boolean) => {
        if (settled) return;
        settled = true;
        const body = Buffer.concat(parts);
        const cl = res.headers['content-length'];
        const complete = ok && (method === 'HEAD' || cl === undefined || Number(cl) === body.length);
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body, complete });
      };
      res.on('data', (c: Buffer) => parts.push(c));
      res.on('end', () => finish(!res.aborted));
      res.on('aborted', () => finish(false));
      res.on('error', () => finish(false));
      res.on('close', () => finish(res.complete));
    });
    req.on('error', reject);
    req.end();
  });
}

/** Sums every sample of metric `name` (any labels) in Prometheus text. */
export function metricValue(text: string, name: string): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith(`${name} `) || line.startsWith(`${name}{`)) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return sum;
}

/** Polls `cond` every 20 ms until it is truthy; throws after `ms`. */
export async function waitFor<T>(cond: () => T | Promise<T>, ms = 20_000, what = 'condition'): Promise<NonNullable<T>> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v as NonNullable<T>;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
