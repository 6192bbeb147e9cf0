/**
 * The reconcile pass: a stage drops what its upstream no longer lists (a bundle removed at
 * origin, `bundles rm`), on a timer (`reconcileIntervalMs`; 0: never) and on demand
 * (`RunningStage.reconcile()`). Until then, and without it, only the byte budget evicts.
 *
 * One pass:
 * 1. notes the generations of the blob cache and the manifest cache: what is stored after this
 *    point (a bundle published after the listing was taken, a fill that commits meanwhile) stays;
 * 2. GETs `/v1/bundles` through `Upstreams.getSmall` (the first upstream that answers below 500).
 *    A child stage asks its parent stage, which answers with its own upstream's listing;
 * 3. learns which blob each listed bundle references (below);
 * 4. deletes the cached manifests of bundles not listed (the next request for one goes upstream
 *    and gets origin's 404), then drops every cached blob that no listed bundle references.
 *
 * **Decision: how the stage learns manifest → blob references.** The listing names each
 * bundle's manifest digest, not its blob, so the blob comes from the manifest. The stage already
 * caches manifests (immutable, signed, by name@version: manifests.ts), and this module keeps a
 * memo `name/version → {manifestDigest, blob}` across passes. A listed bundle therefore costs
 * nothing when the memo or the manifest cache holds its manifest with the listed digest, and one
 * manifest GET upstream otherwise (a bundle new since the last pass, or one nobody asked this
 * stage for); that manifest is then cached like any other. A steady-state pass is one listing
 * request. Manifest requests run `concurrency` at a time.
 *
 * **Rule.** A blob is kept when any listed bundle references it. Only a complete, valid answer
 * drops anything, and each outcome is counted (`stage_reconcile_runs_total{outcome}`) and logged:
 * - `ok`: a 200 whose body is a JSON array of entries with a valid name, version and manifest
 *   digest, and every listed bundle's blob known. Only this outcome drops;
 * - `upstream_error`: no upstream answered (refused, timed out, 5xx everywhere, a body over
 *   1 MiB, cut mid-body), one answered another status than 200, or the stage is degraded;
 * - `invalid_listing`: a 200 that is not JSON, not an array, or has an invalid entry;
 * - `empty_listing`: `[]`. An upstream that lists no bundle at all is far more often an origin
 *   started on an empty or wrong data directory than a fleet whose every bundle was removed, and
 *   acting on it would empty every stage at once; a fleet that really removed everything keeps
 *   its cached bytes until LRU eviction;
 * - `incomplete`: a listed bundle's manifest could not be read (a 404 although listed, an
 *   invalid manifest, another digest than listed, no answer). Nothing at all is dropped, neither
 *   blobs (the unread manifest might reference any of them) nor manifests;
 * - `error`: a local failure (a bug); nothing is dropped.
 * A listing the stage can tell is partial (cut, truncated JSON, a bundle it cannot resolve) is
 * never acted on. A well-formed listing that leaves bundles out cannot be told from a complete
 * one: the upstream is authoritative, except for an empty one (above).
 *
 * **Never dropped:** fills in progress, and what arrived after step 1. A blob being read is
 * taken out of the index at once (new requests fill it again from upstream, and get 404 once
 * origin collected it), and its file is deleted after its last reader (BlobCache's deferred
 * unlink). Partial fills kept on disk for a later resume are not indexed and not looked at.
 */
import { type Digest, isDigest } from '../../shared/digest.js';
import { toScError } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import { NAME_RE, VERSION_RE } from '../../shared/names.js';
import type { BlobCache } from './cache.js';
import type { Clock } from './clock.js';
import { type ManifestCache, manifestKey } from './manifests.js';
import type { StageMetrics } from './metrics.js';
import type { SmallResponse, Upstreams } from './upstreams.js';

/** How a pass ended; only `ok` drops anything. */
export type ReconcileOutcome = 'ok' | 'upstream_error' | 'invalid_listing' | 'empty_listing' | 'incomplete' | 'error';

