/**
 * Step 6, `boot-base`: a one-shot boot entry for disk2p1, then reboot. The step completes only
 * when the agent comes back running B from disk2p1 on the same IP. If B does not come up, the
 * firmware consumes the one-shot entry and falls back to the default entry (still A on
 * disk1p1), and the step fails with SC_ERR_BOOT_FAILED, leaving the host on A exactly as it
 * was before this step (disk 2 stays prepared; nothing on disk 1 changed).
 *
 * Effect check: running from disk2p1 the OS installed there, with the carried IP.
 */
import { BASE_DEVICE } from '../bundles.js';
import { bootInto, carried, identityProblem, keptStore, runningInstalledProblem } from './common.js';
import type { Step, StepContext } from './step.js';

async function problem(ctx: StepContext): Promise<string | null> {
  return (await runningInstalledProblem(ctx, BASE_DEVICE)) ?? (await identityProblem(ctx, await carried(await keptStore(ctx)), false));
}

/** Step 6: boot B once; done when B runs from disk2p1 on the same IP. */
export const bootBaseStep: Step = {
  name: 'boot-base',
  timeoutMs: 30 * 60_000,
  async check(ctx) {
    const running = await ctx.driver.running();
    if (running.device !== BASE_DEVICE || (await problem(ctx))) return null;
    const k = await keptStore(ctx);
    if (await k.readBootAttempt()) return null; // let apply clear it
    return `running ${running.id} ${running.version} from ${BASE_DEVICE}`;
  },
  async apply(ctx) {
    const k = await keptStore(ctx);
    await carried(k); // the config must have been captured: never boot B without it
    const r = await bootInto(ctx, k, { device: BASE_DEVICE, verify: problem });
    return { ...r, running: await ctx.driver.running() };
  },
};
