/**
 * The stage's HTTP surface: the read API shared with origin (blobs, manifests, listings,
 * /healthz, /metrics), plus POST /v1/prefetch and GET /v1/fills. Errors become responses only
 * in shared/http.ts `errorHandler`.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import express, { type NextFunction, type Request, type Response } from 'express';
import { createProxyServer } from 'http-proxy-3';
import { type Digest, parseDigest } from '../../shared/digest.js';
import { ERRORS, scError } from '../../shared/errors.js';
import { blobParam, errorHandler, notFoundHandler, requireToken, serveBlobFile, startBlobResponse } from '../../shared/http.js';
import type { Logger } from '../../shared/log.js';
import type { Registry } from '../../shared/metrics.js';
import { parseName, parseVersion } from '../../shared/names.js';
import type { BlobCache } from './cache.js';
import { type FetchOnce, streamFill } from './fill.js';
import type { ManifestCache } from './manifests.js';
import type { StageMetrics } from './metrics.js';
import type { Upstreams } from './upstreams.js';

/** Everything the HTTP layer needs. */
export interface StageAppDeps {
  colo: string;
  cache: BlobCache;
  fills: FetchOnce;
  manifests: ManifestCache;
  upstreams: Upstreams;
  metrics: StageMetrics;
  registry: Registry;
  log: Logger;
  /** Bearer token for POST /v1/prefetch; without one, prefetch answers 403. */
  token?: string;
  /** The colo relay (services/relay/server.ts), mounted at /v1/relay when on. */
  relay?: { router: express.Router; stats(): unknown };
}

/** Most digests one prefetch call may name. */
export const PREFETCH_MAX = 1000;