/** What one pass did. */
export interface ReconcileResult {
  outcome: ReconcileOutcome;
  /** Bundles in the listing (0 when it was not valid). */
  listed: number;
  /** Blobs taken out of the cache, and their bytes. */
  droppedBlobs: number;
  droppedBytes: number;
  /** Of the dropped blobs, those being read then: their files go after their last reader. */
  heldBlobs: number;
  /** Cached manifests deleted. */
  droppedManifests: number;
  /** Why nothing was dropped (every outcome but `ok`). */
  error?: string;
}

/** Dependencies of `Reconciler`. */
export interface ReconcilerOptions {
  cache: BlobCache;
  manifests: ManifestCache;
  upstreams: Upstreams;
  clock: Clock;
  log: Logger;
  metrics: StageMetrics;
  /** Time between passes, ms; 0: no timer (passes only on demand). */
  intervalMs: number;
  /** Manifest requests in flight at once during a pass (default 4). */
  concurrency?: number;
}

interface Listed {
  key: string;
  name: string;
  version: string;
  manifestDigest: Digest;
}

/** A pass that must drop nothing, with its outcome. */
class Refusal extends Error {
  constructor(
    readonly outcome: Exclude<ReconcileOutcome, 'ok'>,
    message: string,
  ) {
    super(message);
  }
}

const NOTHING = { listed: 0, droppedBlobs: 0, droppedBytes: 0, heldBlobs: 0, droppedManifests: 0 } as const;

/** Runs reconcile passes, never two at once. */
export class Reconciler {
  #o: ReconcilerOptions;
  #timer: unknown;
  #running: Promise<ReconcileResult> | null = null;
  #closed = new AbortController();
  /** Listed bundle → the manifest digest it was listed with and the blob that manifest references. */
  #refs = new Map<string, { manifestDigest: Digest; blob: Digest }>();

  constructor(o: ReconcilerOptions) {
    this.#o = o;
  }

