/**
 * The one fault-injecting upstream for tests and benchmarks: a real HTTP server on 127.0.0.1
 * (port 0 unless told) that speaks the read API and misbehaves on request. Stage tests use it as
 * origin (test-origin.ts), host fetch tests as a stage or an origin (fetch-fixture.ts).
 *
 * Serving: blobs from memory or from files (under any digest: tampering), with the real read
 * API's headers, Range, 304 and 416 (shared/http/read-api.ts `startBlobReply`); manifests, the
 * bundle listing, /metrics and a fault-free /healthz through the real `createReadApiRouter`.
 * Only the blob body is sent here, chunk by chunk, so that faults can act on it.
 *
 * Faults (`Fault`) are one vocabulary, used two ways: `fault(f)` queues a one-shot fault for the
 * next matching request; `setFaults(list)` sets standing faults that act on every matching
 * request until replaced. A request sees its one-shot fault (if any) first, then the standing ones;
 * the first of each sort wins (one answer status, one body limit, one trickle; every flip applies).
 *
 * It also records every blob request (method, digest, Range, first byte served, status), counts
 * the body bytes sent and manifest requests, and can throttle all blob bodies to a shared rate.
 */
import { createHash } from 'node:crypto';
import { open, stat } from 'node:fs/promises';
import { createServer, type ServerResponse } from 'node:http';
import express, { type Request, type Response } from 'express';
import { drained } from '../../shared/bundle/tar-io.js';
import { type Digest, digestFile, parseDigest, sha256Of } from '../../shared/digest.js';
import { scError } from '../../shared/errors.js';
import { errorHandler, type Listening, listen } from '../../shared/http.js';
import { createReadApiRouter, type ManifestDoc, type ReadSource, startBlobReply, unknownRoute } from '../../shared/http/read-api.js';
import { silentLogger } from '../../shared/log.js';
import { canonicalJson, type Manifest } from '../../shared/manifest.js';

/**
 * One fault. Blob faults act on blob responses (only those of `digest`, when given); a one-shot
 * blob fault is taken by the next GET (HEAD never takes one), a standing one acts on GET and
 * HEAD. Health faults act on /healthz. Byte counts are body bytes of the one response.
 */
export type Fault =
  /** Answer `status` with a JSON error body instead of the blob (whether the blob exists or not). */
  | { kind: 'status'; status: number; digest?: Digest }
  /** Send `afterBytes` body bytes, then drop the connection. */
  | { kind: 'cut'; afterBytes: number; digest?: Digest }
  /** Send `afterBytes` body bytes, then go silent with the connection open (until the client or `close()` ends it). */
  | { kind: 'stall'; afterBytes: number; digest?: Digest }
  /**
   * Send `afterBytes` body bytes, then freeze the whole server like a link gone silent without a
   * FIN: this response stalls, and every later request (/healthz included) is accepted and never
   * answered, until `setFaults` or `close()`. Blob requests are still recorded.
   */
  | { kind: 'freeze'; afterBytes: number; digest?: Digest }
  /** Send the byte at blob offset `offset` inverted (wrong bytes, right length). */
  | { kind: 'flip'; offset: number; digest?: Digest }
  /** Send the body in pieces of `bytes`, one every `everyMs` (a busy source: slow, but alive). */
  | { kind: 'trickle'; bytes: number; everyMs: number; digest?: Digest }
  /** Answer the full 200, ignoring Range. */
  | { kind: 'ignore-range'; digest?: Digest }
  /** Answer /healthz after `ms` (`Infinity`: never; the client's deadline or `close()` ends it). */
  | { kind: 'health-delay'; ms: number }
  /** Answer /healthz with `status` and `{"ok": status === 200}`. */
  | { kind: 'health-status'; status: number };

/** One recorded blob request. `start` is the first body byte served (0 without Range, or for a full 200). */
export interface BlobRequest {
  method: string;
  digest: string;
  range?: string;
  start: number;
  /** The status answered; 0 while none is (a frozen server). */
  status: number;
}

