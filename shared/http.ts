/**
 * HTTP plumbing shared by every server: the single place where errors become responses, bearer
 * token checks (constant time), blob headers and Range parsing for the read API
 * (shared/http/read-api.ts, which answers blob requests), and listening on HOST:PORT (port 0 in
 * tests).
 */
import { timingSafeEqual, createHash } from 'node:crypto';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import { Server as HttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import type { Request, RequestHandler } from 'express';
import parseRange from 'range-parser';
import { type Digest, parseDigest } from './digest.js';
import { type ErrorCode, ScError, scError, toScError } from './errors.js';
import type { Logger } from './log.js';

/** Headers every blob response carries. */
export function blobHeaders(digest: Digest): Record<string, string> {
  return {
    'Accept-Ranges': 'bytes',
    ETag: `"${digest}"`,
    'Cache-Control': 'public, max-age=31536000, immutable',
    'Content-Type': 'application/octet-stream',
  };
}

/** Parses the `:ref` of `/v1/blobs/:ref`; anything but `sha256:<64 hex>` is SC_ERR_BAD_DIGEST. */
export function blobParam(req: Request): Digest {
  return parseDigest(req.params.ref);
}

export type ByteRange = { start: number; end: number } | null;

/**
 * Interprets the Range header against a size. Returns null for "send it all" (no Range, a
 * non-bytes unit, or several ranges: multi-range is answered with the full 200, as documented),
 * the single range otherwise, and throws SC_ERR_BAD_RANGE (416) when unsatisfiable or malformed.
 */
export function requestedRange(req: Request, size: number): ByteRange {
  const h = req.headers.range;
  if (!h) return null;
  if (h.length > 200) throw scError('SC_ERR_BAD_RANGE', 'Range header too long', { size });
  const r = parseRange(size, h, { combine: true });
  if (r === -1) throw scError('SC_ERR_BAD_RANGE', undefined, { size });
  if (r === -2) throw scError('SC_ERR_BAD_RANGE', 'malformed Range header', { size });
  if (r.type !== 'bytes' || r.length !== 1) return null;
  return { start: r[0].start, end: r[0].end };
}

/** Constant-time token comparison (hashing first so lengths never leak). */
export function tokenMatches(given: string, expected: string): boolean {
  const a = createHash('sha256').update(given).digest();
  const b = createHash('sha256').update(expected).digest();
  return timingSafeEqual(a, b) && given.length === expected.length;
}

/** Express middleware: 401 without `Authorization: Bearer`, 403 with a wrong token. */
export function requireToken(expected: string): RequestHandler {
  return (req, _res, next) => {
    const h = req.headers.authorization;
    const m = h ? /^Bearer\s+(\S+)\s*$/i.exec(h) : null;
    if (!m) return next(scError('SC_ERR_UNAUTHORIZED'));
    if (!tokenMatches(m[1], expected)) return next(scError('SC_ERR_FORBIDDEN'));
    next();
  };
}

/**
 * The one place per server where an error becomes an HTTP response: express apps and the plain
 * `router` the stage's relay runs on (services/relay/server.ts) alike, so it writes with Node's
 * own response API.
 */
export function errorHandler(log: Logger) {
  return (err: unknown, req: IncomingMessage & { originalUrl?: string }, res: ServerResponse, _next: (err?: unknown) => void): void => {
    let e: ScError;
    const status = (err as { status?: number; statusCode?: number; type?: string })?.status;
    if (err instanceof ScError) e = err;
    else if ((err as { type?: string })?.type === 'entity.parse.failed') e = scError('SC_ERR_BAD_REQUEST', 'body is not valid JSON');
    else if ((err as { type?: string })?.type === 'entity.too.large') e = scError('SC_ERR_TOO_LARGE');
    else if (status === 400 || (err as { code?: string })?.code === 'ERR_INVALID_URL') e = scError('SC_ERR_BAD_PATH');
    else e = toScError(err);
    const url = req.originalUrl ?? req.url;
    if (e.status >= 500) log.error({ err, code: e.code, url }, 'request failed');
    else log.debug({ code: e.code, url }, 'request refused');
    if (res.headersSent) {
      res.destroy();
      return;
    }
    sendJson(res, e.status, e.toJSON(), { 'Cache-Control': 'no-store' });
  };
}

/** Answers `body` as JSON (what express's `res.json` sends, without an ETag). */
export function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { ...headers, 'Content-Type': 'application/json; charset=utf-8', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

/** Answers 204 with no body. */
export function noContent(res: ServerResponse): void {
  res.writeHead(204).end();
}

/** The first value of query parameter `name` of a plain Node request (express apps have `req.query`). */
export function queryParam(req: IncomingMessage, name: string): string | null {
  const q = req.url?.indexOf('?') ?? -1;
  return q < 0 ? null : new URLSearchParams(req.url!.slice(q + 1)).get(name);
}

/** Catches requests no route took, with a stable code. */
export function notFoundHandler(code: ErrorCode = 'SC_ERR_NOT_FOUND'): RequestHandler {
  return (req, _res, next) => next(scError(code, `no route for ${req.method} ${req.path.slice(0, 200)}`));
}

/** A listening server with its base URL. */
export interface Listening {
  server: Server;
  url: string;
  port: number;
  close(): Promise<void>;
}

/** Starts `handler` on host:port (port 0 picks a free one) and resolves once listening. */
export async function listen(server: Server, host: string, port: number): Promise<Listening> {
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const addr = server.address() as AddressInfo;
  const h = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
  return {
    server,
    port: addr.port,
    url: `${server instanceof HttpsServer ? 'https' : 'http'}://${h}:${addr.port}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