  /** Starts the timer (the first pass one interval from now); does nothing when `intervalMs` is 0. */
  start(): void {
    if (this.#o.intervalMs > 0) this.#schedule();
  }

  /** Runs one pass now, or joins the one running. Never rejects. */
  run(): Promise<ReconcileResult> {
    this.#running ??= this.#pass().finally(() => {
      this.#running = null;
    });
    return this.#running;
  }

  /**
   * Stops the timer. A running pass stops asking upstream and drops nothing from here on; it is
   * not waited for (a manifest request it has in flight ends within the upstream timeout).
   */
  close(): void {
    this.#closed.abort();
    this.#o.clock.clearTimeout(this.#timer);
  }

  #schedule(): void {
    if (this.#closed.signal.aborted) return;
    this.#timer = this.#o.clock.setTimeout(() => {
      void this.run().finally(() => this.#schedule());
    }, this.#o.intervalMs);
  }

  async #pass(): Promise<ReconcileResult> {
    const { cache, manifests, metrics, log, clock } = this.#o;
    const blobGen = cache.generation;
    const manifestGen = manifests.generation;
    const t0 = clock.now();
    let result: ReconcileResult;
    try {
      const listed = await this.#listing();
      const keep = await this.#references(listed);
      this.#checkOpen();
      const droppedManifests = await manifests.dropUnlisted(new Set(listed.map((l) => l.key)), manifestGen);
      const d = cache.dropUnreferenced(keep, blobGen);
      result = { outcome: 'ok', listed: listed.length, droppedBlobs: d.blobs, droppedBytes: d.bytes, heldBlobs: d.held, droppedManifests };
      metrics.reconcileDroppedBlobs.inc(d.blobs);
      metrics.reconcileDroppedBytes.inc(d.bytes);
      metrics.reconcileDroppedManifests.inc(droppedManifests);
      metrics.reconcileLastSuccess.set(Math.floor(clock.now() / 1000));
      log.info({ ...result, referenced: keep.size, ms: clock.now() - t0 }, 'reconcile pass done');
    } catch (err) {
      const r = err instanceof Refusal ? err : new Refusal('error', toScError(err).message);
      result = { outcome: r.outcome, ...NOTHING, error: r.message };
      const fields = { outcome: r.outcome, err: r.message, ms: clock.now() - t0 };
      if (r.outcome === 'error') log.error(fields, 'reconcile pass failed; dropped nothing');
      else log.warn(fields, 'reconcile pass dropped nothing');
    }
    metrics.reconcileRuns.inc({ outcome: result.outcome });
    return result;
  }

  #checkOpen(): void {
    if (this.#closed.signal.aborted) throw new Refusal('upstream_error', 'stage is closing');
  }

  /** The upstream's listing, validated entry by entry. Throws a Refusal. */
  async #listing(): Promise<Listed[]> {
    let r: SmallResponse;
    try {
      r = await this.#o.upstreams.getSmall('/v1/bundles', 'listing', this.#closed.signal);
    } catch (err) {
      throw new Refusal('upstream_error', `no listing: ${toScError(err).message}`);
    }
    this.#checkOpen();
    if (r.status !== 200) throw new Refusal('upstream_error', `upstream ${r.upstream} answered HTTP ${r.status} for /v1/bundles`);
    let body: unknown;
    try {
      body = JSON.parse(r.body.toString('utf8'));
    } catch {
      throw new Refusal('invalid_listing', `upstream ${r.upstream} sent a listing that is not JSON`);
    }
    if (!Array.isArray(body)) throw new Refusal('invalid_listing', `upstream ${r.upstream} sent a listing that is not a JSON array`);
    if (body.length === 0) throw new Refusal('empty_listing', `upstream ${r.upstream} lists no bundle at all (an origin on an empty data directory?); nothing dropped`);
    return body.map((e: unknown, i): Listed => {
      const x = (typeof e === 'object' && e !== null ? e : {}) as Record<string, unknown>;
      const { name, version, manifestDigest } = x;
      if (typeof name !== 'string' || !NAME_RE.test(name) || typeof version !== 'string' || !VERSION_RE.test(version) || !isDigest(manifestDigest)) {
        throw new Refusal('invalid_listing', `upstream ${r.upstream} sent an invalid listing entry at index ${i}`);
      }
      return { key: manifestKey(name, version), name, version, manifestDigest };
    });
  }

  /** The blobs the listed bundles reference. Throws a Refusal (`incomplete`) when one cannot be learned. */
  async #references(listed: Listed[]): Promise<Set<Digest>> {
    const keep = new Set<Digest>();
    const todo: Listed[] = [];
    for (const l of listed) {
      const memo = this.#refs.get(l.key);
      if (memo?.manifestDigest === l.manifestDigest) keep.add(memo.blob);
      else todo.push(l);
    }
    let failure: Refusal | undefined;
    let next = 0;
    const worker = async () => {
      while (failure === undefined && next < todo.length) {
        const l = todo[next++];
        if (this.#closed.signal.aborted) {
          failure = new Refusal('upstream_error', 'stage is closing');
          return;
        }
        try {
          const blob = await this.#o.manifests.blobOf(l.name, l.version, l.manifestDigest);
          this.#refs.set(l.key, { manifestDigest: l.manifestDigest, blob });
          keep.add(blob);
        } catch (err) {
          const e = toScError(err);
          failure ??= new Refusal('incomplete', `cannot learn what ${l.name}@${l.version} references: ${e.code}: ${e.message}`);
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.#o.concurrency ?? 4, todo.length) }, worker));
    const current = new Set(listed.map((l) => l.key));
    for (const k of [...this.#refs.keys()]) if (!current.has(k)) this.#refs.delete(k);
    if (failure) throw failure;
    return keep;
  }
}
