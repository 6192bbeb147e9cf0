/**
 * The stage's HTTP surface: the shared read API (shared/http/read-api.ts) over the stage's
 * cache, fills and upstreams, plus POST /v1/prefetch, GET /v1/fills and the colo relay. Errors
 * become responses only in shared/http.ts `errorHandler`.
 */
import type { RequestListener } from 'node:http';
import express, { type NextFunction, type Request, type Response } from 'express';
import Router from 'router';
import { type Digest, parseDigest } from '../../shared/digest.js';
import { scError } from '../../shared/errors.js';
import { errorHandler, requireToken } from '../../shared/http.js';
import { sendFileRange } from '../../shared/http/body-send.js';
import { createReadApiRouter, methodNotAllowed, type OpenBlob, type ReadSource, unknownRoute } from '../../shared/http/read-api.js';
import type { Logger } from '../../shared/log.js';
import type { Registry } from '../../shared/metrics.js';
import type { BlobCache } from './cache.js';
import { type FetchOnce, streamFill } from './fill.js';
import type { ManifestCache } from './manifests.js';
import type { StageMetrics } from './metrics.js';
import type { Upstreams } from './upstreams.js';
import { ACCEL_PIN_MS, accelTarget } from './accel.js';

/** Answers parse errors (a 1 MB header) with a JSON body and a code; the same on origin. */
export { onClientError } from '../../shared/http/client-error.js';

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
  /**
   * Hand committed blobs to a front nginx: the internal path prefix of its blob location
   * (config `accelRedirect`, accel.ts). Unset: the stage sends every body itself.
   */
  accelRedirect?: string;
  /** The colo relay (services/relay/server.ts), mounted at /v1/relay when on, in front of the express app. */
  relay?: { router: Router.Router; stats(): unknown };
}

/** Most digests one prefetch call may name. */
export const PREFETCH_MAX = 1000;

/**
 * The stage's side of the shared read API. Blobs: a cache hit is read from its file; a miss
 * starts or joins the one fill of that blob (fill.ts) and streams it as it grows, the final
 * byte held back until the digest is verified. Manifests come from the manifest cache; the
 * listing from the first upstream that answers (not cached).
 */