/** Options of `startFaultUpstream`. */
export interface FaultUpstreamOptions {
  /** Shared body rate limit for all connections, bytes per second (null: unlimited). */
  rateBytesPerSec?: number | null;
  /** Body write size, bytes (a `trickle` fault's `bytes` overrides it). */
  chunkSize?: number;
  /** Port to listen on (default 0: a free one). */
  port?: number;
  /** Standing faults from the start (see `setFaults`). */
  faults?: readonly Fault[];
}

/** A running fault-injecting upstream. */
export interface FaultUpstream extends Listening {
  /** Adds an in-memory blob; returns its digest. */
  addBlob(data: Buffer): Digest;
  /** Serves the file at `path` as blob `digest` (its real digest unless given: tampering); returns the digest. */
  addBlobFile(path: string, digest?: Digest): Promise<Digest>;
  /** Makes a blob unknown (404) again. */
  removeBlob(d: Digest): void;
  /** Serves `doc` (any JSON, unchecked) as canonical JSON at /v1/bundles/<name>/<version>, and lists it. */
  setManifest(name: string, version: string, doc: unknown): void;
  /** `setManifest(m.name, m.version, m)`. */
  addManifest(m: Manifest): void;
  /** Changes the shared rate limit (bytes/s, null for none). */
  setRate(bytesPerSec: number | null): void;
  /** Queues a one-shot fault for the next matching request. */
  fault(f: Fault): void;
  /** Replaces every standing fault, and ends a freeze. */
  setFaults(faults: readonly Fault[]): void;
  /** The standing faults. */
  readonly faults: readonly Fault[];
  /** Every blob request answers `status` until set back to null (replaces the standing `status` faults). */
  setStatus(status: number | null): void;
  /** While true, /healthz never answers; blobs still flow (replaces the standing `health-delay` faults). */
  hangHealth(on: boolean): void;
  /** True once a `freeze` fault took effect (until `setFaults`). */
  readonly frozen: boolean;
  /** Every blob request seen, in order. */
  readonly requests: BlobRequest[];
  /** GET blob requests seen (HEAD excluded), of `digest` if given. */
  blobGets(digest?: Digest): number;
  /** Body bytes written for blobs. */
  readonly bytesSent: number;
  /** Manifest requests seen. */
  readonly manifestRequests: number;
  /** Resets the request log and counters. */
  resetCounters(): void;
  /** Stops the server and drops every connection (stalled and frozen ones too). */
  close(): Promise<void>;
}

interface Source {
  size: number;
  data?: Buffer;
  path?: string;
}

type BlobFault = Exclude<Fault, { kind: 'health-delay' | 'health-status' }>;
type HealthFault = Extract<Fault, { kind: 'health-delay' | 'health-status' }>;

const isHealthFault = (f: Fault): f is HealthFault => f.kind === 'health-delay' || f.kind === 'health-status';
const forBlob = (f: Fault, digest: string): f is BlobFault => !isHealthFault(f) && (!f.digest || f.digest === digest);

/** A byte-rate limiter shared by every response (null rate: no limit). */
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

/** Waits `ms` (`Infinity`: forever), or until `res` closes; true when the wait ran out with `res` still open. */
function pause(ms: number, res: ServerResponse): Promise<boolean> {
  return new Promise((resolve) => {
    const t = Number.isFinite(ms)
      ? setTimeout(() => {
          res.off('close', onClose);
          resolve(!res.destroyed);
        }, ms)
      : undefined;
    const onClose = () => {
      clearTimeout(t);
      resolve(false);
    };
    res.once('close', onClose);
  });
}

