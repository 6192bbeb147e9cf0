/**
 * The direct transport: the host consumes its own BullMQ queue (`host.<id>`) over Redis with the
 * stable lock token `agent:<hostId>`, through the protocol's StepQueueConsumer
 * (shared/protocol/consumer.ts: the same manual consumer the relay uses, with the same lock
 * renewal rule and failure encoding). See worker.ts for why a step interrupted by a reboot runs
 * again and a finished one never does. Connections: the given one (shared by the Worker's
 * commands, the Queue and presence) plus the Worker's blocking connection: two per host.
 */
import type { Job } from 'bullmq';
import type { Redis } from 'ioredis';
import type { ScError } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import { hostLockToken, hostQueueName, type HostRecord, StepQueueConsumer } from '../../shared/protocol/index.js';
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
  readonly #presence: Presence;
  readonly #consumer: StepQueueConsumer;
  readonly #jobs = new Map<string, Job>();

  constructor(o: DirectTransportOptions) {
    this.#o = o;
    this.#presence = new Presence({ redis: o.redis, prefix: o.prefix, hostId: o.hostId, reportsMaxLen: o.reportsMaxLen, now: o.now });
    this.#consumer = new StepQueueConsumer({
      queue: hostQueueName(o.hostId),
      token: hostToken(o.hostId),
      connection: o.redis,
      prefix: o.prefix,
      lockDurationMs: o.lockDurationMs,
      stalledIntervalMs: o.stalledIntervalMs,
      maxStalledCount: o.maxStalledCount,
      logger: o.logger,
    });
  }

  open(): Promise<void> {
    return this.#consumer.open();
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
   * there under that (predictable) token: the step loop trusts only its journal about it. A host
   * runs one job at a time, so at most one is expected; any other is left to lapse, and BullMQ's
   * stalled check hands it back.
   */
  async readopt(): Promise<StepJob | undefined> {
    const [j, ...more] = await this.#consumer.readopt();
    if (more.length) this.#o.logger.warn({ job: j.id, others: more.map((x) => x.id) }, 'this host held more than one job; resuming the first');
    return j ? this.#wrap(j, true) : undefined;
  }

  async next(): Promise<StepJob | undefined> {
    const j = await this.#consumer.next();
    return j ? this.#wrap(j, false) : undefined;
  }

  abortRequested(rollout: string): Promise<boolean> {
    return this.#presence.abortRequested(rollout);
  }

  hold(job: StepJob, onLost: () => void): () => void {
    return this.#consumer.hold(this.#jobs.get(job.id)!, onLost);
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
    await this.#consumer.complete(this.#jobs.get(job.id)!, result);
    this.#jobs.delete(job.id);
    await this.#report(r);
  }

  async fail(job: StepJob, e: ScError, permanent: boolean, r: ReportFields): Promise<boolean> {
    const j = this.#jobs.get(job.id)!;
    this.#jobs.delete(job.id);
    let retry = false;
    try {
      ({ retry } = await this.#consumer.fail(j, { code: e.code, message: e.message }, permanent));
    } catch (x) {
      this.#o.logger.error({ job: job.id, err: (x as Error).message }, 'could not fail the job');
    }
    await this.#report(retry && r.message ? { ...r, message: `${r.message} (will retry)` } : r);
    return retry;
  }

  async #report(r: ReportFields): Promise<void> {
    await this.#presence.report(r).catch((err) => this.#o.logger.warn({ err: (err as Error).message }, 'report failed'));
  }

  close(): Promise<void> {
    return this.#consumer.close();
  }
}
