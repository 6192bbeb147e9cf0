/**
 * Step 8, `wipe-target-disk`: remove the old OS (A, or C on a reinstall) from disk1p1.
 *
 * Preconditions, so that the host stays bootable at every moment: the host runs from disk 2,
 * and the default boot entry is not disk1p1 (commit-base or rescue made it disk2p1).
 * Effect check: disk1p1 is empty.
 * Failure leaves: disk1p1 partly or fully wiped; the host runs B, which is the default entry.
 */
import { TARGET_DEVICE } from '../bundles.js';
import { keptStore, permanent } from './common.js';
import type { Step } from './step.js';

/** Step 8: the old OS removed from disk1p1. */
export const wipeTargetDiskStep: Step = {
  name: 'wipe-target-disk',
  timeoutMs: 60 * 60_000,
  async check(ctx) {
    return (await ctx.driver.isEmpty(TARGET_DEVICE)) ? `${TARGET_DEVICE} is empty` : null;
  },
  async apply(ctx) {
    const running = await ctx.driver.running();
    const boot = await ctx.driver.bootConfig();
    if (running.device === TARGET_DEVICE) throw permanent('SC_ERR_CONFLICT', `refusing to wipe ${TARGET_DEVICE}: the host runs from it`);
    if (boot.default === TARGET_DEVICE || boot.once === TARGET_DEVICE) {
      throw permanent('SC_ERR_CONFLICT', `refusing to wipe ${TARGET_DEVICE}: it is the ${boot.default === TARGET_DEVICE ? 'default' : 'one-shot'} boot entry`);
    }
    const k = await keptStore(ctx);
    await k.setInstalled(TARGET_DEVICE, null);
    await ctx.driver.wipe(TARGET_DEVICE);
    return { wiped: TARGET_DEVICE };
  },
};
