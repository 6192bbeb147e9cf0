/**
 * Step 5, `apply-config-base`: write the carried configuration into B on disk2p1 in B's own
 * network format (from B's manifest, recorded by install-base), so that B comes up on the same
 * IP with the same host keys.
 *
 * Effect check: every file the carried config renders for B's format is on disk2p1 with that
 * exact content.
 * Failure leaves: some of those files written (the next run writes the rest); A is still the
 * default boot entry.
 */
import { BASE_DEVICE } from '../bundles.js';
import { carried, configInPlace, keptStore, permanent } from './common.js';
import type { Step, StepContext } from './step.js';

async function target(ctx: StepContext) {
  const k = await keptStore(ctx);
  const cfg = await carried(k);
  const os = await ctx.driver.installedOs(BASE_DEVICE);
  if (!os?.complete) throw permanent('SC_ERR_CONFLICT', `${BASE_DEVICE} holds no completely installed OS (install-base has not run)`);
  return { cfg, os, root: await ctx.driver.mountPath(BASE_DEVICE) };
}

/** Step 5: the carried configuration, written into B. */
export const applyConfigBaseStep: Step = {
  name: 'apply-config-base',
  timeoutMs: 10 * 60_000,
  async check(ctx) {
    const { cfg, os, root } = await target(ctx);
    return (await configInPlace(root, cfg, os.netFormat)) ? `the carried configuration is already in ${BASE_DEVICE} (${os.netFormat})` : null;
  },
  async apply(ctx) {
    const { cfg, os } = await target(ctx);
    await ctx.driver.applyConfig(BASE_DEVICE, cfg, os.netFormat);
    return { device: BASE_DEVICE, netFormat: os.netFormat };
  },
};