/** Builds the express app of a stage. */
export function createStageApp(d: StageAppDeps): express.Express {
  const { cache, fills, metrics, log } = d;
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);

  app.use((req, res, next) => {
    res.on('finish', () => {
      const route = (req.route?.path as string | undefined) ?? 'other';
      metrics.http.requests.inc({ method: req.method, route, status: String(res.statusCode) });
    });
    next();
  });

  app.get('/healthz', (_req, res) => {
    res.set('Cache-Control', 'no-store').json({
      ok: true,
      role: 'stage',
      colo: d.colo,
      upstreams: d.upstreams.order(),
      fillsInFlight: fills.size,
      cacheBytes: cache.bytes,
      cacheMaxBytes: cache.maxBytes,
      cacheEntries: cache.entries,
      ...(d.relay ? { relay: d.relay.stats() } : {}),
    });
  });

  app.get('/metrics', async (_req, res) => {
    res.set('Content-Type', d.registry.contentType).set('Cache-Control', 'no-store').send(await d.registry.metrics());
  });

  // ---- blobs ----
  app.get('/v1/blobs/:ref', async (req, res) => {
    const digest = blobParam(req);
    const hit = cache.lookup(digest);
    if (hit) {
      metrics.hits.inc();
      cache.acquire(hit);
      try {
        const n = await serveBlobFile(req, res, hit.path, digest, hit.size);
        metrics.bytesServed.inc(n);
      } finally {
        cache.release(hit);
      }
      return;
    }
    if (fills.isGone(digest)) {
      metrics.negativeHits.inc();
      throw scError('SC_ERR_BLOB_NOT_FOUND', `no blob ${digest}`);
    }
    const { fill, joined } = fills.join(digest);
    (joined ? metrics.coalesced : metrics.misses).inc();
    try {
      await fill.ready();
      if (fill.state === 'gone') throw scError('SC_ERR_BLOB_NOT_FOUND', `no blob ${digest}`);
      if (fill.state === 'failed' && fill.error?.code === 'SC_ERR_PASSTHROUGH_TOO_LARGE') throw fill.error;
      if (fill.state === 'failed' || fill.size === null) {
        throw scError('SC_ERR_UPSTREAM', `fetching ${digest} failed`, { reason: fill.error?.code });
      }
      if (res.destroyed) return;
      const r = startBlobResponse(req, res, digest, fill.size);
      if (r === 'not-modified') return;
      if (req.method === 'HEAD') {
        res.end();
        return;
      }
      if (fill.size === 0) {
        // Nothing to hold back: answer only once the (empty) content is verified.
        await fill.done();
        if (!fill.verified) res.destroy();
        else res.end();
        return;
      }
      await streamFill(fill, res, r.start, r.end, (n) => metrics.bytesServed.inc(n));
    } finally {
      fill.release();
    }
  });
  app.all('/v1/blobs/:ref', (_req, _res, next) => next(scError('SC_ERR_METHOD_NOT_ALLOWED', 'the stage is read-only')));
  app.all(['/v1/blobs', '/v1/blobs/', '/v1/blobs/*rest'], (_req, _res, next) => next(scError('SC_ERR_BAD_PATH')));

  // ---- manifests and listings ----
  app.get('/v1/bundles/:name/:version', async (req, res) => {
    const m = await d.manifests.get(parseName(req.params.name), parseVersion(req.params.version));
    res.set('Cache-Control', 'no-cache').set('ETag', `"${m.digest}"`);
    const inm = req.headers['if-none-match'];
    if (inm?.split(',').some((t) => t.trim().replace(/^W\//, '') === `"${m.digest}"`)) {
      res.status(304).end();
      return;
    }
    res.type('application/json').send(m.json);
  });

  const proxy = createProxyServer({ xfwd: false, proxyTimeout: 30_000, timeout: 30_000 });
  proxy.on('error', () => {
    /* handled per request below */
  });
  app.get('/v1/bundles', (req, res, next) => {
    const targets = d.upstreams.order();
    for (const h of ['authorization', 'cookie', 'proxy-authorization']) delete req.headers[h];
    const tryAt = (i: number) => {
      const target = targets[i];
      let counted = false;
      const count = (outcome: string) => {
        if (!counted) metrics.upstreamRequests.inc({ upstream: target, kind: 'listing', outcome });
        counted = true;
      };
      res.once('finish', () => count(String(res.statusCode)));
      proxy.web(req as IncomingMessage, res as ServerResponse, { target }, (err: Error) => {
        count('error');
        log.warn({ upstream: target, err: err.message }, 'listing proxy failed');
        if (res.headersSent) {
          res.destroy();
          return;
        }
        if (i + 1 < targets.length) tryAt(i + 1);
        else next(scError('SC_ERR_NO_UPSTREAM', 'no upstream answered /v1/bundles'));
      });
    };
    tryAt(0);
  });
  app.all(['/v1/bundles', '/v1/bundles/:name/:version'], (_req, _res, next) => next(scError('SC_ERR_METHOD_NOT_ALLOWED', 'the stage is read-only')));
  app.all('/v1/bundles/*rest', (_req, _res, next) => next(scError('SC_ERR_BAD_PATH')));

  // ---- preheat ----
  const auth = d.token ? requireToken(d.token) : (_req: Request, _res: Response, next: NextFunction) => next(scError('SC_ERR_FORBIDDEN', 'prefetch is disabled: the stage has no token'));
  app.post('/v1/prefetch', auth, express.json({ limit: '256kb' }), (req, res) => {
    const body = req.body as { digests?: unknown } | undefined;
    if (!body || !Array.isArray(body.digests)) throw scError('SC_ERR_BAD_REQUEST', 'expected {"digests": ["sha256:…", …]}');
    if (body.digests.length > PREFETCH_MAX) throw scError('SC_ERR_BAD_REQUEST', `at most ${PREFETCH_MAX} digests per call`);
    const digests = [...new Set(body.digests.map((x) => parseDigest(x)))];
    const accepted: { digest: Digest; state: string }[] = [];
    for (const dg of digests) {
      if (cache.lookup(dg)) accepted.push({ digest: dg, state: 'committed' });
      else accepted.push({ digest: dg, state: fills.ensure(dg).state });
    }
    res.status(202).set('Cache-Control', 'no-store').json({ accepted: accepted.map((a) => a.digest), fills: accepted });
  });
  app.get('/v1/fills', (_req, res) => {
    res.set('Cache-Control', 'no-store').json({ fills: fills.list() });
  });

  if (d.relay) app.use('/v1/relay', d.relay.router);

  app.use(notFoundHandler());
  app.use(errorHandler(log));
  return app;
}

/**
 * Answers HTTP parse errors (a 1 MB header, a malformed request line) with a JSON error body
 * and a stable code instead of Node's bare reply, then closes the socket.
 */
export function onClientError(err: NodeJS.ErrnoException, socket: Socket): void {
  if (!socket.writable || (socket as Socket & { _httpMessage?: unknown })._httpMessage) {
    socket.destroy();
    return;
  }
  const code = err.code === 'HPE_HEADER_OVERFLOW' ? 'SC_ERR_HEADER_TOO_LARGE' : 'SC_ERR_BAD_REQUEST';
  const { status, message } = ERRORS[code];
  const body = JSON.stringify({ error: { code, message } });
  socket.end(
    `HTTP/1.1 ${status} ${code === 'SC_ERR_HEADER_TOO_LARGE' ? 'Request Header Fields Too Large' : 'Bad Request'}\r\n` +
      `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
}
