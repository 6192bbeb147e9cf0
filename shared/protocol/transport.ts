/**
 * How the agent's step loop (services/agent/worker.ts) takes jobs and tells the world about them, independent of
 * the wire: `DirectTransport` (services/agent/transport-direct.ts) consumes the host's own BullMQ queue over
 * Redis; `RelayTransport` (services/relay/client.ts) long-polls its colo's relay (a stage) over HTTP
 * and has no Redis connection at all. Steps, their idempotence and the re-adoption rule are the
 * same in both: a job taken and not finished is handed to the host again when it comes back.
 * Nothing a transport says about a job is trusted: the loop verifies its signature and asks the
 * host's journal (services/agent/journal.ts) whether it is a replay or a re-adoption.
 */
import type { Job } from 'bullmq';
import type { ScError } from '../errors.js';
import type { HostRecord, StepReport } from './records.js';

/** One step job as the loop sees it. */
export interface StepJob {
  /** BullMQ job id. */
  id: string;
  /** BullMQ job name (the step name as enqueued). */
  name: string;
  /** The signed job data (verified by the loop, never trusted by the transport). */
  data: unknown;
  /** Attempts made before this one. */
  attemptsMade: number;
  /** Attempts allowed in all (job option `attempts`). */
  maxAttempts: number;
  /**
   * When the job was first taken (ms), as the transport says. Informational only: the step loop
   * never uses it (a relay or a queue writer can put any value here).
   */
  processedOn?: number;
  /** Set when BullMQ hands out a job that must fail without running (a failed child, too many stalls). */
  deferredFailure?: string;
  /**
   * True when the transport says this host already held the job before a restart or reboot.
   * Informational only: whether the host started the job is its journal's word (journal.ts).
   */
  readopted: boolean;
}

/** The StepJob of a BullMQ job (what a direct agent runs and what a relay hands out). */
export function stepJobOf(j: Job, readopted: boolean): StepJob {
  return {
    id: j.id!,
    name: j.name,
    data: j.data,
    attemptsMade: j.attemptsMade,
    maxAttempts: j.opts.attempts ?? 1,
    processedOn: j.processedOn,
    deferredFailure: j.deferredFailure,
    readopted,
  };
}

/** A report without the fields the transport fills in (host, time). */
export type ReportFields = Omit<StepReport, 'host' | 'ts'>;

/** Progress of a running step. */
export interface JobProgress {
  bytes: number;
  total?: number;
  percent?: number;
}

/** The step loop's view of its job source. Implementations are used by one loop at a time. */
export interface StepTransport {
  readonly kind: 'direct' | 'relay';
  /** Connects; resolves when jobs can be taken. Throws when the source is unreachable for good. */
  open(): Promise<void>;
  /** Writes registration/state fields (merged into the host's record) and bumps the heartbeat. */
  update(fields: Partial<HostRecord>): Promise<void>;
  /** A periodic liveness signal (may be a no-op where the transport's own traffic proves liveness). */
  heartbeat(fields: Partial<HostRecord>): Promise<void>;
  /** The job this host held before a restart, re-locked; undefined when none (or when `next` re-adopts). */
  readopt(): Promise<StepJob | undefined>;
  /** The next job; waits a bounded time and resolves undefined when none came (or on close). */
  next(): Promise<StepJob | undefined>;
  /** True when control asked this host to stop `rollout` at the next step boundary. */
  abortRequested(rollout: string): Promise<boolean>;
  /** Keeps the job's lock while it runs; `onLost` is called when it is lost. Returns the stop function. */
  hold(job: StepJob, onLost: () => void): () => void;
  /** Sends a step event (started, rebooting) for `job`. Never throws. */
  event(job: StepJob, r: ReportFields): Promise<void>;
  /** Sends progress (job progress and a `progress` report). Never throws. */
  progress(job: StepJob, p: JobProgress, r: ReportFields): Promise<void>;
  /** Appends a line to the job's log. Never throws. */
  log(job: StepJob, line: string): Promise<void>;
  /** Completes the job with `result`, then reports `r` (event completed). Throws when the lock is lost. */
  complete(job: StepJob, result: Record<string, unknown>, r: ReportFields): Promise<void>;
  /**
   * Fails the job with `<code>: <message>` (no retry when `permanent`) and reports `r` (its
   * message gets ` (will retry)` when a retry follows). Returns true when the job will be retried.
   */
  fail(job: StepJob, e: ScError, permanent: boolean, r: ReportFields): Promise<boolean>;
  /** Ends a pending `next` (it resolves undefined) and closes the connections. Idempotent. */
  close(): Promise<void>;
}
