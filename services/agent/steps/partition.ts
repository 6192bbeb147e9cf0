/**
 * Step 2, `partition`: lay out disk 2: p1 for the base / rescue OS B, p2 for the kept bundles
 * and the agent's state; then a filesystem on p2 (p1 is formatted by install-base right before
 * it unpacks, so a half-unpacked tree never survives a re-run).
 *
 * Effect check: disk 2 has exactly this layout and p2 has a filesystem.
 * Failure leaves: disk 2 partitioned or not, maybe without a filesystem on p2; OS A untouched
 * and still the default boot entry.
 */
import type { PartitionSpec } from '../machine/driver.js';
import { KEPT_DEVICE } from '../bundles.js';
import type { Step } from './step.js';

/** Disk 2's layout: B's root (8 GiB), the kept store (the rest). */
export const DISK2_LAYOUT: PartitionSpec[] = [
  { name: 'p1', role: 'rescue-root', sizeMiB: 8192 },
  { name: 'p2', role: 'bundle-store' },
];

/** Step 2: disk 2 laid out, with a filesystem on p2. */
export const partitionStep: Step = {
  name: 'partition',
  timeoutMs: 15 * 60_000,
  async check(ctx) {
    const disk2 = (await ctx.driver.disks()).find((d) => d.name === 'disk2');
    const p = disk2?.partitions ?? [];
    const same = p.length === DISK2_LAYOUT.length && DISK2_LAYOUT.every((w, i) => p[i].name === w.name && p[i].role === w.role);
    return same && p[1].filesystem ? 'disk2 is already laid out' : null;
  },
  async apply(ctx) {
    const { changed } = await ctx.driver.partition('disk2', DISK2_LAYOUT);
    await ctx.driver.mkfs(KEPT_DEVICE);
    return { changed, layout: DISK2_LAYOUT };
  },
};
