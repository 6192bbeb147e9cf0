/**
 * The direct transport: the host consumes its own BullMQ queue (`host.<id>`) over Redis,
 * processed manually (a Worker without a processor: `getNextJob`, `extendLock`,
 * `moveToCompleted`, `moveToFailed`) with the stable lock token `agent:<hostId>`. See worker.ts
 * for why a step interrupted by a reboot runs again and a finished one never does. Connections:
 * the given one (shared by the Worker's commands, the Queue and presence) plus the Worker's
 * blocking connection: two per host.
 */
import { type Job, Queue, UnrecoverableError, Worker } from 'bullmq';
import type { Redis } from 'ioredis';
import type { ScError } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import { hostLockToken, hostQueueName, type HostRecord } from '../../shared/protocol/index.js';
import { Presence } from './presence.js';
import { type JobProgress, type ReportFields, type StepJob, type StepTransport, stepJobOf } from '../../shared/protocol/transport.js';

/** The lock token of every job this host takes: stable across restarts and reboots (client.ts hostLockToken). */
export const hostToken = hostLockToken;

/** Options of DirectTransport. */
export interface DirectTransportOptions {
  hostId: string;
  prefix: string;
  /** A connection made with createRedis(url, {forBullmq: true}). */
  redis: Redis;
  logger: Logger;
  lockDurationMs: number;
  stalledIntervalMs: number;
  maxStalledCount: number;
  reportsMaxLen: number;
  now: () => number;
}

/** The host's own BullMQ queue (see the top of this file). */
export class DirectTransport implements StepTransport {
  readonly kind = 'direct' as const;
  readonly #o: DirectTransportOptions;
  readonly #token: string;
  readonly #queueName: string;
  readonly #presence: Presence;
  readonly #jobs = new Map<string, Job>();
  #worker?: Worker;
  #queue?: Queue;
  #closed = false;

  constructor(o: DirectTransportOptions) {
    this.#o = o;
    this.#token = hostToken(o.hostId);
    this.#queueName = hostQueueName(o.hostId);
    this.#presence = new Presence({ redis: o.redis, prefix: o.prefix, hostId: o.hostId, reportsMaxLen: o.reportsMaxLen, now: o.now });
  }

  async open(): Promise<void> {
    const o = this.#o;
    this.#worker = new Worker(this.#queueName, null, {
      connection: o.redis,
      prefix: o.prefix,
      autorun: false,
      lockDuration: o.lockDurationMs,
      stalledInterval: o.stalledIntervalMs,
      maxStalledCount: o.maxStalledCount,
      name: this.#token,
    });
    this.#worker.on('error', (err) => o.logger.warn({ err: err.message }, 'queue worker error'));
    this.#queue = new Queue(this.#queueName, { connection: o.redis, prefix: o.prefix });
    this.#queue.on('error', (err) => o.logger.warn({ err: err.message }, 'queue error'));
    await this.#worker.waitUntilReady();
    this.#worker.startStalledCheckTimer().catch((err) => o.logger.warn({ err: (err as Error).message }, 'stalled check failed'));
  }

  update(fields: Partial<HostRecord>): Promise<void> {
    return this.#presence.update(fields);
  }

  heartbeat(fields: Partial<HostRecord>): Promise<void> {
    return this.#presence.update(fields);
  }

  #wrap(j: Job, readopted: boolean): StepJob {
    this.#jobs.set(j.id!, j);
    return stepJobOf(j, readopted);
  }

  /**
   * An active job this host's token still locks. Anyone who can write the queue can put a job
   * there under that (predictable) token: the step loop trusts only its journal about it.
   */
  async readopt(): Promise<StepJob | undefined> {
    const active = await this.#queue!.getActive(0, 20);
    for (const j of active) {
      if (!j) continue;
      const ok = await j.extendLock(this.#token, this.#o.lockDurationMs);
      if (ok === 1) {
        this.#o.logger.info({ job: j.id }, 'resuming the job held before the restart');
        return this.#wrap(j, true);
      }
      this.#o.logger.warn({ job: j.id }, 'an active job is not locked by this host (lock expired); stalled-job recovery will hand it back');
    }
    return undefined;
  }

  async next(): Promise<StepJob | undefined> {
    try {
      const j = await this.#worker!.getNextJob(this.#token, { block: true });
      return j ? this.#wrap(j, false) : undefined;
    } catch (err) {
      if (this.#closed) return undefined;
      throw err;
    }
  }

  abortRequested(rollout: string): Promise<boolean> {
    return this.#presence.abortRequested(rollout);
  }

  hold(job: StepJob, onLost: () => void): () => void {
    const o = this.#o;
    const j = this.#jobs.get(job.id)!;
    const t = setInterval(
      () => {
        j.extendLock(this.#token, o.lockDurationMs).then(
          (ok) => {
            if (ok !== 1) onLost();
          },
          (err) => o.logger.warn({ job: job.id, err: (err as Error).message }, 'lock renewal failed'),
        );
      },
      Math.max(500, Math.floor(o.lockDurationMs / 2)),
    );
    return () => clearInterval(t);
  }

  async event(_job: StepJob, r: ReportFields): Promise<void> {
    await this.#report(r);
  }

  async progress(job: StepJob, p: JobProgress, r: ReportFields): Promise<void> {
    await this.#jobs
      .get(job.id)
      ?.updateProgress({ ...p })
      .catch(() => {});
    await this.#report(r);
  }

  async log(job: StepJob, line: string): Promise<void> {
    await this.#jobs
      .get(job.id)
      ?.log(line)
      .catch(() => {});
  }

  async complete(job: StepJob, result: Record<string, unknown>, r: ReportFields): Promise<void> {
    const j = this.#jobs.get(job.id)!;
    await j.moveToCompleted(result, this.#token, false);
    this.#jobs.delete(job.id);
    await this.#report(r);
  }

  async fail(job: StepJob, e: ScError, permanent: boolean, r: ReportFields): Promise<boolean> {
    const j = this.#jobs.get(job.id)!;
    this.#jobs.delete(job.id);
    const msg = `${e.code}: ${e.message}`;
    let retry = false;
    try {
      await j.moveToFailed(permanent ? new UnrecoverableError(msg) : new Error(msg), this.#token, false);
      retry = !permanent && j.attemptsMade < (j.opts.attempts ?? 1);
    } catch (x) {
      this.#o.logger.error({ job: job.id, err: (x as Error).message }, 'could not fail the job');
    }
    await this.#report(retry && r.message ? { ...r, message: `${r.message} (will retry)` } : r);
    return retry;
  }

  async #report(r: ReportFields): Promise<void> {
    await this.#presence.report(r).catch((err) => this.#o.logger.warn({ err: (err as Error).message }, 'report failed'));
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#worker?.close(true).catch(() => {});
    await this.#queue?.close().catch(() => {});
  }
}
