/**
 * Step 3, `install-base`: copy the packed B and C bundles (and their manifests) from the
 * running OS's state dir onto disk2p2, where they stay (rescue and reinstall need no network);
 * and unpack B onto disk2p1 from that kept copy.
 *
 * One pass over B: the unpack follows the copy of B while it is written (decrypt and decompress
 * in a worker, untar here), and C is copied while B is still unpacking. The copy is
 * sha256-checked against the signed manifest while it is written, and B counts as installed
 * only once that check passed (installBundle); a kept copy from an earlier run is checked in
 * the pass that unpacks it. Small bundles (unpacked in this thread) are copied, then unpacked.
 *
 * Effect check: both bundles kept on disk2p2, and disk2p1 holds B completely (driver marker
 * and the kept `installed.json` record agree).
 * Failure leaves: possibly partial copies (`.partial`, redone) and a wiped disk2p1 that no boot
 * entry points at; OS A untouched and still the default.
 */
import { closeSync, openSync } from 'node:fs';
import { unpacksInWorker, WriteMark } from '../../../shared/bundle/unpack-file.js';
import type { Manifest } from '../../../shared/manifest.js';
import { type BundleRef, refString } from '../../../shared/protocol/index.js';
import { BASE_DEVICE, stateBundles } from '../bundles.js';
import { baseArg, installBundle, installedHere, keptStore, permanent, targetArg } from './common.js';
import type { Step, StepContext } from './step.js';

async function refs(ctx: StepContext) {
  const base = baseArg(ctx);
  const target = targetArg(ctx);
  if (!target) throw permanent('SC_ERR_BAD_REQUEST', 'job has no target bundle');
  return { base, target };
}

const same = (a: BundleRef, b: BundleRef) => a.name === b.name && a.version === b.version;

/** Step 3: keep B and C on disk2p2, unpack B onto disk2p1. */
export const installBaseStep: Step = {
  name: 'install-base',
  timeoutMs: 3 * 3600_000,
  async check(ctx) {
    const { base, target } = await refs(ctx);
    const k = await keptStore(ctx);
    const b = await k.bundles.find(base, ctx.trusted);
    if (!b || !(await k.bundles.find(target, ctx.trusted))) return null;
    const kept = await k.readKept();
    if (kept.base?.name !== base.name || kept.base?.version !== base.version) return null;
    return (await installedHere(ctx, k, BASE_DEVICE, b)) ? `${refString(base)} is installed on ${BASE_DEVICE} and both bundles are kept` : null;
  },
  async apply(ctx) {
    const { base, target } = await refs(ctx);
    const k = await keptStore(ctx);
    const state = await stateBundles(ctx.driver);
    const toCopy: Manifest[] = [];
    for (const ref of [base, target]) {
      if (await k.bundles.find(ref, ctx.trusted)) continue;
      const m = await state.find(ref, ctx.trusted);
      if (!m) throw permanent('SC_ERR_CONFLICT', `${refString(ref)} is not in the state dir (fetch has not run)`);
      toCopy.push(m);
    }
    const b = toCopy.find((m) => same(m, base)) ?? (await k.bundles.find(base, ctx.trusted))!;
    const install = !(await installedHere(ctx, k, BASE_DEVICE, b));
    // B's unpack follows its copy when both are to do and the worker unpacks it.
    const follow = install && toCopy.some((m) => same(m, base)) && unpacksInWorker(b.blob, ctx.unpackWorkerMinBytes) ? new WriteMark() : null;

    // Progress: the bytes copied plus the bytes of B unpacked, of all there is to do.
    const total = toCopy.reduce((t, m) => t + m.blob.size, 0) + (install ? b.blob.size : 0);
    let copiedBytes = 0;
    let unpackedBytes = 0;
    const report = () => ctx.progress({ bytes: copiedBytes + unpackedBytes, total });

    const stop = new AbortController();
    const signal = AbortSignal.any([ctx.signal, stop.signal]);
    // B's partial copy, opened for reading the moment it exists (the copy renames it when done).
    let partialOfB: (path: string) => void = () => {};
    const bStarted = new Promise<number>((resolve, reject) => {
      partialOfB = (path) => {
        try {
          resolve(openSync(path, 'r'));
        } catch (err) {
          reject(err);
        }
      };
    });
    let bCopied: Promise<unknown> = Promise.resolve();
    const copied: string[] = [];
    const copying = (async () => {
      let before = 0;
      for (const m of toCopy) {
        await ctx.log(`keeping ${refString(m)} on disk2p2 (${m.blob.size} bytes)`);
        const isB = follow !== null && same(m, base);
        const copy = k.bundles.copyFrom(state, m, ctx.trusted, {
          onBytes: (n) => {
            copiedBytes = before + n;
            report();
          },
          signal,
          mark: isB ? follow : undefined,
          onStart: isB ? partialOfB : undefined,
        });
        if (isB) {
          bCopied = copy;
          // B's copy failing stops B's unpack; C's does not (B's tree stays good, and is kept).
          copy.catch(() => stop.abort());
        }
        await copy;
        before += m.blob.size;
        copied.push(refString(m));
      }
      await k.writeKept({ base, target });
    })();
    const unpacking = (async () => {
      if (!install) return 0;
      const progress = (n: number) => {
        unpackedBytes = n;
        report();
      };
      const opts = { hookPoint: 'install-base:mid', signal, progress };
      // Started once the copy of B has its partial file (null: the copy found B's blob already
      // there and wrote nothing, or there is no copy to follow); stopped if the copy fails first.
      const fd = follow ? await Promise.race([bStarted, copying.then(() => null)]) : null;
      if (follow && fd !== null) {
        try {
          await ctx.log(`unpacking ${refString(base)} onto ${BASE_DEVICE} while it is kept`);
          return (await installBundle(ctx, k, k.bundles, b, BASE_DEVICE, { ...opts, follow: { file: fd, mark: follow, verifiedBy: bCopied } })).entries;
        } finally {
          closeSync(fd);
        }
      }
      await copying;
      await ctx.log(`unpacking ${refString(base)} onto ${BASE_DEVICE}`);
      return (await installBundle(ctx, k, k.bundles, b, BASE_DEVICE, opts)).entries;
    })();
    // A failed copy's error is the step's (an unpack that B's failed copy stopped only echoes
    // it). A failed unpack lets the copies finish: the copy's digest check says whether B's bytes
    // were the cause.
    const [c, u] = await Promise.allSettled([copying, unpacking]);
    if (c.status === 'rejected') throw c.reason;
    if (u.status === 'rejected') throw u.reason;
    return { kept: [refString(base), refString(target)], copied, device: BASE_DEVICE, entries: u.value };
  },
};
