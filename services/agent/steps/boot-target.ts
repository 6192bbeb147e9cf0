/**
 * Step 10, `boot-target`: a one-shot boot entry for disk1p1, then reboot; once the target runs
 * from disk1p1 on the same IP with the same host keys, disk1p1 becomes the default entry (B
 * stays the rescue entry). If the target does not come up, the firmware falls back to the
 * default entry, B, and the step fails with SC_ERR_BOOT_FAILED: the host is left on the rescue
 * OS with the target still on disk1p1 for inspection.
 *
 * Effect check: running from disk1p1 the OS installed there, carried IP and host keys, default
 * entry disk1p1, rescue entry disk2p1.
 */
import { BASE_DEVICE, TARGET_DEVICE } from '../bundles.js';
import { bootInto, carried, identityProblem, keptStore, runningInstalledProblem } from './common.js';
import type { Step, StepContext } from './step.js';

async function problem(ctx: StepContext): Promise<string | null> {
  return (await runningInstalledProblem(ctx, TARGET_DEVICE)) ?? (await identityProblem(ctx, await carried(await keptStore(ctx)), true));
}

/** Step 10: boot the target once; on success it becomes the default entry. */
export const bootTargetStep: Step = {
  name: 'boot-target',
  timeoutMs: 30 * 60_000,
  async check(ctx) {
    const running = await ctx.driver.running();
    const b = await ctx.driver.bootConfig();
    if (running.device !== TARGET_DEVICE || b.default !== TARGET_DEVICE || b.rescue !== BASE_DEVICE) return null;
    if (await problem(ctx)) return null;
    if (await (await keptStore(ctx)).readBootAttempt()) return null;
    return `running ${running.id} ${running.version} from ${TARGET_DEVICE}, the default entry`;
  },
  async apply(ctx) {
    const k = await keptStore(ctx);
    await carried(k);
    const r = await bootInto(ctx, k, { device: TARGET_DEVICE, verify: problem });
    await ctx.driver.setRescueEntry(BASE_DEVICE);
    await ctx.driver.setDefault(TARGET_DEVICE);
    return { ...r, default: TARGET_DEVICE, rescue: BASE_DEVICE, running: await ctx.driver.running() };
  },
};
