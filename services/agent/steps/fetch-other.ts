/**
 * `fetch-other`: from B, fetch another OS D (`args.target`) through the colo's stages straight
 * into the kept store on disk2p2 (B's root is small and D stays kept for later reinstalls).
 * Same checks as `fetch`: manifest signature first, blob digest while downloading.
 *
 * Effect check: D complete in the kept store.
 * Failure leaves: at most a `.partial` download on disk2p2 (resumed by the next run).
 */

import { refString } from '../../../shared/protocol/index.js';
import { fetchBundles } from './fetch.js';
import { keptStore, permanent, targetArg } from './common.js';
import type { Step } from './step.js';

/** From B: fetch OS D into the kept store. */
export const fetchOtherStep: Step = {
  name: 'fetch-other',
  timeoutMs: 6 * 3600_000,
  async check(ctx) {
    const ref = targetArg(ctx);
    if (!ref) throw permanent('SC_ERR_BAD_REQUEST', 'job has no target bundle');
    return (await (await keptStore(ctx)).bundles.find(ref, ctx.trusted)) ? `${refString(ref)} is already kept on disk2p2` : null;
  },
  async apply(ctx) {
    const ref = targetArg(ctx);
    if (!ref) throw permanent('SC_ERR_BAD_REQUEST', 'job has no target bundle');
    const k = await keptStore(ctx);
    return fetchBundles(ctx, k.bundles, [{ ref, role: 'target' }], 'fetch-other:mid');
  },
};
