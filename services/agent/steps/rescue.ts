/**
 * `rescue`: boot into the rescue OS B on disk2p1 (from C, or from a broken disk 1), and make it
 * the default entry so the host stays on B until told otherwise (reinstall, install-other).
 * The boot uses a one-shot entry first: if B does not come up, the firmware falls back to the
 * current default, and the step fails with SC_ERR_BOOT_FAILED.
 *
 * Effect check: running B from disk2p1, which is the default entry.
 * Failure leaves: the host where it was.
 */
import { BASE_DEVICE } from '../bundles.js';
import { bootInto, carried, identityProblem, keptStore, permanent, runningInstalledProblem } from './common.js';
import type { Step, StepContext } from './step.js';

async function problem(ctx: StepContext): Promise<string | null> {
  return (await runningInstalledProblem(ctx, BASE_DEVICE)) ?? (await identityProblem(ctx, await carried(await keptStore(ctx)), false));
}

/** Boot into the rescue OS B and keep it the default. */
export const rescueStep: Step = {
  name: 'rescue',
  timeoutMs: 30 * 60_000,
  async check(ctx) {
    const running = await ctx.driver.running();
    const b = await ctx.driver.bootConfig();
    if (running.device !== BASE_DEVICE || b.default !== BASE_DEVICE) return null;
    if (await (await keptStore(ctx)).readBootAttempt()) return null;
    return `running the rescue OS from ${BASE_DEVICE}, the default entry`;
  },
  async apply(ctx) {
    const k = await keptStore(ctx);
    const b = await ctx.driver.installedOs(BASE_DEVICE);
    if (!b?.complete) throw permanent('SC_ERR_CONFLICT', `${BASE_DEVICE} holds no complete rescue OS`);
    await carried(k);
    const r = await bootInto(ctx, k, { device: BASE_DEVICE, verify: problem });
    await ctx.driver.setRescueEntry(BASE_DEVICE);
    await ctx.driver.setDefault(BASE_DEVICE);
    return { ...r, default: BASE_DEVICE, running: await ctx.driver.running() };
  },
};
