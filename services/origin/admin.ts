/**
 * The origin's own routes beside the shared read API: which release keys it trusts (so a
 * publisher can stop before uploading), and the bundle lifecycle writes: removing a manifest
 * and collecting unreferenced blobs. Paths and answers are documented in README.md ("Origin:
 * HTTP API"). Errors go to the server's one error handler.
 */
import type { KeyObject } from 'node:crypto';
import express, { type RequestHandler } from 'express';
import { scError } from '../../shared/errors.js';
import { methodNotAllowed } from '../../shared/http/read-api.js';
import type { Logger } from '../../shared/log.js';
import { keyId } from '../../shared/manifest.js';
import { Counter, type Registry } from '../../shared/metrics.js';
import { parseName, parseVersion } from '../../shared/names.js';
import { DEFAULT_GC_GRACE_SEC } from './client.js';
import type { BlobStore } from './store.js';

/** Largest accepted grace period (ten years), to refuse nonsense rather than overflow. */
const MAX_GC_GRACE_SEC = 10 * 365 * 24 * 3600;

/** The lifecycle counters, on the origin's registry. */
export interface LifecycleMetrics {
  /** `origin_manifests_removed_total` */
  manifestsRemoved: Counter;
  /** `origin_gc_removed_blobs_total` */
  gcRemovedBlobs: Counter;
  /** `origin_gc_freed_bytes_total` */
  gcFreedBytes: Counter;
}

/** Creates the lifecycle counters on `registry`. */
export function createLifecycleMetrics(registry: Registry): LifecycleMetrics {
  return {
    manifestsRemoved: new Counter({ name: 'origin_manifests_removed_total', help: 'Manifests removed', registers: [registry] }),
    gcRemovedBlobs: new Counter({ name: 'origin_gc_removed_blobs_total', help: 'Unreferenced blobs removed by garbage collection', registers: [registry] }),
    gcFreedBytes: new Counter({ name: 'origin_gc_freed_bytes_total', help: 'Bytes freed by garbage collection', registers: [registry] }),
  };
}

/** What the admin routes need. */
export interface AdminDeps {
  store: BlobStore;
  trustedKeys: KeyObject[];
  /** Write-token middleware. */
  auth: RequestHandler;
  log: Logger;
  metrics: LifecycleMetrics;
  /** Clock for the grace period (ms since the epoch). */
  now: () => number;
}

/** The body of `POST /v1/admin/gc`: every field optional. */
function gcParams(body: unknown): { graceSec: number; dryRun: boolean } {
  const b = (body ?? {}) as Record<string, unknown>;
  if (typeof b !== 'object' || Array.isArray(b)) throw scError('SC_ERR_BAD_REQUEST', 'expected a JSON object {graceSec?, dryRun?}');
  for (const k of Object.keys(b)) if (k !== 'graceSec' && k !== 'dryRun') throw scError('SC_ERR_BAD_REQUEST', `unknown field ${JSON.stringify(k.slice(0, 40))}`);
  const graceSec = b.graceSec ?? DEFAULT_GC_GRACE_SEC;
  if (typeof graceSec !== 'number' || !Number.isInteger(graceSec) || graceSec < 0 || graceSec > MAX_GC_GRACE_SEC) {
    throw scError('SC_ERR_BAD_REQUEST', `graceSec must be a whole number of seconds from 0 to ${MAX_GC_GRACE_SEC}`);
  }
  if (b.dryRun !== undefined && typeof b.dryRun !== 'boolean') throw scError('SC_ERR_BAD_REQUEST', 'dryRun must be true or false');
  return { graceSec, dryRun: b.dryRun === true };
}

/** Mounts the admin routes on `app` (after the read API router, before `unknownRoute`). */
export function mountAdminRoutes(app: express.Express, d: AdminDeps): void {
  const trusted = d.trustedKeys.map((k) => keyId(k));

  app.get('/v1/trusted-keys', (_req, res) => {
    res.locals.route = 'trusted-keys';
    res.set('Cache-Control', 'no-store').json({ enforced: trusted.length > 0, keyIds: trusted });
  });
  app.all('/v1/trusted-keys', methodNotAllowed(['GET', 'HEAD']));

  app.delete('/v1/admin/bundles/:name/:version', d.auth, async (req, res) => {
    res.locals.route = 'admin-bundle';
    const name = parseName(req.params.name);
    const version = parseVersion(req.params.version);
    const r = await d.store.deleteManifest(name, version);
    d.metrics.manifestsRemoved.inc();
    d.log.info({ name, version, manifestDigest: r.manifestDigest, blob: r.blob.digest }, 'manifest removed');
    res.json({ ...r, removed: true });
  });
  app.all('/v1/admin/bundles/:name/:version', methodNotAllowed(['DELETE']));

  app.post('/v1/admin/gc', d.auth, express.json({ limit: '16kb', type: () => true, strict: true }), async (req, res) => {
    res.locals.route = 'admin-gc';
    const { graceSec, dryRun } = gcParams(req.body);
    const t0 = d.now();
    const r = await d.store.collectGarbage({ graceMs: graceSec * 1000, dryRun, now: d.now });
    if (!dryRun) {
      d.metrics.gcRemovedBlobs.inc(r.removed.blobs);
      d.metrics.gcFreedBytes.inc(r.removed.bytes);
    }
    d.log.info({ dryRun, graceSec, scanned: r.scanned.blobs, removed: r.removed.blobs, freedBytes: r.removed.bytes, kept: r.kept, ms: d.now() - t0 }, 'garbage collected');
    res.set('Cache-Control', 'no-store').json({ ...r, graceSec });
  });
  app.all('/v1/admin/gc', methodNotAllowed(['POST']));
}
