/**
 * The consumer of a step queue, used by both of its consumers: a direct-mode agent on its own
 * queue (`host.<id>`, token `agent:<id>`, services/agent/transport-direct.ts) and a colo's relay
 * on the colo's queue (`colo.<colo>`, token `relay:<colo>`, services/relay/server.ts).
 *
 * BullMQ's Worker is used without a processor (processed manually: `getNextJob`, lock renewal,
 * `moveToCompleted`, `moveToFailed`) and with a lock token that is stable across restarts and
 * reboots, so that a restarted consumer re-adopts what it held (`readopt`), and a job whose holder
 * died returns to wait through BullMQ's stalled check once its lock lapses.
 *
 * Lock renewal follows one rule for every consumer (lockRenewalIntervalMs): every held job's lock
 * is renewed every third of the lock duration (at least every 500 ms), all of them in one burst.
 *
 * Failures are structured: `{code, message}` at this API, stored as BullMQ's `failedReason` by
 * encodeFailure and read back by failureOf. No other code formats or parses a `failedReason`.
 */
import { type Job, Queue, UnrecoverableError, Worker } from 'bullmq';
import type { Redis } from 'ioredis';
import { scError } from '../errors.js';
import type { Logger } from '../log.js';

// ------------------------------------------------------------------------------------ failures

/** Why a step job failed: a stable error code (`SC_ERR_*`) and a message for people. */
export interface StepFailure {
  code: string;
  message: string;
}

/** The codes encodeFailure accepts: `SC_ERR_` and 1–60 of `[A-Z_]`. */
export const FAILURE_CODE_RE = /^SC_ERR_[A-Z_]{1,60}$/;

/** Longest message kept in a failure reason, in UTF-16 code units (a longer one is cut). */
export const FAILURE_MESSAGE_MAX = 2000;

/** True when `code` is a string encodeFailure accepts as a failure code. */
export function isFailureCode(code: unknown): code is string {
  return typeof code === 'string' && FAILURE_CODE_RE.test(code);
}

/**
 * The `failedReason` of a failure: `<code>: <message>`, the message cut to FAILURE_MESSAGE_MAX.
 * Throws SC_ERR_INTERNAL when the code does not match FAILURE_CODE_RE (validate untrusted codes
 * with isFailureCode first).
 */
export function encodeFailure(f: StepFailure): string {
  if (!isFailureCode(f.code)) throw scError('SC_ERR_INTERNAL', `not a failure code: ${JSON.stringify(String(f.code).slice(0, 80))}`);
  return `${f.code}: ${capMessage(String(f.message))}`;
}

/** A failure code anywhere in a reason, as a whole word (how control has always read reasons). */
const CODE_IN_REASON = /\bSC_ERR_[A-Z_]+\b/;

/**
 * The failure in a BullMQ `failedReason`, or null when it names no code. The code is the first
 * whole word `SC_ERR_…` in the reason, wherever it is: encodeFailure puts it first, and reasons
 * written otherwise (older agents, a reason quoting a code) are read as control always read them.
 * The message is what follows `<code>: ` when the reason starts so, else the whole reason; it is
 * cut to FAILURE_MESSAGE_MAX. `failureOf(encodeFailure(f))` gives `f` back (message cut).
 * The code is not re-validated: a reason that encodeFailure did not write may carry a code longer
 * than FAILURE_CODE_RE allows, and it is returned as found.
 */
export function failureOf(reason?: string): StepFailure | null {
  if (!reason) return null;
  const m = CODE_IN_REASON.exec(reason);
  if (!m) return null;
  const code = m[0];
  const head = `${code}: `;
  const message = m.index === 0 && reason.startsWith(head) ? reason.slice(head.length) : reason;
  return { code, message: capMessage(message) };
}

function capMessage(s: string): string {
  if (s.length <= FAILURE_MESSAGE_MAX) return s;
  const cut = s.slice(0, FAILURE_MESSAGE_MAX);
  // Never leave half of a surrogate pair at the end.
  const last = cut.charCodeAt(cut.length - 1);
  return last >= 0xd800 && last <= 0xdbff ? cut.slice(0, -1) : cut;
}

// ------------------------------------------------------------------------------------ consumer

/**
 * How often a consumer renews the locks of its held jobs: every third of the lock duration, at
 * least every 500 ms. A third, not a half, so that every lock period holds two renewals: a
 * renewal that is lost or late (a Redis reconnect or failover, an event loop held up by a big
 * unpack or a GC pause) is followed by another one a third of the lock before the lock lapses.
 * At a half, the second renewal is due just as the lock expires, so one lost renewal can lose the
 * job to the stalled check, and the step runs again elsewhere or later. The cost is one script
 * call per burst (of up to 1000 jobs) per period. The 500 ms floor keeps a very short lock (tests)
 * from turning renewal into a busy loop.
 */
