/**
 * The read API every tier serves (ARCHITECTURE.md, "HTTP read API"), written once: origin and
 * every stage mount `createReadApiRouter(source)` and differ only in their `ReadSource`.
 *
 * The router owns, for both: the path guard (paths are matched byte for byte; only
 * `[A-Za-z0-9._~+:/-]` is accepted, no percent-encoding, no empty, `.` or `..` segments, so
 * nothing is normalised into a path a store would read), digest/name/version validation, the
 * method guard (405 with `Allow`), Range (range-parser, via shared/http.ts `requestedRange`),
 * If-None-Match (express's `req.fresh`), and every header of the answers below.
 *
 * Error codes (all 400 unless said):
 * - a path the guard refuses: SC_ERR_BAD_DIGEST under `/v1/blobs/`, SC_ERR_BAD_PATH elsewhere;
 * - `/v1/blobs/<not a digest>` and `/v1/blobs/<…>/<…>`: SC_ERR_BAD_DIGEST;
 * - `/v1/bundles/<bad name>/…`: SC_ERR_BAD_NAME; `/v1/bundles/<name>/<bad version>`: SC_ERR_BAD_VERSION;
 * - `/v1/bundles/<…>` of another shape, and any unknown route (`unknownRoute`): SC_ERR_BAD_PATH;
 * - a known path with another method: 405 SC_ERR_METHOD_NOT_ALLOWED with `Allow`;
 * - an unsatisfiable or malformed Range: 416 SC_ERR_BAD_RANGE, with a `Content-Range` giving the
 *   blob size (unsatisfied-range form, RFC 9110 section 14.4);
 * - whatever the source throws (SC_ERR_BLOB_NOT_FOUND, SC_ERR_MANIFEST_NOT_FOUND, …), as is.
 *
 * Mounting: `app.use(createReadApiRouter(source, opts))` before the server's own routes, so the
 * guard sees them too (a sub-app with its own checks under its own prefix, like a stage's
 * relay, may come first); then the server's own routes; then `app.use(unknownRoute)`; then the
 * server's one error handler (shared/http.ts `errorHandler`). Apps must disable express's
 * automatic ETag (`app.set('etag', false)`): the only ETags are the ones set here.
 *
 * Differences between origin and stage that are inherent, and so left on purpose:
 * - `Allow` on `/v1/blobs/<digest>` and `/v1/bundles/<name>/<version>` lists `PUT` on origin
 *   (`writeMethods`), which takes uploads; a stage is read-only;
 * - the bodies of `/healthz` and `/metrics` (each tier reports itself);
 * - headers a source adds to a manifest (`ManifestDoc.headers`): origin's
 *   `Stagecoach-Content-Fingerprint`, which is origin-side metadata a stage does not hold;
 * - the errors only a stage can meet: SC_ERR_UPSTREAM (502), SC_ERR_NO_UPSTREAM (503),
 *   SC_ERR_PASSTHROUGH_TOO_LARGE (507), and a blob body cut mid-way when its fill fails.
 *
 * Behind a front nginx (a stage with `accelRedirect`, services/stage/accel.ts), a whole-blob GET
 * that came through it (ACCEL_HEADER) with no range or precondition header is answered with the
 * blob's status and headers, an empty body and `X-Accel-Redirect` (`OpenBlob.handOff`): nginx
 * sends the file. Every other answer is the router's own, as above.
 *
 * For the server's metrics and request log it sets `res.locals.route` (`healthz`, `metrics`,
 * `blob`, `bundles`, `manifest`) and, for blobs, `res.locals.bytesOut` (body bytes written).
 */
import { type FileHandle, open } from 'node:fs/promises';
import type { ServerResponse } from 'node:http';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import express, { type NextFunction, type Request, type RequestHandler, type Response } from 'express';
import { type Digest, parseDigest } from '../digest.js';
import { type ErrorCode, isScError, scError } from '../errors.js';
import { blobHeaders, notFoundHandler, requestedRange } from '../http.js';
import { parseName, parseVersion } from '../names.js';

