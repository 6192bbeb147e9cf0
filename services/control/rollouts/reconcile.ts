/**
 * Owns keeping BullMQ and a rollout's persisted state in step: enqueueing the sequences of hosts
 * marked `queued` and of queued rescues (intents persisted first; job ids are deterministic, so
 * enqueueing twice adds nothing), and the backstop that settles in-flight hosts from BullMQ's own
 * job records when their reports were lost (e.g. with a Redis crash).
 */
import type { Redis } from 'ioredis';
import { type AgentProducer, CONVERT_STEPS, readRoutes, rescueSequence, type SequenceStep, stepBaseId } from '../../../shared/protocol/index.js';
import { failureOf } from '../../../shared/protocol/index.js';
import { type JobOutcome, jobOutcomes } from '../queues.js';
import { failHost, withLogLine } from './host-reducer.js';
import { type ActiveRollout, type HostState, IN_FLIGHT_HOST, enqueuedRoute, type JobRoute, jobRoute, LAST_SEQ, rescueOpen, rescueRunId, type RolloutSpec } from './model.js';
import type { RolloutStore } from './store.js';

/** At most one reconcile pass per rollout per this long (ms). */
export const RECONCILE_MS = 2000;
/**
 * A host without news for this long (ms) is looked up in BullMQ. Longer than two of the agents'
 * progress intervals (5 s), so that a host busy in a long step, whose progress reports keep
 * coming, is never looked up: the lookups are for hosts that fell silent.
 */
export const RECONCILE_QUIET_MS = 12_000;
/** The longest time (ms) between two lookups of a host that stays quiet (see `reconcileDue`). */
export const RECONCILE_MAX_MS = 30_000;

/** What enqueueing and reconcile need. */
export interface ReconcileDeps {
  redis: Redis;
  prefix: string;
  producer: AgentProducer;
  /** TTL of the signed step jobs (ms). */
  jobTtlMs: number;
  now: () => number;
}

/** The signed conversion sequence of a rollout's hosts. */
export function convertSteps(spec: Pick<RolloutSpec, 'base' | 'target'>): SequenceStep[] {
  return CONVERT_STEPS.map((step) => ({ step, args: { base: spec.base, target: spec.target } }));
}

/** Carries out the persisted intents: enqueues the sequences of queued hosts and of queued rescues. */
export async function enqueuePending(a: ActiveRollout, deps: ReconcileDeps, store: RolloutStore): Promise<void> {
  const ttlMs = deps.jobTtlMs;
  const todo: Promise<void>[] = [];
  const update = (id: string, change: (h: HostState) => HostState) => {
    a.hosts.set(id, change(a.hosts.get(id)!));
    store.touchHost(a, id);
  };
  const due = a.hosts.due();
  if (due.length === 0) return;
  // Every due host's route in one lookup, instead of one per enqueued sequence.
  const routes = await readRoutes(deps.redis, deps.prefix, due.map((h) => h.host));
  for (const h of due) {
    const id = h.host;
    const route = routes.get(id)!;
    // Remembered with `enqueued`: later lookups of these jobs go to this queue (jobOutcomes).
    const queued = jobRoute(route);
    if (h.status === 'queued' && !h.enqueued) {
      todo.push(
        deps.producer.enqueueSequence(id, a.spec.id, convertSteps(a.spec), { ttlMs, now: deps.now(), route }).then(() => {
          update(id, (cur) => ({ ...cur, enqueued: true, route: queued }));
        }),
      );
    }
    if (h.rescue && h.rescue.state === 'queued' && !h.rescue.enqueued) {
      todo.push(
        deps.producer.enqueueSequence(id, rescueRunId(a.spec.id), rescueSequence(), { ttlMs, now: deps.now(), route }).then(() => {
          const now = deps.now();
          const line = { host: id, rollout: a.spec.id, seq: 0, step: 'rescue', event: 'queued', ts: now };
          update(id, (cur) => ({ ...cur, rescue: { ...cur.rescue!, enqueued: true, route: queued }, log: withLogLine(cur.log, line, now) }));
        }),
      );
    }
    if (todo.length >= 50) await Promise.all(todo.splice(0));
  }
  await Promise.all(todo);
}

/**
 * What BullMQ's records say about a host: `cur` is the job of its current step (of its rescue,
 * for a host that is no longer in flight) and `last` the job of its last conversion step. Pure:
 * returns the host as it should be, or `h` itself when the records say nothing new.
 */