export function lockRenewalIntervalMs(lockDurationMs: number): number {
  return Math.max(500, Math.floor(lockDurationMs / 3));
}

/** Options of StepQueueConsumer. */
export interface StepQueueConsumerOptions {
  /** BullMQ queue name (hostQueueName or coloQueueName). */
  queue: string;
  /** Lock token of every job taken, also the Worker's name (hostLockToken or relayLockToken). */
  token: string;
  /**
   * A connection made with createRedis(url, {forBullmq: true}) (BullMQ needs
   * `maxRetriesPerRequest: null`). Shared by the Worker's commands and the Queue; the Worker adds
   * its own blocking connection. Never closed here.
   */
  connection: Redis;
  prefix: string;
  /** BullMQ lock duration of a taken job, ms. */
  lockDurationMs: number;
  /** Period of BullMQ's stalled-job check, ms. */
  stalledIntervalMs: number;
  /** Stalls a job may have before BullMQ fails it instead of returning it to wait. */
  maxStalledCount: number;
  logger: Logger;
}

interface Hold {
  job: Job;
  onLost: () => void;
}

/** Job ids per lock renewal script call (bounds the time one call holds Redis). */
const RENEW_BATCH = 1000;

/**
 * A manual BullMQ consumer of one step queue under one stable lock token (see the top of this
 * file). Use: `open`, then `readopt` once, then `next` in a loop; `hold` each taken job while it
 * is owned; `complete` or `fail` it; `close`. Jobs taken and not finished stay active under the
 * token when the consumer closes or dies: the next consumer with the same token re-adopts them.
 */
export class StepQueueConsumer {
  readonly #o: StepQueueConsumerOptions;
  readonly #held = new Map<string, Hold>();
  #worker?: Worker;
  #queue?: Queue;
  #renewTimer?: NodeJS.Timeout;
  #renewing = false;
  #opened = false;
  #closed = false;

  constructor(o: StepQueueConsumerOptions) {
    this.#o = o;
  }

  /** The lock token of every job this consumer takes. */
  get token(): string {
    return this.#o.token;
  }