/** A blob opened for one response. */
export interface OpenBlob {
  /** Size in bytes. */
  readonly size: number;
  /**
   * Writes bytes [start, end] (inclusive; `end === start - 1` for an empty blob) to `res`, then
   * ends it. Status and headers are already set. Streams: never holds the blob in memory and
   * honours backpressure. Rejects only while nothing is sent (`res.headersSent` false); a failure
   * after that destroys `res`, so a client never sees a complete answer with wrong bytes.
   * Resolves with the body bytes written, when done or when the client went away.
   */
  send(res: ServerResponse, start: number, end: number): Promise<number>;
  /**
   * Present when a front server may send this blob from a file (a stage's committed blob behind
   * nginx): marks the blob handed off and returns the `X-Accel-Redirect` path. The source keeps
   * the file for the front server a while after `release`.
   */
  handOff?(): string;
  /** Gives back what `openBlob` took (a cache entry, a fill). Called exactly once. */
  release(): void;
}

/** A manifest ready to serve. */
export interface ManifestDoc {
  /** The body: the manifest as canonical JSON. */
  json: string;
  /** sha256 of `json` (the manifest digest): the ETag. */
  digest: Digest;
  /** Headers only this source sends (origin: `Stagecoach-Content-Fingerprint`). */
  headers?: Readonly<Record<string, string>>;
}

/**
 * What a tier serves the read API from. Arguments are already validated. Every method throws
 * ScError; the router passes them to the server's error handler as they are.
 */
export interface ReadSource {
  /**
   * Opens blob `digest`, possibly waiting until its size is known (a stage's fill). Throws
   * SC_ERR_BLOB_NOT_FOUND (404) when the tier has no such blob.
   */
  openBlob(digest: Digest): Promise<OpenBlob>;
  /** The manifest name@version. Throws SC_ERR_MANIFEST_NOT_FOUND (404) when there is none. */
  getManifest(name: string, version: string): Promise<ManifestDoc>;
  /** The bundle listing: `{name, version, role, manifestDigest, publishedAt}` objects. */
  listBundles(): Promise<readonly unknown[]>;
  /**
   * The `/healthz` body, always answered 200; must include `ok: true` (the tier serves the read
   * API). A stage adds `status: "ok" | "degraded"` (services/stage/server.ts), which hosts use to
   * rank it. Must be cheap: built from state, never from an upstream request.
   */
  health(): Record<string, unknown>;
  /** The `/metrics` answer (Prometheus text). */
  metrics(): Promise<{ contentType: string; text: string }>;
}

/** Options of `createReadApiRouter`. */
export interface ReadApiOptions {
  /**
   * Methods the server answers itself on `/v1/blobs/<digest>` and `/v1/bundles/<name>/<version>`,
   * in routes mounted after the router (origin: `['PUT']`). They pass through the router and
   * are listed in `Allow`. Default: none (read-only).
   */
  writeMethods?: readonly string[];
}

/**
 * Request header a front nginx sets (`proxy_set_header`, services/stage/accel.ts) to say it
 * will send a blob file named by `X-Accel-Redirect`. Only such requests are handed off, so a
 * client that reaches the server directly always gets the body.
 */
export const ACCEL_HEADER = 'stagecoach-accel';

/**
 * Requests the router answers itself even behind a front nginx: the front server would answer
 * these headers by its own rules (multipart ranges, its own 412 and 304, Last-Modified), and
 * every answer must stay the router's.
 */
const OWN_ANSWER_HEADERS = ['range', 'if-range', 'if-match', 'if-unmodified-since', 'if-modified-since'] as const;

/** True when a whole-blob GET may be sent by the front server (see ACCEL_HEADER). */
function frontMaySend(req: Request): boolean {
  return req.method === 'GET' && req.headers[ACCEL_HEADER] === '1' && OWN_ANSWER_HEADERS.every((h) => req.headers[h] === undefined);
}

