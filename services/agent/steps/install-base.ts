/**
 * Step 3, `install-base`: copy the packed B and C bundles (and their manifests) from the
 * running OS's state dir onto disk2p2, where they stay (rescue and reinstall need no network);
 * then unpack B onto disk2p1 from that kept copy.
 *
 * The copy is sha256-checked against the signed manifest while it is written; a kept copy from
 * an earlier run is checked again before it is unpacked. A blob that fails is never unpacked.
 *
 * Effect check: both bundles kept on disk2p2, and disk2p1 holds B completely (driver marker
 * and the kept `installed.json` record agree).
 * Failure leaves: possibly partial copies (`.partial`, redone) and a wiped or half-written
 * disk2p1 that no boot entry points at; OS A untouched and still the default.
 */
import { refString } from '../../../shared/protocol/index.js';
import { stateBundles, BASE_DEVICE } from '../bundles.js';
import { baseArg, installBundle, installedHere, keptStore, permanent, targetArg } from './common.js';
import type { Step, StepContext } from './step.js';

async function refs(ctx: StepContext) {
  const base = baseArg(ctx);
  const target = targetArg(ctx);
  if (!target) throw permanent('SC_ERR_BAD_REQUEST', 'job has no target bundle');
  return { base, target };
}

/** Step 3: keep B and C on disk2p2, unpack B onto disk2p1. */
export const installBaseStep: Step = {
  name: 'install-base',
  timeoutMs: 3 * 3600_000,
  async check(ctx) {
    const { base, target } = await refs(ctx);
    const k = await keptStore(ctx);
    const b = await k.bundles.find(base, ctx.trusted);
    if (!b || !(await k.bundles.find(target, ctx.trusted))) return null;
    const kept = await k.readKept();
    if (kept.base?.name !== base.name || kept.base?.version !== base.version) return null;
    return (await installedHere(ctx, k, BASE_DEVICE, b)) ? `${refString(base)} is installed on ${BASE_DEVICE} and both bundles are kept` : null;
  },
  async apply(ctx) {
    const { base, target } = await refs(ctx);
    const k = await keptStore(ctx);
    const state = await stateBundles(ctx.driver);
    const copied: string[] = [];
    let baseVerified = false;
    for (const ref of [base, target]) {
      if (await k.bundles.find(ref, ctx.trusted)) continue;
      const m = await state.find(ref, ctx.trusted);
      if (!m) throw permanent('SC_ERR_CONFLICT', `${refString(ref)} is not in the state dir (fetch has not run)`);
      await ctx.log(`keeping ${refString(ref)} on disk2p2 (${m.blob.size} bytes)`);
      await k.bundles.copyFrom(state, m, ctx.trusted, (n) => ctx.progress({ bytes: n, total: m.blob.size }), ctx.signal);
      copied.push(refString(ref));
      if (ref === base) baseVerified = true; // the copy was checked against the digest just now
    }
    await k.writeKept({ base, target });
    const b = (await k.bundles.find(base, ctx.trusted))!;
    let entries = 0;
    if (!(await installedHere(ctx, k, BASE_DEVICE, b))) {
      await ctx.log(`unpacking ${refString(base)} onto ${BASE_DEVICE}`);
      entries = (await installBundle(ctx, k, k.bundles, b, BASE_DEVICE, { hookPoint: 'install-base:mid', verified: baseVerified })).entries;
    }
    return { kept: [refString(base), refString(target)], copied, device: BASE_DEVICE, entries };
  },
};