export function settleHost(h: HostState, cur: JobOutcome, last: JobOutcome, now: number): HostState {
  if (!IN_FLIGHT_HOST.includes(h.status)) {
    if (!h.rescue) return h;
    if (cur.state === 'completed' && cur.byHost) return { ...h, rescue: { ...h.rescue, state: 'done' } };
    if (cur.state === 'failed') return { ...h, rescue: { ...h.rescue, state: 'failed', error: cur.failedReason?.slice(0, 500) } };
    return h;
  }
  const seq = h.status === 'queued' ? 0 : h.seq;
  if (last.state === 'completed' && last.byHost) {
    return { ...h, status: 'converted', finishedAt: now, step: CONVERT_STEPS[LAST_SEQ], seq: LAST_SEQ };
  }
  if (cur.state === 'failed') {
    const code = failureOf(cur.failedReason)?.code ?? 'SC_ERR_STEP_FAILED';
    return failHost(h, { step: CONVERT_STEPS[seq], seq, code, message: cur.failedReason ?? 'step failed', ts: now });
  }
  if (cur.state === 'completed' && cur.byHost && seq < LAST_SEQ) {
    // The next step's reports were lost: move the cursor on; the next pass looks at it.
    return {
      ...h,
      steps: { ...h.steps, [CONVERT_STEPS[seq]]: { ...h.steps[CONVERT_STEPS[seq]], state: 'completed' } },
      status: 'running',
      seq: seq + 1,
      step: CONVERT_STEPS[seq + 1],
    };
  }
  return h;
}

/**
 * Whether a host quiet since `since` (its last report, or when it was queued) is due for a
 * lookup at `now`, given when it was last looked up (`checkedAt`, if since then). A host is first
 * looked up RECONCILE_QUIET_MS into its silence, then again whenever the time since its last
 * lookup reaches half its silence (at most RECONCILE_MAX_MS), so the lookups double apart (12,
 * 24, 48 s…): a silent minute costs three lookups. A lost report is noticed no later than the
 * host's silence when it was lost (at least RECONCILE_QUIET_MS), and never more than
 * RECONCILE_MAX_MS late. Pure.
 */
export function reconcileDue(since: number, checkedAt: number | undefined, now: number): boolean {
  const quiet = now - since;
  if (quiet < RECONCILE_QUIET_MS) return false;
  if (checkedAt === undefined || checkedAt < since) return true;
  return now - checkedAt >= Math.min(RECONCILE_MAX_MS, quiet / 2);
}

/**
 * The backstop: at most every RECONCILE_MS, for hosts in flight (or being rescued) whose silence
 * makes them due (`reconcileDue`), reads BullMQ's record of their current and last step in one
 * round trip and settles what a lost report would have told.
 */
export async function reconcileRollout(a: ActiveRollout, now: number, deps: ReconcileDeps, store: RolloutStore): Promise<void> {
  if (now - a.lastReconcile < RECONCILE_MS) return;
  a.lastReconcile = now;
  const hs = [...a.hosts.working()].filter(
    (h) =>
      ((IN_FLIGHT_HOST.includes(h.status) && h.enqueued) || (h.rescue?.enqueued && rescueOpen(h))) &&
      reconcileDue(h.lastEventAt ?? h.queuedAt ?? 0, a.reconciledAt.get(h.host), now),
  );
  if (hs.length === 0) return;
  for (const h of hs) a.reconciledAt.set(h.host, now);
  const jobs: { host: string; jobId: string; route?: JobRoute }[] = [];
  for (const h of hs) {
    if (IN_FLIGHT_HOST.includes(h.status)) {
      const seq = h.status === 'queued' ? 0 : h.seq;
      const route = enqueuedRoute(h);
      jobs.push({ host: h.host, jobId: stepBaseId(a.spec.id, seq, CONVERT_STEPS[seq]), route });
      jobs.push({ host: h.host, jobId: stepBaseId(a.spec.id, LAST_SEQ, CONVERT_STEPS[LAST_SEQ]), route });
    } else {
      const route = enqueuedRoute(h.rescue);
      jobs.push({ host: h.host, jobId: stepBaseId(rescueRunId(a.spec.id), 0, 'rescue'), route });
      jobs.push({ host: h.host, jobId: stepBaseId(rescueRunId(a.spec.id), 0, 'rescue'), route });
    }
  }
  const out = await jobOutcomes(deps.redis, deps.prefix, jobs);
  hs.forEach((h, i) => {
    const next = settleHost(h, out[i * 2], out[i * 2 + 1], now);
    if (next === h) return;
    a.hosts.set(h.host, next);
    store.touchHost(a, h.host);
  });
}