const SAFE_PATH = /^\/[A-Za-z0-9._~+:/-]*$/;
const READ_METHODS = ['GET', 'HEAD'];

/** Refuses any path that is not plain ASCII segments (see the module comment). */
function guardPath(req: Request, _res: Response, next: NextFunction): void {
  const raw = req.originalUrl;
  const q = raw.indexOf('?');
  const path = q < 0 ? raw : raw.slice(0, q);
  let why: string | undefined;
  if (path.length > 1024) why = 'path too long';
  else if (!SAFE_PATH.test(path)) why = 'path has characters outside [A-Za-z0-9._~+:/-] (percent-encoding is not accepted)';
  else if (path !== '/' && path.split('/').slice(1).some((s) => s === '' || s === '.' || s === '..')) why = 'path has an empty, . or .. segment';
  if (why === undefined) {
    next();
    return;
  }
  const code: ErrorCode = path.startsWith('/v1/blobs/') ? 'SC_ERR_BAD_DIGEST' : 'SC_ERR_BAD_PATH';
  next(scError(code, `${why}: ${JSON.stringify(path.slice(0, 200))}`));
}

/** Express handler: 405 SC_ERR_METHOD_NOT_ALLOWED with `Allow: <allow>`, for a known path. */
export function methodNotAllowed(allow: readonly string[]): RequestHandler {
  const header = allow.join(', ');
  return (req, res, next) => {
    res.set('Allow', header);
    next(scError('SC_ERR_METHOD_NOT_ALLOWED', `${req.method} is not allowed here; allowed: ${header}`));
  };
}

/** Express handler for requests no route took: 400 SC_ERR_BAD_PATH. Mount it after every route. */
export const unknownRoute: RequestHandler = notFoundHandler('SC_ERR_BAD_PATH');

/**
 * Streams `open()` into `res` and ends it, counting bytes. Before the first byte a failure is
 * thrown (the error handler answers it); after, `res` is destroyed. Resolves with the bytes written.
 */
export async function sendStream(res: ServerResponse, open: () => Readable | Promise<Readable>, onBytes?: (n: number) => void): Promise<number> {
  let sent = 0;
  try {
    const src = await open();
    src.on('data', (c: Buffer | string) => {
      sent += c.length;
      onBytes?.(c.length);
    });
    await pipeline(src, res);
  } catch (err) {
    if (!res.headersSent) throw err;
    res.destroy();
  }
  return sent;
}

/**
 * Memory for blob bodies: every reader (a response being sent from a file) reads into one
 * buffer of its own, reused chunk after chunk, and sends it only once the socket took the
 * previous one. The buffer is READ_MAX while few readers share the process and halves as more
 * do, so that all of them together hold about READ_BUDGET (never below READ_MIN each): peak
 * memory stays flat in object size, and in client count up to READ_BUDGET / READ_MIN readers.
 * Large chunks keep the CPU per byte low (fewer reads, writes and wake-ups per GiB).
 *
 * The buffers are pieces of one arena of READ_BUDGET bytes (ReadArena), not buffers of their
 * own: a reader's buffer is resized every time the number of readers crosses a power of two,
 * and a dropped buffer of its own stayed in memory until a major GC (up to 45 MiB of them at a
 * time with 100 readers, measured). Past READ_BUDGET / READ_MIN readers, or when the arena is
 * too cut up for a piece, a reader gets a READ_MIN buffer of its own.
 */
const READ_MAX = 1 << 20;
const READ_MIN = 64 << 10;
const READ_BUDGET = 16 << 20;
const PAGE = 4096;
/** Piece sizes: READ_MIN << order, for order 0 to TOP (READ_MAX). */
const TOP = Math.log2(READ_MAX / READ_MIN);
let activeReaders = 0;

/** Bytes of the read buffer of one reader while `readers` readers are active. */
export function readChunkBytes(readers: number): number {
  let n = READ_MAX;
  while (n > READ_MIN && n * readers > READ_BUDGET) n >>= 1;
  return n;
}

