/**
 * Control's read side of the host queues. Rollout state comes from the agents' reports stream;
 * this module is the backstop that looks at BullMQ's own records of a host's step jobs
 * (completed/failed sets, failure reason, job logs) in one pipelined round trip for many hosts,
 * and keeps the bull-board view (read-only) of the known hosts' queues fresh.
 *
 * BullMQ key layout relied on (stable since BullMQ 1): queue `Q` under prefix `P` keeps
 * `P:Q:completed` and `P:Q:failed` (sorted sets of job ids), the job hash `P:Q:<jobId>`
 * (fields `failedReason`, and `pb`: the worker name that took it, BullMQ ≥ 5) and
 * `P:Q:<jobId>:logs` (list of log lines).
 */
import { createBullBoard } from '@bull-board/api';
import { BullMQAdapter } from '@bull-board/api/bullMQAdapter';
import { ExpressAdapter } from '@bull-board/express';
import { Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import {
  coloQueueName,
  hostLockToken,
  hostQueueName,
  readRoutes,
  relayLockToken,
  routedJobId,
  type Source,
  type StepRoute,
} from '../../shared/protocol/index.js';
import type { Logger } from '../../shared/log.js';
import type { JobRoute } from './rollouts/model.js';

/** What BullMQ says about one job. */
export interface JobOutcome {
  state: 'completed' | 'failed' | 'other';
  failedReason?: string;
  /**
   * True when the job was last taken under the lock token the host's route takes jobs with
   * (`agent:<host>` in its own queue, `relay:<colo>` in its colo's queue): BullMQ records the
   * taker's worker name as `processedBy`, and only the lock holder can complete or fail a job.
   */
  byHost: boolean;
}

/** The BullMQ job key (`P:<queue>:<id>`) of a step given by its route-independent id. */
function jobKey(prefix: string, route: { transport: 'direct' | 'relay'; queue: string }, host: string, baseId: string): { q: string; id: string } {
  return { q: `${prefix}:${route.queue}`, id: routedJobId(route, host, baseId) };
}

/**
 * Looks up the outcome of many jobs (route-independent ids). A job whose `route` is given (the
 * queue its sequence was put in) is looked up there; the others where their host's registration
 * routes it now (one more round trip, which asks every relay colo's host index).
 */
export async function jobOutcomes(redis: Redis, prefix: string, jobs: { host: string; jobId: string; route?: JobRoute }[]): Promise<JobOutcome[]> {
  if (jobs.length === 0) return [];
  const unrouted = jobs.filter((j) => !j.route).map((j) => j.host);
  const registered = unrouted.length ? await readRoutes(redis, prefix, unrouted) : new Map<string, StepRoute>();
  const routes = jobs.map((j) => j.route ?? registered.get(j.host)!);
  const pipe = redis.pipeline();
  jobs.forEach((j, i) => {
    const { q, id } = jobKey(prefix, routes[i], j.host, j.jobId);
    pipe.zscore(`${q}:completed`, id);
    pipe.zscore(`${q}:failed`, id);
    pipe.hmget(`${q}:${id}`, 'failedReason', 'pb');
  });
  const res = (await pipe.exec()) ?? [];
  return jobs.map((j, i) => {
    const [e1, done] = res[i * 3] ?? [];
    const [e2, failed] = res[i * 3 + 1] ?? [];
    const [, fields] = res[i * 3 + 2] ?? [];
    const [reason, pb] = Array.isArray(fields) ? (fields as (string | null)[]) : [null, null];
    const byHost = pb === routeLockToken(routes[i], j.host);
    if (e1 || e2) return { state: 'other', byHost: false };
    if (done !== null && done !== undefined) return { state: 'completed', byHost };
    if (failed !== null && failed !== undefined) return { state: 'failed', failedReason: reason ?? undefined, byHost };
    return { state: 'other', byHost };
  });
}

/** The lock token (and worker name) that takes `host`'s jobs on `route`. */
function routeLockToken(route: JobRoute, host: string): string {
  return route.transport === 'relay' ? relayLockToken(route.queue.slice('colo.'.length)) : hostLockToken(host);
}

/** The last `n` log lines a host's agent wrote for one job (BullMQ `job.log`). */
export async function jobLogTail(redis: Redis, prefix: string, host: string, jobId: string, n = 20): Promise<string[]> {
  const routes = await readRoutes(redis, prefix, [host]);
  const { q, id } = jobKey(prefix, routes.get(host)!, host, jobId);
  return redis.lrange(`${q}:${id}:logs`, -n, -1);
}


/**
 * bull-board mounted under a base path, showing the queues of the first `limit` known hosts in
 * read-only mode (no retry/clean/delete from the UI: writes go through the audited API). The
 * list is refreshed by `refresh(sources)`. Queues share control's non-blocking connection.
 */
export class Board {
  readonly adapter: ExpressAdapter;
  readonly #board: ReturnType<typeof createBullBoard>;
  readonly #queues = new Map<string, Queue>();
  readonly #redis: Redis;
  readonly #prefix: string;
  readonly #limit: number;
  readonly #log: Logger;

  constructor(opts: { redis: Redis; prefix: string; basePath: string; limit: number; log: Logger }) {
    this.#redis = opts.redis;
    this.#prefix = opts.prefix;
    this.#limit = opts.limit;
    this.#log = opts.log;
    this.adapter = new ExpressAdapter();
    this.adapter.setBasePath(opts.basePath);
    // @bull-board/express pins its own copy of @bull-board/api: the adapter is the same shape.
    const serverAdapter = this.adapter as unknown as Parameters<typeof createBullBoard>[0]['serverAdapter'];
    this.#board = createBullBoard({ queues: [], serverAdapter, options: { uiConfig: { boardTitle: 'stagecoach queues' } } });
  }

  /**
   * Shows the queues of the hosts whose record sources are given (readHostSources): the colo
   * queue of each relay's colo, then the host queues of direct hosts (sorted), at most `limit` in
   * all; closes queues no longer shown.
   */
  async refresh(sources: ReadonlyMap<string, Source>): Promise<void> {
    const colos = [...new Set([...sources.values()].flatMap((s) => (s.kind === 'relay' ? [s.colo] : [])))].sort();
    const direct = [...sources].flatMap(([host, s]) => (s.kind === 'host' ? [host] : [])).sort();
    const want: string[] = [];
    for (const c of colos) {
      try {
        want.push(coloQueueName(c));
      } catch {
        // a registration with a malformed colo names no queue
      }
    }
    for (const id of direct) {
      try {
        want.push(hostQueueName(id));
      } catch {
        // likewise
      }
    }
    const keep = new Set(want.slice(0, this.#limit));
    let changed = false;
    for (const [name, q] of this.#queues) {
      if (!keep.has(name)) {
        this.#queues.delete(name);
        changed = true;
        await q.close().catch(() => {});
      }
    }
    for (const name of keep) {
      if (this.#queues.has(name)) continue;
      const q = new Queue(name, { connection: this.#redis, prefix: this.#prefix });
      q.on('error', (err) => this.#log.debug({ err }, 'board queue error'));
      this.#queues.set(name, q);
      changed = true;
    }
    if (changed) this.#board.replaceQueues([...this.#queues.values()].map((q) => new BullMQAdapter(q, { readOnlyMode: true })));
  }

  /** Closes every queue (the shared connection stays open). */
  async close(): Promise<void> {
    const qs = [...this.#queues.values()];
    this.#queues.clear();
    await Promise.all(qs.map((q) => q.close().catch(() => {})));
  }
}
