/**
 * Step 7, `commit-base`: make disk2p1 (B) the default boot entry, and the rescue entry.
 *
 * POINT OF NO RETURN. Before this step the default entry is still OS A on disk1p1: any failure
 * or reboot brings the host back to A. From here on the host boots B by default, and the next
 * step wipes A, so the host can no longer fall back to A; a failure after this point leaves it
 * on B (the rescue OS), never on a half-written disk. Control enqueues the rescue sequence for
 * a host that fails after this step.
 *
 * Precondition: running B from disk2p1 (a base that never booted is never committed).
 * Effect check: default and rescue entries are disk2p1.
 * Failure leaves: the entries as they were (each write is atomic); B running.
 */
import { POINT_OF_NO_RETURN } from '../../../shared/protocol/index.js';
import { BASE_DEVICE } from '../bundles.js';
import { permanent, runningInstalledProblem } from './common.js';
import type { Step } from './step.js';

/** Step 7, the point of no return: B becomes the default and rescue entry. */
export const commitBaseStep: Step = {
  name: POINT_OF_NO_RETURN,
  timeoutMs: 10 * 60_000,
  async check(ctx) {
    const b = await ctx.driver.bootConfig();
    return b.default === BASE_DEVICE && b.rescue === BASE_DEVICE ? `${BASE_DEVICE} is already the default and rescue entry` : null;
  },
  async apply(ctx) {
    const running = await ctx.driver.running();
    if (running.device !== BASE_DEVICE) throw permanent('SC_ERR_CONFLICT', `refusing to commit ${BASE_DEVICE}: the host runs ${running.device}`);
    const problem = await runningInstalledProblem(ctx, BASE_DEVICE);
    if (problem) throw permanent('SC_ERR_CONFLICT', `refusing to commit ${BASE_DEVICE}: ${problem}`);
    await ctx.driver.setRescueEntry(BASE_DEVICE);
    await ctx.driver.setDefault(BASE_DEVICE);
    await ctx.log(`point of no return: ${BASE_DEVICE} (${running.id} ${running.version}) is the default boot entry`);
    return { default: BASE_DEVICE, rescue: BASE_DEVICE };
  },
};