/**
 * READ_BUDGET bytes, allocated at the first read and kept for the life of the process, cut into
 * power-of-two pieces from READ_MIN to READ_MAX (a buddy allocator: a piece is split in halves
 * to make a smaller one, and joins its free other half again when given back).
 */
class ReadArena {
  #mem: Buffer | null = null;
  /** Offsets of the free pieces of each order. */
  readonly #free: Set<number>[] = Array.from({ length: TOP + 1 }, () => new Set<number>());

  /** A piece of `bytes` (a power of two, READ_MIN to READ_MAX), or null when none is free. */
  take(bytes: number): Buffer | null {
    if (!this.#mem) {
      // Pieces start half a page into the allocation. A large allocation begins 16 bytes past a
      // page boundary (glibc's mmap chunks), so pieces there sat 16 bytes (mod 4 KiB) from the
      // page-cache pages copied into them: the kernel's copy_to_user ran into 4K aliasing and
      // the warm CPU per GiB went from 0.7 to 1.1 s (perf: _copy_to_iter 15% -> 49%).
      this.#mem = Buffer.allocUnsafeSlow(READ_BUDGET + PAGE).subarray(PAGE / 2, PAGE / 2 + READ_BUDGET);
      for (let off = 0; off < READ_BUDGET; off += READ_MAX) this.#free[TOP].add(off);
    }
    const k = Math.log2(bytes / READ_MIN);
    let j = k;
    while (j <= TOP && this.#free[j].size === 0) j++;
    if (j > TOP) return null;
    const off = this.#free[j].values().next().value as number;
    this.#free[j].delete(off);
    // Split down to the size asked for: the low half is used, the high half is free.
    while (j > k) {
      j--;
      this.#free[j].add(off + (READ_MIN << j));
    }
    return this.#mem.subarray(off, off + bytes);
  }

  /** Gives back a piece `take` returned; it joins its free buddies. */
  give(piece: Buffer): void {
    const mem = this.#mem;
    if (!mem || piece.buffer !== mem.buffer) throw new Error('not a piece of the read arena');
    let off = piece.byteOffset - mem.byteOffset;
    let k = Math.log2(piece.length / READ_MIN);
    while (k < TOP && this.#free[k].delete(off ^ (READ_MIN << k))) {
      off &= ~(READ_MIN << k);
      k++;
    }
    this.#free[k].add(off);
  }

  /** Free bytes (READ_BUDGET before the first read). */
  get freeBytes(): number {
    if (!this.#mem) return READ_BUDGET;
    let n = 0;
    for (let k = 0; k <= TOP; k++) n += this.#free[k].size * (READ_MIN << k);
    return n;
  }
}

const arena = new ReadArena();

/**
 * One reader's share of the body-buffer budget (see READ_BUDGET). `buffer()` gives the buffer
 * for the next read (the same one, unless the number of readers moved enough to resize it);
 * call `close()` exactly once when the reader is done.
 */
export class ReadBuffer {
  #buf: Buffer | null = null;
  /** Whether #buf is a piece of the arena (else a buffer of its own). */
  #piece = false;
  #open = true;

  constructor() {
    activeReaders++;
  }

  /** The buffer to read the next chunk into; valid until the next call. */
  buffer(): Buffer {
    const want = readChunkBytes(activeReaders);
    if (this.#buf?.length === want) return this.#buf;
    this.#drop();
    for (let n = want; n >= READ_MIN && !this.#buf; n >>= 1) this.#buf = arena.take(n);
    this.#piece = this.#buf !== null;
    this.#buf ??= Buffer.allocUnsafeSlow(READ_MIN);
    return this.#buf;
  }

  /** Gives the share back. Idempotent. */
  close(): void {
    if (!this.#open) return;
    this.#open = false;
    activeReaders--;
    this.#drop();
  }

  #drop(): void {
    if (this.#buf && this.#piece) arena.give(this.#buf);
    this.#buf = null;
    this.#piece = false;
  }
}

/** Readers counted by `ReadBuffer` right now (for tests and diagnostics). */
export function readBufferReaders(): number {
  return activeReaders;
}

/** Free bytes of the read arena: READ_BUDGET whenever no reader holds a piece (tests, diagnostics). */
export function readArenaFreeBytes(): number {
  return arena.freeBytes;
}

/**
 * Writes into `res` chunk by chunk, each resolving once the socket took it (so its buffer may be
 * reused) or `res` closed. One `close` listener for the whole body, not one per chunk.
 */
export class ChunkWriter {
  #res: ServerResponse;
  #waiting: (() => void) | null = null;
  #closed = false;
  #onClose = () => {
    this.#closed = true;
    this.#wake();
  };

  constructor(res: ServerResponse) {
    this.#res = res;
    res.once('close', this.#onClose);
  }

  /** True once the response closed (client gone, or destroyed). */
  get closed(): boolean {
    return this.#closed || this.#res.destroyed;
  }

  /** Writes `chunk`; resolves when it was handed to the socket, or when `res` closed. */
  write(chunk: Buffer): Promise<void> {
    return new Promise<void>((resolve) => {
      if (this.closed) {
        resolve();
        return;
      }
      this.#waiting = resolve;
      this.#res.write(chunk, () => this.#wake());
    });
  }

  /** Drops the close listener. */
  dispose(): void {
    this.#res.off('close', this.#onClose);
    this.#wake();
  }

  #wake(): void {
    const w = this.#waiting;
    this.#waiting = null;
    w?.();
  }
}

/**
 * `OpenBlob.send` for a complete blob file: bytes [start, end] of `path`, read at offsets into
 * one reused buffer (ReadBuffer) and written to `res`, the next read starting only once the
 * socket took the last chunk. A failure before the first byte (the file cannot be opened) is
 * thrown; after, `res` is destroyed. Resolves with the bytes written.
 */
export async function sendFileRange(res: ServerResponse, path: string, start: number, end: number, onBytes?: (n: number) => void): Promise<number> {
  if (end < start) {
    res.end();
    return 0;
  }
  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    if (!res.headersSent) throw err;
    res.destroy();
    return 0;
  }
  const rb = new ReadBuffer();
  const out = new ChunkWriter(res);
  let pos = start;
  try {
    while (pos <= end && !out.closed) {
      const buf = rb.buffer();
      const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, end + 1 - pos), pos);
      if (bytesRead <= 0) throw scError('SC_ERR_INTERNAL', `short read at ${pos} of a blob file`);
      if (out.closed) break;
      await out.write(bytesRead === buf.length ? buf : buf.subarray(0, bytesRead));
      pos += bytesRead;
      onBytes?.(bytesRead);
    }
    if (!out.closed) res.end();
  } catch (err) {
    if (!res.headersSent) throw err;
    res.destroy();
  } finally {
    out.dispose();
    rb.close();
    await fh.close().catch(() => {});
  }
  return pos - start;
}

/** Status, Content-Length and Content-Range for a blob of `size`; returns the bytes to send. */
function blobRange(req: Request, res: Response, size: number): { start: number; end: number } {
  let range: ReturnType<typeof requestedRange>;
  try {
    range = requestedRange(req, size);
  } catch (err) {
    if (isScError(err, 'SC_ERR_BAD_RANGE')) res.set('Content-Range', `bytes */${size}`);
    throw err;
  }
  if (range) {
    res.status(206);
    res.set('Content-Range', `bytes ${range.start}-${range.end}/${size}`);
    res.set('Content-Length', String(range.end - range.start + 1));
    return range;
  }
  res.status(200);
  res.set('Content-Length', String(size));
  return { start: 0, end: size - 1 };
}

/**
 * Starts a blob reply by the read API's rules: blob headers, 304 when the request is fresh
 * (If-None-Match), else 200 or 206 with Content-Length and Content-Range (416 SC_ERR_BAD_RANGE
 * thrown with the unsatisfied-range Content-Range set). Returns the bytes to send, or
 * `not-modified` (the reply is ended). For the router below, and for test upstreams that send
 * the bytes their own faulty way.
 */
export function startBlobReply(req: Request, res: Response, digest: Digest, size: number): { start: number; end: number } | 'not-modified' {
  res.set(blobHeaders(digest));
  if (req.fresh) {
    res.status(304).end();
    return 'not-modified';
  }
  return blobRange(req, res, size);
}

/** Builds the read API router over `source` (see the module comment for what it answers). */
export function createReadApiRouter(source: ReadSource, opts: ReadApiOptions = {}): express.Router {
  const writes = new Set(opts.writeMethods ?? []);
  const r = express.Router({ caseSensitive: true, strict: true });
  const readOnly = methodNotAllowed(READ_METHODS);
  const readWrite = methodNotAllowed([...READ_METHODS, ...writes]);
  /** 405 unless the server answers this method itself after the router. */
  const guardMethods: RequestHandler = (req, res, next) => {
    if (writes.has(req.method)) next('router');
    else readWrite(req, res, next);
  };

  r.use(guardPath);

  r.get('/healthz', (_req, res) => {
    res.locals.route = 'healthz';
    res.set('Cache-Control', 'no-store').json(source.health());
  });
  r.all('/healthz', readOnly);

  r.get('/metrics', async (_req, res) => {
    res.locals.route = 'metrics';
    const m = await source.metrics();
    res.set('Content-Type', m.contentType).set('Cache-Control', 'no-store').send(m.text);
  });
  r.all('/metrics', readOnly);

  r.get('/v1/blobs/:ref', async (req, res) => {
    res.locals.route = 'blob';
    res.locals.bytesOut = 0;
    const digest = parseDigest(req.params.ref);
    const blob = await source.openBlob(digest);
    try {
      if (res.destroyed) return; // the client left while the source waited
      const r = startBlobReply(req, res, digest, blob.size);
      if (r === 'not-modified') return;
      const { start, end } = r;
      if (req.method === 'HEAD') {
        res.end();
        return;
      }
      if (blob.handOff && frontMaySend(req)) {
        // The front server sends the file with these headers (its location adds the ETag).
        res.set('X-Accel-Redirect', blob.handOff());
        res.set('Content-Length', '0');
        res.end();
        return;
      }
      res.locals.bytesOut = await blob.send(res, start, end);
    } finally {
      blob.release();
    }
  });
  r.all('/v1/blobs/:ref', (req, res, next) => {
    res.locals.route = 'blob';
    guardMethods(req, res, next);
  });
  r.all('/v1/blobs/*rest', (_req, _res, next) => next(scError('SC_ERR_BAD_DIGEST', 'expected /v1/blobs/sha256:<64 lowercase hex>')));

  r.get('/v1/bundles', async (_req, res) => {
    res.locals.route = 'bundles';
    const list = await source.listBundles();
    res.set('Cache-Control', 'no-cache').json(list);
  });
  r.all('/v1/bundles', readOnly);

  r.get('/v1/bundles/:name/:version', async (req, res) => {
    res.locals.route = 'manifest';
    const m = await source.getManifest(parseName(req.params.name), parseVersion(req.params.version));
    res.set({ ...m.headers, 'Cache-Control': 'no-cache', ETag: `"${m.digest}"`, 'Content-Type': 'application/json; charset=utf-8' });
    if (req.fresh) {
      res.status(304).end();
      return;
    }
    res.send(m.json);
  });
  r.all('/v1/bundles/:name/:version', (req, res, next) => {
    res.locals.route = 'manifest';
    guardMethods(req, res, next);
  });
  r.all('/v1/bundles/*rest', (_req, _res, next) => next(scError('SC_ERR_BAD_PATH', 'expected /v1/bundles/<name>/<version>')));

  return r;
}