  /** Milliseconds between two lock renewal bursts (lockRenewalIntervalMs of the lock duration). */
  get renewalIntervalMs(): number {
    return lockRenewalIntervalMs(this.#o.lockDurationMs);
  }

  /** Jobs whose locks are being renewed (held and not yet finished, released or lost). */
  get heldCount(): number {
    return this.#held.size;
  }

  /**
   * Creates the Worker (no processor, not running, named after the token) and the Queue, waits
   * until they are connected, then starts BullMQ's stalled-job check and the lock renewal timer.
   * Throws when Redis cannot be reached (everything made is closed again), or when called twice.
   */
  async open(): Promise<void> {
    if (this.#opened || this.#closed) throw scError('SC_ERR_CONFLICT', 'step queue consumer opened twice or after close');
    this.#opened = true;
    const o = this.#o;
    const worker = new Worker(o.queue, null, {
      connection: o.connection,
      prefix: o.prefix,
      autorun: false,
      lockDuration: o.lockDurationMs,
      stalledInterval: o.stalledIntervalMs,
      maxStalledCount: o.maxStalledCount,
      name: o.token,
    });
    worker.on('error', (err) => o.logger.warn({ queue: o.queue, err: err.message }, 'queue worker error'));
    this.#worker = worker;
    const queue = new Queue(o.queue, { connection: o.connection, prefix: o.prefix });
    queue.on('error', (err) => o.logger.warn({ queue: o.queue, err: err.message }, 'queue error'));
    this.#queue = queue;
    try {
      await worker.waitUntilReady();
      await queue.waitUntilReady();
    } catch (err) {
      await this.close();
      throw err;
    }
    if (this.#closed) return;
    worker.startStalledCheckTimer().catch((err) => o.logger.warn({ queue: o.queue, err: (err as Error).message }, 'stalled check failed'));
    this.#renewTimer = setInterval(() => this.#renew(), this.renewalIntervalMs);
    this.#renewTimer.unref();
  }

  /**
   * The active jobs whose lock this token still holds (a restart of the same consumer), each
   * re-locked for a full lock duration; in the queue's active order. They are not held: `hold`
   * those that are kept. Active jobs locked by another token, or whose lock lapsed, are left to
   * their holder or to the stalled check.
   */
  async readopt(): Promise<Job[]> {
    const o = this.#o;
    const active = (await this.#queue!.getActive(0, -1)).filter((j): j is Job => !!j);
    const mine = await Promise.all(
      active.map(async (j) => {
        try {
          return (await j.extendLock(o.token, o.lockDurationMs)) === 1;
        } catch (err) {
          o.logger.warn({ queue: o.queue, job: j.id, err: (err as Error).message }, 'could not re-lock an active job');
          return false;
        }
      }),
    );
    const out = active.filter((_, i) => mine[i]);
    if (out.length) o.logger.info({ queue: o.queue, jobs: out.length }, 'resuming the jobs held before the restart');
    if (active.length > out.length) {
      o.logger.info({ queue: o.queue, jobs: active.length - out.length }, 'active jobs not locked by this token are left to their holder or to the stalled check');
    }
    return out;
  }

  /**
   * The next job, taken with this token (BullMQ's blocking `getNextJob`): waits a bounded time
   * (BullMQ's drain delay, about 5 s) and resolves undefined when none came, and at once after
   * close. Not held: `hold` it. Throws on Redis errors while open.
   */
  async next(): Promise<Job | undefined> {
    if (this.#closed || !this.#worker) return undefined;
    try {
      const j = await this.#worker.getNextJob(this.#o.token, { block: true });
      // A job taken as the consumer closes stays active under the token: the next consumer re-adopts it.
      return this.#closed ? undefined : (j ?? undefined);
    } catch (err) {
      if (this.#closed) return undefined;
      throw err;
    }
  }

  /**
   * Renews `job`'s lock with every renewal burst until it is completed, failed, released (the
   * returned function) or lost. `onLost` is called once when a renewal finds the lock gone (held
   * by another token, expired, or the job left the active set); the job is no longer held then.
   * A renewal that fails on a Redis error is retried at the next burst. Holding a job id again
   * replaces its previous hold.
   */
  hold(job: Job, onLost: () => void): () => void {
    const id = job.id!;
    const h: Hold = { job, onLost };
    if (!this.#closed) this.#held.set(id, h);
    return () => {
      if (this.#held.get(id) === h) this.#held.delete(id);
    };
  }

  /**
   * Moves `job` to completed with `result` (stops holding it). Throws when BullMQ refuses (the
   * lock is not this token's any more, or the job is gone).
   */
  async complete(job: Job, result: Record<string, unknown>): Promise<void> {
    this.#held.delete(job.id!);
    await job.moveToCompleted(result, this.#o.token, false);
  }

  /**
   * Fails `job` with `failure` (stored as encodeFailure's reason; stops holding it). A permanent
   * failure is not retried; another is retried, after the job's backoff, while it has attempts
   * left. `retry` says which. Throws SC_ERR_INTERNAL for a code that is not a failure code (before
   * touching the job), and whatever BullMQ throws when it refuses (lock lost, job gone).
   */
  async fail(job: Job, failure: StepFailure, permanent: boolean): Promise<{ retry: boolean }> {
    const reason = encodeFailure(failure);
    this.#held.delete(job.id!);
    await job.moveToFailed(permanent ? new UnrecoverableError(reason) : new Error(reason), this.#o.token, false);
    // moveToFailed counted this attempt; BullMQ retried it iff attempts are left (job options).
    return { retry: !permanent && job.attemptsMade < (job.opts.attempts ?? 1) };
  }

  /**
   * Stops taking jobs (a pending `next` resolves undefined), stops the stalled check and lock
   * renewal, and closes the Worker and Queue (not the given connection). Jobs taken and not
   * finished stay active under the token. Idempotent.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#renewTimer);
    this.#held.clear();
    await this.#worker?.close(true).catch(() => {});
    await this.#queue?.close().catch(() => {});
  }

  /** One renewal burst of every held job; skipped while the previous one is unanswered. */
  #renew(): void {
    if (this.#renewing || this.#closed || this.#held.size === 0) return;
    const o = this.#o;
    const holds = [...this.#held.entries()];
    const batches: [string, Hold][][] = [];
    for (let i = 0; i < holds.length; i += RENEW_BATCH) batches.push(holds.slice(i, i + RENEW_BATCH));
    this.#renewing = true;
    void Promise.all(
      batches.map(async (batch) => {
        let failed: string[];
        try {
          failed = await this.#worker!.extendJobLocks(
            batch.map(([id]) => id),
            batch.map(() => o.token),
            o.lockDurationMs,
          );
        } catch (err) {
          o.logger.warn({ queue: o.queue, jobs: batch.length, err: (err as Error).message }, 'lock renewal failed; retrying at the next renewal');
          return;
        }
        const byId = new Map(batch);
        for (const id of failed) {
          const h = byId.get(String(id));
          if (!h || this.#held.get(h.job.id!) !== h) continue; // finished or released meanwhile
          this.#held.delete(h.job.id!);
          o.logger.warn({ queue: o.queue, job: h.job.id }, 'lost the lock of a held job');
          try {
            h.onLost();
          } catch (err) {
            o.logger.error({ queue: o.queue, job: h.job.id, err: (err as Error).message }, 'lock loss handler failed');
          }
        }
      }),
    ).finally(() => {
      this.#renewing = false;
    });
  }
}
