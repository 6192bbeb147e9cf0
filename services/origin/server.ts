/**
 * The origin HTTP server: the shared read API (shared/http/read-api.ts) over the BlobStore, plus
 * token-protected writes (PUT of blobs and manifests), the trusted-key list and the lifecycle
 * routes (admin.ts: removal, garbage collection), metrics and request logs.
 */
import type { KeyObject } from 'node:crypto';
import type { Server } from 'node:http';
import { Transform } from 'node:stream';
import express from 'express';
import pkg from '../../package.json' with { type: 'json' };
import { type Digest, parseDigest, sha256Of } from '../../shared/digest.js';
import { isScError, scError } from '../../shared/errors.js';
import { blobParam, errorHandler, requireToken } from '../../shared/http.js';
import { onClientError } from '../../shared/http/client-error.js';
import { sendFileRange, sendStream } from '../../shared/http/body-send.js';
import { createReadApiRouter, type ReadSource, unknownRoute } from '../../shared/http/read-api.js';
import type { Logger } from '../../shared/log.js';
import { canonicalJson, parseManifest, verifyManifest } from '../../shared/manifest.js';
import { Counter, createRegistry, httpMetrics, type Registry } from '../../shared/metrics.js';
import { parseName, parseVersion } from '../../shared/names.js';
import { createLifecycleMetrics, type LifecycleMetrics, mountAdminRoutes } from './admin.js';
import { FINGERPRINT_HEADER } from './client.js';
import type { BlobStore } from './store.js';


/** The origin's metrics, on its own registry. */
export interface OriginMetrics {
  registry: Registry;
  /** `origin_http_requests_total{method,route,status}` */
  requests: Counter<'method' | 'route' | 'status'>;
  /** `origin_bytes_out_total{route}`: body bytes sent. */
  bytesOut: Counter<'route'>;
  /** `origin_bytes_in_total{route}`: body bytes received. */
  bytesIn: Counter<'route'>;
  /** `origin_blob_bytes_out_total`: blob body bytes served (GET, full or ranged). */
  blobBytesOut: Counter;
  /** `origin_blob_requests_total{method,status}`: requests on /v1/blobs/…. */
  blobRequests: Counter<'method' | 'status'>;
  /** Removals and garbage collection (admin.ts). */
  lifecycle: LifecycleMetrics;
}

/** Creates the origin metrics on a fresh registry (default process metrics included). */
export function createOriginMetrics(): OriginMetrics {
  const registry = createRegistry('origin');
  const http = httpMetrics(registry, 'origin');
  return {
    registry,
    ...http,
    blobBytesOut: new Counter({ name: 'origin_blob_bytes_out_total', help: 'Blob body bytes served', registers: [registry] }),
    blobRequests: new Counter({
      name: 'origin_blob_requests_total',
      help: 'Requests for blobs by method and status',
      labelNames: ['method', 'status'] as const,
      registers: [registry],
    }),
    lifecycle: createLifecycleMetrics(registry),
  };
}

/** What the origin app needs. */
export interface OriginAppDeps {
  store: BlobStore;
  /** The bearer token writes need. Never logged. */
  token: string;
  /** When non-empty, manifests must be signed by one of these keys (else 422). */
  trustedKeys: KeyObject[];
  logger: Logger;
  metrics: OriginMetrics;
  /** Largest manifest body in bytes (413 beyond). */
  maxManifestBytes: number;
  /** Largest blob body in bytes (413 SC_ERR_TOO_LARGE beyond; nothing is stored). */
  maxBlobSize: number;
  /** Clock in ms since the epoch (the garbage collector's grace period). Default Date.now. */
  now?: () => number;
}

/** Metric `route` labels by express route path (bounded cardinality). */
const ROUTE_NAMES: Record<string, string> = {
  '/healthz': 'healthz',
  '/metrics': 'metrics',
  '/v1/blobs/:ref': 'blob',
  '/v1/bundles': 'bundles',
  '/v1/bundles/:name/:version': 'manifest',
};

/** The origin's side of the shared read API: everything is read from the store. */
function originReadSource(deps: OriginAppDeps): ReadSource {
  const { store, metrics } = deps;
  return {
    async openBlob(digest) {
      const { size } = await store.statBlob(digest);
      return {
        size,
        async send(res, start, end) {
          const count = (n: number) => metrics.blobBytesOut.inc(n);
          if (store.blobPath) return sendFileRange(res, store.blobPath(digest), start, end, count);
          if (end < start) {
            res.end();
            return 0;
          }
          return sendStream(res, () => store.openBlob(digest, { start, end }), count);
        },
        release() {},
      };
    },
    async getManifest(name, version) {
      const body = canonicalJson(await store.getManifest(name, version));
      const meta = await store.getManifestMeta(name, version);
      return { json: body, digest: sha256Of(body), headers: meta.fingerprint ? { [FINGERPRINT_HEADER]: meta.fingerprint } : undefined };
    },
    listBundles: () => store.listBundles(),
    health: () => ({ ok: true, service: 'origin', version: pkg.version }),
    metrics: async () => ({ contentType: metrics.registry.contentType, text: await metrics.registry.metrics() }),
  };
}

/**
 * Builds the express app: the shared read API (shared/http/read-api.ts, which also guards every
 * path), the token-protected writes, metrics, request logs and the one error handler.
 */
