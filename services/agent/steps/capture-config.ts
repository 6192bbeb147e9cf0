/**
 * Step 4, `capture-config`: record the running OS A's network configuration (addresses,
 * gateway, DNS, MAC, NIC name, hostname) and security data (ssh host keys, root's
 * authorized_keys, access-control files) into disk2p2 `stagecoach/carry.json` (mode 0600: it
 * holds private host keys).
 *
 * Effect check: carry.json exists and is a valid carried configuration.
 * Failure leaves: no carry.json (or the previous complete one); nothing else changes.
 */
import { parseCarryConfig } from '../carry/index.js';
import { keptStore } from './common.js';
import type { Step } from './step.js';

/** Step 4: A's configuration, recorded on disk2p2. */
export const captureConfigStep: Step = {
  name: 'capture-config',
  timeoutMs: 10 * 60_000,
  async check(ctx) {
    const raw = await (await keptStore(ctx)).readCarry();
    if (raw === null) return null;
    try {
      parseCarryConfig(raw);
      return 'the configuration was already captured';
    } catch {
      return null;
    }
  },
  async apply(ctx) {
    const k = await keptStore(ctx);
    const running = await ctx.driver.running();
    const cfg = await ctx.driver.captureConfig();
    await k.writeCarry(cfg);
    return {
      from: running,
      hostname: cfg.hostname,
      interfaces: cfg.interfaces.map((i) => ({ name: i.name, mac: i.mac, addresses: i.addresses })),
      hostKeys: cfg.hostKeys.map((h) => h.type),
      acl: cfg.acl.map((a) => a.path),
    };
  },
};
