/**
 * Step 9, `install-target`: unpack the target bundle (C; D after fetch-other; the kept target
 * on a reinstall) from disk2p2 onto disk1p1, and write the carried configuration into it in the
 * target's own network format. The kept bundle's digest is checked in the pass that unpacks it:
 * a bundle that fails is never marked installed, and disk1p1 is wiped again.
 *
 * Precondition: the host runs from disk2p1 (B), so disk 1 is free.
 * Effect check: disk1p1 holds this bundle completely (driver marker and installed.json agree;
 * both are written after the config).
 * Failure leaves: disk1p1 wiped or half-written, no boot entry pointing at it; the host on B.
 */
import { refString } from '../../../shared/protocol/index.js';
import { TARGET_DEVICE, BASE_DEVICE } from '../bundles.js';
import { carried, installBundle, installedHere, keptManifest, keptStore, permanent, targetRef } from './common.js';
import type { Step, StepContext } from './step.js';

async function what(ctx: StepContext) {
  const k = await keptStore(ctx);
  const ref = await targetRef(ctx, k);
  const m = await keptManifest(ctx, k, ref);
  return { k, ref, m };
}

/** Step 9: unpack the target onto disk1p1 with the carried configuration. */
export const installTargetStep: Step = {
  name: 'install-target',
  timeoutMs: 3 * 3600_000,
  async check(ctx) {
    const { k, ref, m } = await what(ctx);
    return (await installedHere(ctx, k, TARGET_DEVICE, m)) ? `${refString(ref)} is installed on ${TARGET_DEVICE}` : null;
  },
  async apply(ctx) {
    const { k, ref, m } = await what(ctx);
    const running = await ctx.driver.running();
    if (running.device !== BASE_DEVICE) throw permanent('SC_ERR_CONFLICT', `refusing to install onto ${TARGET_DEVICE}: the host runs ${running.device}, not the base OS on ${BASE_DEVICE}`);
    const cfg = await carried(k);
    await ctx.log(`unpacking ${refString(ref)} onto ${TARGET_DEVICE}`);
    const res = await installBundle(ctx, k, k.bundles, m, TARGET_DEVICE, {
      hookPoint: 'install-target:mid',
      afterUnpack: async () => {
        await ctx.driver.applyConfig(TARGET_DEVICE, cfg, m.os.netFormat);
      },
    });
    const kept = await k.readKept();
    if (kept.target?.name !== ref.name || kept.target?.version !== ref.version) await k.writeKept({ ...kept, target: ref });
    return { bundle: refString(ref), device: TARGET_DEVICE, entries: res.entries, netFormat: m.os.netFormat };
  },
};