export function createOriginApp(deps: OriginAppDeps): express.Express {
  const { store, metrics, logger } = deps;
  const log = logger.child({ component: 'origin' });
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);
  app.set('case sensitive routing', true);
  app.set('strict routing', true);
  const auth = requireToken(deps.token);

  // Metrics and request logs, recorded when the response is done (or the client went away).
  app.use((req, res, next) => {
    const t0 = process.hrtime.bigint();
    res.once('close', () => {
      const route = (res.locals.route as string | undefined) ?? ROUTE_NAMES[(req.route as { path?: string } | undefined)?.path ?? ''] ?? 'other';
      const status = String(res.statusCode);
      metrics.requests.inc({ method: req.method, route, status });
      let out = res.locals.bytesOut as number | undefined;
      if (out === undefined) out = req.method === 'HEAD' ? 0 : Number(res.getHeader('content-length') ?? 0) || 0;
      if (out > 0) metrics.bytesOut.inc({ route }, out);
      if (route === 'blob') metrics.blobRequests.inc({ method: req.method, status });
      log.debug(
        { method: req.method, path: req.path.slice(0, 200), status: res.statusCode, bytes: out, ms: Number(process.hrtime.bigint() - t0) / 1e6 },
        'request',
      );
    });
    next();
  });
  app.use(createReadApiRouter(originReadSource(deps), { writeMethods: ['PUT'] }));

  app.put('/v1/blobs/:ref', auth, async (req, res) => {
    res.locals.route = 'blob';
    const digest = blobParam(req);
    const cl = req.headers['content-length'];
    const expected = cl === undefined ? undefined : Number(cl);
    const max = deps.maxBlobSize;
    if (expected !== undefined && expected > max) {
      // Refused before a byte of the body is read; the connection is not kept for the rest of it.
      res.set('Connection', 'close');
      throw scError('SC_ERR_TOO_LARGE', `blob of ${expected} bytes is larger than the origin's maxBlobSize (${max})`, { size: expected, max });
    }
    // The store reads from this pass-through, never from the socket directly: if the store
    // gives up early, the request is unpiped and drained so the error can still be answered.
    // A body without Content-Length (chunked) is cut off as soon as it passes maxBlobSize.
    let received = 0;
    const body = new Transform({
      highWaterMark: 1 << 20,
      transform(chunk: Buffer, _enc, cb) {
        metrics.bytesIn.inc({ route: 'blob' }, chunk.length);
        received += chunk.length;
        if (received > max) {
          cb(scError('SC_ERR_TOO_LARGE', `blob body passed the origin's maxBlobSize (${max} bytes)`, { max }));
          return;
        }
        cb(null, chunk);
      },
    });
    req.once('close', () => {
      if (!req.complete) body.destroy(scError('SC_ERR_BAD_REQUEST', 'the client closed the connection before the upload ended'));
    });
    req.once('error', (err) => body.destroy(err));
    req.pipe(body);
    let r: { created: boolean; size: number };
    try {
      r = await store.putBlob(digest, body, expected);
    } catch (err) {
      req.unpipe(body);
      if (isScError(err, 'SC_ERR_TOO_LARGE')) {
        // Do not drain an over-cap body: answer and close the connection.
        res.set('Connection', 'close');
      } else if (!req.complete && !req.destroyed) req.resume();
      throw err;
    }
    res.status(r.created ? 201 : 200).json({ digest, size: r.size, created: r.created });
  });

  app.put(
    '/v1/bundles/:name/:version',
    auth,
    (req, res, next) => {
      res.locals.route = 'manifest';
      const n = Number(req.headers['content-length'] ?? 0);
      if (n > 0) metrics.bytesIn.inc({ route: 'manifest' }, n);
      next();
    },
    express.json({ limit: deps.maxManifestBytes, type: () => true, strict: true }),
    async (req, res) => {
      const name = parseName(req.params.name);
      const version = parseVersion(req.params.version);
      if (req.body === undefined || req.body === null) throw scError('SC_ERR_BAD_MANIFEST', 'empty body: expected a manifest');
      const m = parseManifest(req.body);
      if (m.name !== name || m.version !== version) {
        throw scError('SC_ERR_BAD_MANIFEST', `the path says ${name}@${version} but the manifest is ${m.name}@${m.version}`);
      }
      if (deps.trustedKeys.length > 0) verifyManifest(m, deps.trustedKeys);
      const fpHeader = req.get(FINGERPRINT_HEADER);
      let fingerprint: Digest | undefined;
      if (fpHeader !== undefined) {
        try {
          fingerprint = parseDigest(fpHeader);
        } catch {
          throw scError('SC_ERR_BAD_REQUEST', `${FINGERPRINT_HEADER} must be sha256:<64 hex>`);
        }
      }
      // The blob must be there, as stated: checked by the store under the lock a garbage
      // collection takes, so a sweep can never remove it between this check and the write.
      const r = await store.putManifest(m, { fingerprint }, { requireBlob: true });
      log.info({ name, version, manifestDigest: r.manifestDigest, created: r.created }, r.created ? 'manifest published' : 'manifest already present');
      res.status(r.created ? 201 : 200).json({ name, version, manifestDigest: r.manifestDigest, created: r.created });
    },
  );
  mountAdminRoutes(app, { store, trustedKeys: deps.trustedKeys, auth, log, metrics: metrics.lifecycle, now: deps.now ?? Date.now });
  app.use(unknownRoute);
  app.use(errorHandler(log));
  return app;
}

/**
 * Applies the origin's socket policy to its HTTP server: no overall request deadline (a
 * multi-GB upload may take long), headers within 60 s, and connections idle for
 * `idleTimeoutSec` closed. Oversized headers get 431 SC_ERR_HEADER_TOO_LARGE, as on a stage.
 */
export function configureOriginServer(server: Server, idleTimeoutSec: number): void {
  server.on('clientError', onClientError);
  server.requestTimeout = 0;
  server.headersTimeout = 60_000;
  server.keepAliveTimeout = 5_000;
  if (idleTimeoutSec > 0) server.setTimeout(idleTimeoutSec * 1000);
}