function stageReadSource(d: StageAppDeps): ReadSource {
  const { cache, fills, metrics } = d;
  const count = (n: number) => metrics.bytesServed.inc(n);
  return {
    async openBlob(digest): Promise<OpenBlob> {
      const hit = cache.lookup(digest);
      if (hit) {
        metrics.hits.inc();
        cache.acquire(hit);
        const blob: OpenBlob = { size: hit.size, send: (res, start, end) => sendFileRange(res, hit.path, start, end, count), release: () => cache.release(hit) };
        if (d.accelRedirect === undefined) return blob;
        const target = accelTarget(d.accelRedirect, digest);
        let handedOff = false;
        return {
          ...blob,
          handOff() {
            handedOff = true;
            metrics.accelHandoffs.inc();
            metrics.accelBytes.inc(hit.size);
            count(hit.size);
            return target;
          },
          // nginx opens the file just after it reads the answer's headers: the entry stays
          // pinned (not unlinked by eviction) a while longer so that open never misses it.
          release: () => (handedOff ? setTimeout(() => cache.release(hit), ACCEL_PIN_MS).unref() : cache.release(hit)),
        };
      }
      if (fills.isGone(digest)) {
        metrics.negativeHits.inc();
        throw scError('SC_ERR_BLOB_NOT_FOUND', `no blob ${digest}`);
      }
      // Degraded (no upstream answers): a miss could only fail after the upstream timeouts, so it
      // is refused at once and the client moves to its next source. A fill already running is
      // still joined. Same answer as a fill that ran out of upstreams: 502 SC_ERR_UPSTREAM.
      if (d.upstreams.degraded && !fills.inFlight(digest)) {
        throw scError('SC_ERR_UPSTREAM', `${digest} is not cached here and no upstream answers (stage degraded)`, { reason: 'SC_ERR_NO_UPSTREAM', degraded: true });
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
      } catch (err) {
        fill.release();
        throw err;
      }
      return {
        size: fill.size,
        async send(res, start, end) {
          if (fill.size === 0) {
            // Nothing to hold back: answer only once the (empty) content is verified.
            await fill.done();
            if (!fill.verified) res.destroy();
            else res.end();
            return 0;
          }
          let sent = 0;
          await streamFill(fill, res, start, end, (n) => {
            sent += n;
            count(n);
          });
          return sent;
        },
        release: () => fill.release(),
      };
    },
    async getManifest(name, version) {
      const m = await d.manifests.get(name, version);
      return { json: m.json, digest: m.digest };
    },
    async listBundles() {
      const r = await d.upstreams.getSmall('/v1/bundles', 'listing');
      if (r.status !== 200) throw scError('SC_ERR_UPSTREAM', `upstream ${r.upstream} answered HTTP ${r.status} for /v1/bundles`);
      let list: unknown;
      try {
        list = JSON.parse(r.body.toString('utf8'));
      } catch {
        list = undefined;
      }
      if (!Array.isArray(list)) throw scError('SC_ERR_UPSTREAM', `upstream ${r.upstream} sent a listing that is not a JSON array`);
      return list;
    },
    /*
     * Always HTTP 200 with `ok: true` (the process serves the read API), and `status`: `ok`, or
     * `degraded` while no upstream answers. Degraded is not a 503 on purpose: a degraded stage
     * still serves every cached blob and manifest, which matters most exactly when its upstreams
     * are gone, so a status-code health check (load balancer, systemd, orchestrator) must not
     * eject or restart it. Hosts read `status` (shared/fetch-sources.ts) and rank a degraded stage
     * after the healthy ones. Built from state the upstream checks keep (upstreams.ts): answering
     * costs no upstream request.
     */
    health: () => ({
      ok: true,
      status: d.upstreams.degraded ? 'degraded' : 'ok',
      role: 'stage',
      colo: d.colo,
      upstreams: d.upstreams.order(),
      upstreamHealth: d.upstreams.health(),
      fillsInFlight: fills.size,
      cacheBytes: cache.bytes,
      cacheMaxBytes: cache.maxBytes,
      cacheEntries: cache.entries,
      ...(d.relay ? { relay: d.relay.stats() } : {}),
    }),
    metrics: async () => ({ contentType: d.registry.contentType, text: await d.registry.metrics() }),
  };
}

/**
 * Builds a stage's request handler: a plain router that counts every request and, when the
 * relay is on, answers `/v1/relay` with the relay's own router (services/relay: its paths and
 * checks, without the cost of an express app per request); everything else goes on to the
 * express app of the read API, prefetch and fills. Errors of both become responses in
 * `errorHandler`.
 */
export function createStageHandler(d: StageAppDeps): RequestListener {
  const { metrics } = d;
  const app = createStageApp(d);
  const errors = errorHandler(d.log);
  const front = new Router({ caseSensitive: true, strict: true });
  front.use((req, res, next) => {
    res.on('finish', () => {
      const route = (req.route?.path as string | undefined) ?? 'other';
      metrics.http.requests.inc({ method: req.method ?? 'other', route, status: String(res.statusCode) });
    });
    next();
  });
  if (d.relay) front.use('/v1/relay', d.relay.router);
  return (req, res) => front(req, res, (err?: unknown) => (err ? errors(err, req, res, () => {}) : app(req, res)));
}

/** The express app of a stage: everything but the relay. */
function createStageApp(d: StageAppDeps): express.Express {
  const { cache, fills } = d;
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);
  app.set('case sensitive routing', true);
  app.set('strict routing', true);

  app.use(createReadApiRouter(stageReadSource(d)));

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
  app.all('/v1/prefetch', methodNotAllowed(['POST']));
  app.get('/v1/fills', (_req, res) => {
    res.set('Cache-Control', 'no-store').json({ fills: fills.list() });
  });
  app.all('/v1/fills', methodNotAllowed(['GET', 'HEAD']));

  app.use(unknownRoute);
  app.use(errorHandler(d.log));
  return app;
}
