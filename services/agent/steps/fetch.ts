/**
 * Step 1, `fetch`: get bundles B (base) and C (target) into the running OS's state dir, through
 * the nearest healthy stage (probe the colo's stages, fastest healthy first, fall back to the
 * next; origin only when the stages are used up: a busy stage keeps its hosts). The manifest signature is checked against the trusted release keys before
 * a byte of the blob is fetched; the blob is sha256-checked while it downloads and only a
 * verified blob is renamed into place (shared/fetch.ts). A download cut mid-way continues with
 * Range from the next source, and a `.partial` left by a crash is resumed.
 *
 * Effect check: both bundles complete in the state dir (manifest verifies, blob has its size).
 * Failure leaves: at most a `.partial` download in the state dir (resumed by the next run);
 * nothing on disk 2, nothing unpacked.
 */
import { refString } from '../../../shared/protocol/index.js';
import { mkdir } from 'node:fs/promises';
import { type FetchedManifest, fetchBlob, fetchManifest, selectSources } from '../../../shared/fetch.js';
import type { Manifest } from '../../../shared/manifest.js';
import { type BundleDir, stateBundles } from '../bundles.js';
import type { BundleRef } from '../../../shared/protocol/index.js';
import { baseArg, permanent, targetArg } from './common.js';
import type { Step, StepContext, StepResult } from './step.js';

/** One bundle to fetch and the role its manifest must have. */
export interface Wanted {
  ref: BundleRef;
  role: 'base' | 'target';
}

/**
 * Fetches `wanted` bundles into `dir` (skipping complete ones). All manifests first (so the
 * total is known and a bad signature stops everything before any download), then the blobs.
 * `hookPoint` is a crash point reached halfway through the bytes.
 */
export async function fetchBundles(ctx: StepContext, dir: BundleDir, wanted: Wanted[], hookPoint: string): Promise<StepResult> {
  const missing: Wanted[] = [];
  for (const w of wanted) if (!(await dir.find(w.ref, ctx.trusted))) missing.push(w);
  if (missing.length === 0) return { fetched: [], bytes: 0 };
  await mkdir(dir.dir, { recursive: true });
  const { sources, stages, origin, probes } = await selectSources(ctx.stages, { origin: ctx.origin, signal: ctx.signal });
  await ctx.log(`sources: ${probes.map((p) => `${p.url} ${p.healthy ? `${Math.round(p.rttMs)}ms` : `unhealthy (${p.error})`}`).join(', ') || 'none'}${ctx.origin ? `; origin ${ctx.origin}` : ''}`);
  const fetched: FetchedManifest[] = [];
  for (const w of missing) {
    const f = await fetchManifest(sources, w.ref.name, w.ref.version, ctx.trusted, { signal: ctx.signal });
    if (f.manifest.role !== w.role) {
      throw permanent('SC_ERR_BAD_MANIFEST', `${refString(w.ref)} is a ${f.manifest.role} bundle, expected a ${w.role} bundle`);
    }
    if (f.manifest.blob.encryption === 'age' && ctx.identities.length === 0) throw permanent('SC_ERR_DECRYPT', 'bundle is encrypted and no identity is configured');
    fetched.push(f);
  }
  const total = fetched.reduce((a, f) => a + f.manifest.blob.size, 0);
  let done = 0;
  let half = false;
  const result: { bundle: string; digest: string; size: number; sources: string[]; resumedFrom: number; downloaded: number }[] = [];
  for (const f of fetched) {
    const m: Manifest = f.manifest;
    const r = await fetchBlob({
      sources: stages,
      origin,
      digest: m.blob.digest,
      size: m.blob.size,
      out: dir.blobPath(m.blob.digest),
      overwrite: true,
      signal: ctx.signal,
      onProgress: (p) => {
        const bytes = done + p.bytes;
        ctx.progress({ bytes, total });
        if (!half && bytes >= total / 2 && p.bytes > 0) {
          half = true;
          ctx.crashPoint(hookPoint);
        }
      },
    });
    done += m.blob.size;
    await dir.saveManifest(m);
    await ctx.log(`${refString(m)}: ${m.blob.size} bytes verified from ${r.sources.join(' then ') || 'local file'}${r.resumedFrom ? ` (resumed at ${r.resumedFrom})` : ''}`);
    result.push({ bundle: refString(m), digest: m.blob.digest, size: m.blob.size, sources: r.sources, resumedFrom: r.resumedFrom, downloaded: r.downloaded });
  }
  return { fetched: result, bytes: total };
}

/** Step 1: B and C into the running OS's state dir, verified. */
export const fetchStep: Step = {
  name: 'fetch',
  timeoutMs: 6 * 3600_000,
  async check(ctx) {
    const dir = await stateBundles(ctx.driver);
    const refs = [baseArg(ctx), requiredTarget(ctx)];
    for (const r of refs) if (!(await dir.find(r, ctx.trusted))) return null;
    return 'both bundles are already in the state dir';
  },
  async apply(ctx) {
    const dir = await stateBundles(ctx.driver);
    return fetchBundles(
      ctx,
      dir,
      [
        { ref: baseArg(ctx), role: 'base' },
        { ref: requiredTarget(ctx), role: 'target' },
      ],
      'fetch:mid',
    );
  },
};

function requiredTarget(ctx: StepContext): BundleRef {
  const t = targetArg(ctx);
  if (!t) throw permanent('SC_ERR_BAD_REQUEST', 'job has no target bundle');
  return t;
}
