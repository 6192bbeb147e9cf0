// What the dashboard knows of the fleet, and the reads that fill it (without rendering).

import { getJson } from './api.js';
import { PageError } from './page.js';

export const FINISHED = ['aborted', 'completed', 'failed'];
/** Host operations fetched (the newest; the latest per host colours its tile). */
const OPS_FETCHED = 500;

export const state = {
  hosts: [],
  colos: [],
  rollouts: [],
  details: new Map(),
  ops: [],
  audit: [],
  /** Per host: its place in the newest rollout (of those whose details were read) that has it. */
  lastRollout: new Map(),
  /** Per host: its newest host operation (of those read). */
  lastOp: new Map(),
  /** The colo drilled into (`#colo=NAME[&state=S]` in the address), with an optional state filter. */
  drill: null,
  showAll: false,
};

/** Reads rollouts (without rendering): the 10 newest, with details of the active ones and the 5 newest. */
export async function loadRollouts() {
  const { rollouts } = await getJson('/v1/rollouts?limit=10');
  const want = rollouts.filter((r, i) => i < 5 || !FINISHED.includes(r.status.state));
  const details = await Promise.all(
    want.map((r) =>
      getJson(`/v1/rollouts/${encodeURIComponent(r.spec.id)}`).catch((err) => {
        // A rollout gone meanwhile is skipped; anything else is the page's problem.
        if (err instanceof PageError && err.kind === 'http') return null;
        throw err;
      }),
    ),
  );
  state.rollouts = rollouts;
  state.details = new Map(details.filter(Boolean).map((d) => [d.spec.id, d]));
  const last = new Map();
  for (const r of rollouts) {
    const d = state.details.get(r.spec.id);
    for (const h of d?.hosts ?? []) if (!last.has(h.host)) last.set(h.host, { id: r.spec.id, createdAt: r.spec.createdAt, h });
  }
  state.lastRollout = last;
}

export async function loadOps() {
  const { ops } = await getJson(`/v1/ops?limit=${OPS_FETCHED}`);
  state.ops = ops;
  const last = new Map();
  for (const op of ops) if (!last.has(op.host)) last.set(op.host, op);
  state.lastOp = last;
}

export async function loadInventory() {
  const [h, c] = await Promise.all([getJson('/v1/hosts'), getJson('/v1/colos')]);
  state.hosts = h.hosts;
  state.colos = c.colos;
}
