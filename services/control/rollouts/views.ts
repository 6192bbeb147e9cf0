/**
 * Owns what the API and metrics read of rollouts: a rollout's view (copies, never live state),
 * one rollout with its hosts and failed jobs' logs, the list, what control does with a host, and
 * the counters.
 */
import { stepBaseId } from '../../../shared/protocol/index.js';
import type { Redis } from 'ioredis';
import { scError } from '../../../shared/errors.js';
import { jobLogTail } from '../queues.js';
import { type ActiveRollout, type Counts, emptyCounts, type HostState, type HostWork, rescueOpen, type RolloutSpec, type RolloutView, TERMINAL_HOST } from './model.js';
import type { RolloutStore } from './store.js';

/** One frozen copy per rollout spec (see `viewOf`). */
const specCopies = new WeakMap<RolloutSpec, RolloutSpec>();

function frozen<T>(v: T): T {
  if (v && typeof v === 'object') {
    for (const x of Object.values(v)) frozen(x);
    Object.freeze(v);
  }
  return v;
}

/**
 * A copy of an active rollout as the API returns it (counts fresh; hosts only `withHosts`).
 * A spec never changes after its rollout is created, so every view shares one frozen copy of it
 * instead of cloning its waves (10,000 host ids in a large rollout) for each request.
 */
export function viewOf(a: ActiveRollout, withHosts: boolean): RolloutView {
  let spec = specCopies.get(a.spec);
  if (!spec) {
    spec = frozen(structuredClone(a.spec));
    specCopies.set(a.spec, spec);
  }
  const status = { ...a.status, counts: a.hosts.counts() };
  return { spec, ...structuredClone({ status, preheat: a.preheat, ...(withHosts ? { hosts: [...a.hosts.values()] } : {}) }) };
}

/**
 * One rollout with its hosts (in wave order). With `logs`, failed hosts carry the BullMQ log
 * tail of their failed step (`jobLog`). SC_ERR_NOT_FOUND when unknown.
 */
export async function getRollout(
  store: RolloutStore,
  jobs: { redis: Redis; prefix: string },
  id: string,
  opts: { logs?: boolean } = {},
): Promise<RolloutView & { hosts: HostState[] }> {
  let v: RolloutView & { hosts: HostState[] };
  const a = store.active.get(id);
  if (a) v = viewOf(a, true) as RolloutView & { hosts: HostState[] };
  else {
    if (!/^r-[a-z0-9-]{1,60}$/.test(id)) throw scError('SC_ERR_NOT_FOUND', 'no such rollout');
    const r = await store.read(id);
    if (!r) throw scError('SC_ERR_NOT_FOUND', `no rollout ${id}`);
    const order = new Map(r.spec.waves.flat().map((h, i) => [h, i]));
    r.hosts.sort((x, y) => (order.get(x.host) ?? 0) - (order.get(y.host) ?? 0));
    v = r;
  }
  if (opts.logs) {
    await Promise.all(
      v.hosts
        .filter((h) => h.error)
        .map(async (h) => {
          h.jobLog = await jobLogTail(jobs.redis, jobs.prefix, h.host, stepBaseId(id, h.error!.seq, h.error!.step)).catch(() => []);
        }),
    );
  }
  return v;
}

/** Rollouts, newest first (at most `limit`, capped at 500), without hosts. */
export async function listRollouts(store: RolloutStore, limit = 50): Promise<RolloutView[]> {
  const ids = await store.rolloutIds(limit);
  const out: RolloutView[] = [];
  for (const id of ids) {
    const a = store.active.get(id);
    if (a) {
      out.push(viewOf(a, false));
      continue;
    }
    const r = await store.readSummary(id);
    if (r) out.push(r);
  }
  return out;
}

/** What control is doing with a host right now (active rollout, its rescue, or operation), if anything. */
export function workOf(store: RolloutStore, host: string): HostWork | null {
  for (const a of store.active.values()) {
    const h = a.hosts.get(host);
    if (h && (!TERMINAL_HOST.includes(h.status) || rescueOpen(h))) {
      return { kind: 'rollout', id: a.spec.id, status: h.rescue && TERMINAL_HOST.includes(h.status) ? `rescue-${h.rescue.state}` : h.status, step: h.step };
    }
  }
  for (const op of store.ops.values()) if (op.host === host) return { kind: 'op', id: op.id, status: op.status, step: op.step };
  return null;
}

/** Hosts held by an active rollout (not yet terminal, or being rescued) or an active operation, with the holder's id. */
export function heldHosts(store: RolloutStore): Map<string, string> {
  const m = new Map<string, string>();
  for (const a of store.active.values()) {
    for (const h of a.hosts.values()) {
      if (!TERMINAL_HOST.includes(h.status) || rescueOpen(h)) m.set(h.host, a.spec.id);
    }
  }
  for (const op of store.ops.values()) m.set(op.host, op.id);
  return m;
}

/** Hosts of active rollouts by status (summed over rollouts). */
export function activeHostCounts(store: RolloutStore): Counts {
  const hosts = emptyCounts();
  for (const a of store.active.values()) {
    const c = a.hosts.counts();
    for (const k of Object.keys(hosts) as (keyof Counts)[]) hosts[k] += c[k];
  }
  return hosts;
}
