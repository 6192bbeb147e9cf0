/**
 * Owns host operations outside rollouts (rescue, reinstall, install another OS): their step
 * sequences, a new operation's record, enqueueing it and settling it from BullMQ's job records,
 * and reading operations back. Report handling is host-reducer.ts applyOpReport.
 */
import type { Redis } from 'ioredis';
import {
  type AgentProducer,
  type BundleRef,
  failureOf,
  installOtherSequence,
  readRoutes,
  reinstallSequence,
  rescueSequence,
  type SequenceStep,
  refString,
  stepBaseId,
} from '../../../shared/protocol/index.js';
import { scError } from '../../../shared/errors.js';
import { parseRef } from '../../../shared/names.js';
import { type JobOutcome, jobOutcomes } from '../queues.js';
import { failOp, opFinished } from './host-reducer.js';
import { type HostOp, jobRoute } from './model.js';
import type { RolloutStore } from './store.js';

/** What following an operation needs. */
export interface HostOpDeps {
  redis: Redis;
  prefix: string;
  producer: AgentProducer;
  /** TTL of the signed step jobs (ms). */
  jobTtlMs: number;
  now: () => number;
}

/** The sequence an operation runs. */
export function opSteps(op: Pick<HostOp, 'kind' | 'bundle'>): SequenceStep[] {
  if (op.kind === 'rescue') return rescueSequence();
  if (op.kind === 'reinstall') return reinstallSequence();
  return installOtherSequence(parseRef(op.bundle!));
}

/** A new, not yet enqueued operation `id` of `kind` on `host` (`bundle`: the target of an install). */
export function newOp(id: string, kind: HostOp['kind'], host: string, bundle: BundleRef | null, actor: string, now: number): HostOp {
  const op: HostOp = {
    id,
    kind,
    host,
    bundle: bundle ? refString(bundle) : null,
    createdAt: now,
    actor,
    status: 'queued',
    enqueued: false,
    steps: [],
    step: null,
    seq: 0,
    error: null,
    finishedAt: null,
    log: [],
  };
  op.steps = opSteps(op).map((s) => s.step);
  return op;
}

/**
 * What BullMQ's records say about an operation: `cur` is the job of its current step, `last`
 * of its last step. Pure: the operation as it should be, or `op` itself when nothing is new.
 */
export function settleOp(op: HostOp, cur: JobOutcome, last: JobOutcome, now: number): HostOp {
  if (last.state === 'completed' && last.byHost) return { ...op, status: 'done', finishedAt: now };
  if (cur.state === 'failed') {
    return failOp(op, { step: op.steps[op.seq], code: failureOf(cur.failedReason)?.code ?? 'SC_ERR_STEP_FAILED', message: cur.failedReason ?? 'step failed', ts: now });
  }
  return op;
}

/**
 * One pass over an active operation: enqueues its sequence if that has not happened yet,
 * else settles it from BullMQ. Changes go to `store` (replaced and marked).
 */
export async function tickOp(op: HostOp, deps: HostOpDeps, store: RolloutStore): Promise<void> {
  if (opFinished(op)) return;
  if (!op.enqueued) {
    const route = (await readRoutes(deps.redis, deps.prefix, [op.host])).get(op.host)!;
    await deps.producer.enqueueSequence(op.host, op.id, opSteps(op), { ttlMs: deps.jobTtlMs, now: deps.now(), route });
    // Remembered with `enqueued`: later lookups of these jobs go to this queue (jobOutcomes).
    store.ops.set(op.id, { ...op, enqueued: true, route: jobRoute(route) });
    store.touchOp(op.id);
    return;
  }
  const lastSeq = op.steps.length - 1;
  const [cur, last] = await jobOutcomes(deps.redis, deps.prefix, [
    { host: op.host, jobId: stepBaseId(op.id, op.seq, op.steps[op.seq]), route: op.route },
    { host: op.host, jobId: stepBaseId(op.id, lastSeq, op.steps[lastSeq]), route: op.route },
  ]);
  const next = settleOp(op, cur, last, deps.now());
  if (next === op) return;
  store.ops.set(op.id, next);
  store.touchOp(op.id);
}

/** One host operation (a copy), or SC_ERR_NOT_FOUND. */
export async function getOp(store: RolloutStore, id: string): Promise<HostOp> {
  const m = store.ops.get(id);
  if (m) return { ...m };
  if (!/^op-[a-z0-9-]{1,60}$/.test(id)) throw scError('SC_ERR_NOT_FOUND', 'no such operation');
  const op = await store.readOp(id);
  if (!op) throw scError('SC_ERR_NOT_FOUND', `no operation ${id}`);
  return op;
}

/** The newest host operations (newest first, at most `limit`, capped at 500), of every host or of `host`. */
export async function listOps(store: RolloutStore, limit = 50, host?: string): Promise<HostOp[]> {
  const ids = await store.opIds(limit, host);
  return Promise.all(ids.map((id) => getOp(store, id)));
}
