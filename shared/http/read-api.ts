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
import type { ServerResponse } from 'node:http';
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