/** Starts a fault-injecting upstream on 127.0.0.1. */
export async function startFaultUpstream(opts: FaultUpstreamOptions = {}): Promise<FaultUpstream> {
  const blobs = new Map<string, Source>();
  const manifests = new Map<string, { doc: ManifestDoc; listing: Record<string, unknown> }>();
  const queued: Fault[] = [];
  let standing: readonly Fault[] = [...(opts.faults ?? [])];
  let frozen = false;
  const limiter = new Limiter(opts.rateBytesPerSec ?? null);
  const chunkSize = opts.chunkSize ?? 64 * 1024;
  const requests: BlobRequest[] = [];
  let bytesSent = 0;
  let manifestRequests = 0;

  /** The one-shot fault for this request (taken off the queue), then the standing ones that apply. */
  function faultsFor<F extends Fault>(match: (f: Fault) => f is F, takeOne: boolean): F[] {
    const i = takeOne ? queued.findIndex(match) : -1;
    const once = i < 0 ? [] : (queued.splice(i, 1) as F[]);
    return [...once, ...standing.filter(match)];
  }

  /** Sends bytes [start, end] of `src` under `faults`, then ends `res` (unless a fault stops it first). */
  async function sendBody(res: ServerResponse, src: Source, start: number, end: number, faults: readonly BlobFault[]): Promise<void> {
    const limit = faults.find((f) => f.kind === 'cut' || f.kind === 'stall' || f.kind === 'freeze');
    const trickle = faults.find((f) => f.kind === 'trickle');
    const flips = faults.flatMap((f) => (f.kind === 'flip' ? [f.offset] : []));
    const fh = src.path ? await open(src.path, 'r') : null;
    let sentHere = 0;
    let flushed = Promise.resolve(); // the last write handed to the socket
    const gone = new Promise<void>((r) => res.once('close', r));
    try {
      for (let pos = start; pos <= end; ) {
        if (res.destroyed) return;
        let n = Math.min(trickle?.bytes ?? chunkSize, end + 1 - pos);
        if (limit) {
          const left = limit.afterBytes - sentHere;
          if (left <= 0) {
            if (limit.kind === 'cut') {
              await Promise.race([flushed, gone]); // exactly `afterBytes` reach the client
              res.destroy();
            } else if (limit.kind === 'freeze') frozen = true;
            // stall and freeze: the response stays open and silent until the client or close() ends it
            return;
          }
          n = Math.min(n, left);
        }
        if (trickle && sentHere > 0 && !(await pause(trickle.everyMs, res))) return;
        let chunk: Buffer;
        if (src.data) chunk = Buffer.from(src.data.subarray(pos, pos + n));
        else {
          const { bytesRead, buffer } = await fh!.read(Buffer.allocUnsafe(n), 0, n, pos);
          chunk = buffer.subarray(0, bytesRead);
        }
        for (const at of flips) if (at >= pos && at < pos + chunk.length) chunk[at - pos] ^= 0xff;
        await limiter.take(chunk.length);
        if (res.destroyed) return;
        let ok = true;
        flushed = new Promise<void>((r) => {
          ok = res.write(chunk, () => r());
        });
        bytesSent += chunk.length;
        sentHere += chunk.length;
        pos += chunk.length;
        if (!ok) await drained(res);
      }
      res.end();
    } finally {
      await fh?.close();
    }
  }

  async function blobRoute(req: Request, res: Response): Promise<void> {
    const rec: BlobRequest = { method: req.method, digest: String(req.params.ref), range: req.headers.range, start: 0, status: 0 };
    requests.push(rec);
    if (frozen) return; // never answered; the client's deadline or close() ends it
    const digest = parseDigest(req.params.ref);
    const faults = faultsFor((f): f is BlobFault => forBlob(f, digest), req.method === 'GET');
    const answer = faults.find((f) => f.kind === 'status');
    if (answer) {
      // A fault, not the read API: any status, so not through the error registry.
      rec.status = answer.status;
      const code = answer.status === 404 ? 'SC_ERR_BLOB_NOT_FOUND' : 'SC_ERR_INTERNAL';
      res.status(answer.status).json({ error: { code, message: `HTTP ${answer.status}` } });
      return;
    }
    const src = blobs.get(digest);
    if (!src) {
      rec.status = 404;
      throw scError('SC_ERR_BLOB_NOT_FOUND');
    }
    if (faults.some((f) => f.kind === 'ignore-range')) delete req.headers.range;
    let r: ReturnType<typeof startBlobReply>;
    try {
      r = startBlobReply(req, res, digest, src.size);
    } catch (err) {
      rec.status = (err as { status?: number }).status ?? 500;
      throw err;
    }
    if (r === 'not-modified') {
      rec.status = 304;
      return;
    }
    rec.start = r.start;
    rec.status = res.statusCode;
    if (req.method === 'HEAD') res.end();
    else await sendBody(res, src, r.start, r.end, faults);
  }

  async function healthRoute(req: Request, res: Response, next: () => void): Promise<void> {
    const faults = faultsFor(isHealthFault, true);
    const delay = faults.find((f) => f.kind === 'health-delay');
    if (delay && !(await pause(delay.ms, res))) return;
    if (res.destroyed || req.destroyed) return;
    const answer = faults.find((f) => f.kind === 'health-status');
    if (answer) res.status(answer.status).set('Cache-Control', 'no-store').json({ ok: answer.status === 200 });
    else next(); // the read API's own answer
  }

  const source: ReadSource = {
    openBlob: () => Promise.reject(scError('SC_ERR_INTERNAL', 'blob GET and HEAD are answered by the fault route, mounted before the read API')),
    async getManifest(name, version) {
      manifestRequests++;
      const m = manifests.get(`${name}/${version}`);
      if (!m) throw scError('SC_ERR_MANIFEST_NOT_FOUND');
      return m.doc;
    },
    listBundles: async () => [...manifests.values()].map((m) => m.listing),
    health: () => ({ ok: true, role: 'origin' }),
    metrics: async () => {
      const gets = requests.filter((r) => r.method === 'GET').length;
      return { contentType: 'text/plain', text: `origin_blob_bytes_out_total ${bytesSent}\norigin_blob_requests_total ${gets}\n` };
    },
  };

  const app = express();
  app.set('etag', false);
  app.set('x-powered-by', false);
  app.get('/v1/blobs/:ref', blobRoute);
  app.use((_req, _res, next) => {
    if (!frozen) next(); // frozen: accepted, never answered
  });
  app.get('/healthz', healthRoute);
  app.use(createReadApiRouter(source));
  app.use(unknownRoute);
  app.use(errorHandler(silentLogger));

  const l = await listen(createServer(app), '127.0.0.1', opts.port ?? 0);
  const setManifest = (name: string, version: string, doc: unknown) => {
    const json = canonicalJson(doc);
    const d = sha256Of(json);
    const m = (typeof doc === 'object' && doc !== null ? doc : {}) as Partial<Manifest>;
    manifests.set(`${name}/${version}`, { doc: { json, digest: d }, listing: { name, version, role: m.role, manifestDigest: d, publishedAt: m.publishedAt } });
  };
  return {
    ...l,
    addBlob(data) {
      const d: Digest = `sha256:${createHash('sha256').update(data).digest('hex')}`;
      blobs.set(d, { size: data.length, data });
      return d;
    },
    async addBlobFile(path, digest) {
      const d = digest ?? (await digestFile(path)).digest;
      blobs.set(d, { size: (await stat(path)).size, path });
      return d;
    },
    removeBlob(d) {
      blobs.delete(d);
    },
    setManifest,
    addManifest(m) {
      setManifest(m.name, m.version, m);
    },
    setRate(r) {
      limiter.rate = r;
    },
    fault(f) {
      queued.push(f);
    },
    setFaults(f) {
      standing = [...f];
      frozen = false;
    },
    get faults() {
      return standing;
    },
    setStatus(s) {
      standing = [...standing.filter((f) => f.kind !== 'status'), ...(s === null ? [] : [{ kind: 'status', status: s } as const])];
    },
    hangHealth(on) {
      standing = [...standing.filter((f) => f.kind !== 'health-delay'), ...(on ? [{ kind: 'health-delay', ms: Number.POSITIVE_INFINITY } as const] : [])];
    },
    get frozen() {
      return frozen;
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
  };
}
