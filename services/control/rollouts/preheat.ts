/**
 * Owns preheat: asking each colo's configured stages to fetch a rollout's B and C blobs before
 * the colo's hosts start, following their fills, and giving up on a colo after the timeout.
 * Progress lives in the rollout's `preheat` record (one entry per colo, persisted with it).
 */
import { StageClient } from '../../stage/client.js';
import type { Inventory } from '../inventory.js';
import type { ActiveRollout, PreheatColo } from './model.js';

/** What preheat needs. */
export interface PreheatDeps {
  inventory: Inventory;
  /** The token stages take for prefetch; null: preheat is skipped. */
  stageToken: string | null;
  /** The engine's tick (ms): stages are polled at most every max(tickMs, 250) ms. */
  tickMs: number;
  /** A colo still filling after this long (ms) is given up (`timeout`). */
  preheatTimeoutMs: number;
}

/**
 * Starts and follows the preheat of `colos` (of wave `wave`) for rollout `a`, in `a.preheat`.
 * Returns `changed` when the rollout's preheat record must be persisted, and `settled` once
 * no colo of the list is still filling. Stage errors are recorded, never thrown.
 */
export async function runPreheat(a: ActiveRollout, wave: number, colos: string[], now: number, deps: PreheatDeps): Promise<{ settled: boolean; changed: boolean }> {
  const digests = [a.spec.blobs.base, a.spec.blobs.target];
  const token = deps.stageToken;
  let changed = false;
  // New colos of this wave start their prefetches concurrently (a dead stage costs one timeout).
  const fresh = colos.filter((c) => !a.preheat[c]);
  const started = await Promise.all(
    fresh.map(async (colo): Promise<PreheatColo> => {
      // Only the stages control's own configuration names: never a URL a host registered.
      const stages = deps.inventory.stagesOf(colo);
      const p: PreheatColo = { colo, wave, state: 'filling', startedAt: now, finishedAt: null, stages: [] };
      if (!token) return { ...p, state: 'skipped', reason: 'no stage token configured', finishedAt: now };
      if (stages.length === 0) return { ...p, state: 'skipped', reason: 'no stage configured for this colo (--stages)', finishedAt: now };
      p.stages = await Promise.all(
        stages.map(async (url) => {
          const st: PreheatColo['stages'][number] = { url, state: 'filling', digests: {} };
          try {
            const r = await new StageClient(url, { timeoutMs: 5000 }).prefetch(digests, token);
            for (const f of r.fills) st.digests[f.digest] = { state: f.state };
          } catch (err) {
            st.state = 'failed';
            st.error = `${(err as { code?: string }).code ?? 'error'}: ${(err as Error).message}`.slice(0, 300);
          }
          return st;
        }),
      );
      return p;
    }),
  );
  for (const p of started) a.preheat[p.colo] = p;
  if (started.length > 0) {
    changed = true;
    a.lastPreheatPoll = now;
  }
  const open = colos.map((c) => a.preheat[c]).filter((p) => p.state === 'filling');
  if (open.length > 0 && now - a.lastPreheatPoll >= Math.max(deps.tickMs, 250)) {
    a.lastPreheatPoll = now;
    await Promise.all(open.map((p) => pollColo(p, digests, now, deps)));
    changed = true;
  }
  for (const p of open) {
    if (p.state === 'filling' && now - p.startedAt > deps.preheatTimeoutMs) {
      p.state = 'timeout';
      p.finishedAt = now;
    }
  }
  return { settled: colos.every((c) => a.preheat[c].state !== 'filling'), changed };
}

/** Asks each filling stage of the colo how its fills go, and settles stages and the colo. */
async function pollColo(p: PreheatColo, digests: string[], now: number, deps: PreheatDeps): Promise<void> {
  // A preheat state restored from Redis may name a stage that is no longer configured: it is
  // given up, never contacted.
  for (const s of p.stages) {
    if (s.state === 'filling' && !deps.inventory.isConfiguredStage(p.colo, s.url)) {
      s.state = 'failed';
      s.error = 'not a configured stage of this colo (--stages): not contacted';
    }
  }
  await Promise.all(
    p.stages
      .filter((s) => s.state === 'filling')
      .map(async (s) => {
        const client = new StageClient(s.url, { timeoutMs: 5000 });
        try {
          const fills = await client.fills();
          for (const d of digests) {
            const f = fills.find((x) => x.digest === d);
            if (f) s.digests[d] = { state: f.state, bytes: f.bytes, size: f.size };
            else if (s.digests[d]?.state !== 'committed') {
              // Not (or no longer) listed: ask again; a cached blob answers `committed`.
              const r = await client.prefetch([d], deps.stageToken!);
              s.digests[d] = { state: r.fills[0]?.state ?? 'filling' };
            }
          }
        } catch (err) {
          s.error = `${(err as { code?: string }).code ?? 'error'}: ${(err as Error).message}`.slice(0, 300);
        }
        const states = digests.map((d) => s.digests[d]?.state);
        if (states.every((x) => x === 'committed')) s.state = 'done';
        else if (states.every((x) => x === 'committed' || x === 'failed' || x === 'gone')) s.state = 'failed';
      }),
  );
  if (p.stages.every((s) => s.state !== 'filling')) {
    p.state = p.stages.every((s) => s.state === 'done') ? 'done' : 'failed';
    p.finishedAt = now;
  }
}
