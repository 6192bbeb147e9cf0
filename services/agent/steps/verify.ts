/**
 * Step 11, `verify`: health checks of the converted host, then report it converted. Read-only,
 * so it is simply run again after a crash. Checks: the target runs from disk1p1 (the default
 * entry) and is the kept target; the rescue entry is B on disk2p1; the IP and every host key
 * are the carried ones; both kept bundles are on disk2p2.
 *
 * Failure leaves: nothing changed; the failure names the check that failed.
 */
import { refString } from '../../../shared/protocol/index.js';
import { TARGET_DEVICE, BASE_DEVICE } from '../bundles.js';
import { carried, identityProblem, keptStore, permanent, runningInstalledProblem } from './common.js';
import type { Step } from './step.js';

/** Step 11: health checks; reports the host converted. */
export const verifyStep: Step = {
  name: 'verify',
  timeoutMs: 10 * 60_000,
  async check() {
    return null;
  },
  async apply(ctx) {
    const k = await keptStore(ctx);
    const cfg = await carried(k);
    const fail = (msg: string) => permanent('SC_ERR_STEP_FAILED', `verify: ${msg}`);
    const running = await ctx.driver.running();
    const boot = await ctx.driver.bootConfig();
    if (running.device !== TARGET_DEVICE) throw fail(`the host runs from ${running.device}, not ${TARGET_DEVICE}`);
    if (boot.default !== TARGET_DEVICE) throw fail(`the default boot entry is ${boot.default}, not ${TARGET_DEVICE}`);
    if (boot.rescue !== BASE_DEVICE) throw fail(`the rescue entry is ${boot.rescue}, not ${BASE_DEVICE}`);
    const p = (await runningInstalledProblem(ctx, TARGET_DEVICE)) ?? (await identityProblem(ctx, cfg, true));
    if (p) throw fail(p);
    const rescue = await ctx.driver.installedOs(BASE_DEVICE);
    if (!rescue?.complete) throw fail(`${BASE_DEVICE} holds no complete rescue OS`);
    const kept = await k.readKept();
    for (const [role, ref] of Object.entries(kept)) {
      if (ref && !(await k.bundles.find(ref, ctx.trusted))) throw fail(`the kept ${role} bundle ${refString(ref)} is missing from disk2p2`);
    }
    const ins = await ctx.driver.inspect();
    return {
      converted: true,
      running,
      ip: ins.ip,
      hostKeyFingerprint: ins.hostKeyFingerprint,
      rescue: { device: BASE_DEVICE, id: rescue.id, version: rescue.version },
      kept: Object.fromEntries(Object.entries(kept).map(([r, ref]) => [r, ref ? refString(ref) : null])),
    };
  },
};
