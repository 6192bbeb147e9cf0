/**
 * Owns the shapes of rollout and host-operation state (as stored in Redis and returned by the
 * API) and the small facts derived from them: which host statuses are terminal or in flight,
 * the counters, whether a rollout still has work in flight, and the Redis key names of control.
 */
import { randomBytes } from 'node:crypto';
import { type BundleRef, CONVERT_STEPS, POINT_OF_NO_RETURN, type StepRoute } from '../../../shared/protocol/index.js';
import type { Plan } from '../plan.js';
import type { HostTable } from './host-table.js';

/** The queue a sequence was put in: where its jobs are, whatever the host's registration says later. */
export type JobRoute = Pick<StepRoute, 'transport' | 'queue'>;

/** Where a host is in a rollout. */
export type HostStatus = 'pending' | 'queued' | 'running' | 'converted' | 'failed' | 'aborted' | 'skipped';
/** Statuses after which nothing more happens to the host in this rollout. */
export const TERMINAL_HOST: readonly HostStatus[] = ['converted', 'failed', 'aborted', 'skipped'];
/** Statuses that count against maxInFlight. */
export const IN_FLIGHT_HOST: readonly HostStatus[] = ['queued', 'running'];

/** Position of the last conversion step, and of the point of no return, in CONVERT_STEPS. */
export const LAST_SEQ = CONVERT_STEPS.length - 1;
export const PONR_SEQ = CONVERT_STEPS.indexOf(POINT_OF_NO_RETURN as (typeof CONVERT_STEPS)[number]);

/** One step of one host. Times in ms since the epoch. */
export interface StepState {
  state: 'running' | 'completed' | 'failed' | 'retrying';
  startedAt?: number;
  finishedAt?: number;
  percent?: number;
  bytes?: number;
  note?: string;
}

/** A host inside a rollout. */
export interface HostState {
  host: string;
  colo: string;
  wave: number;
  status: HostStatus;
  /** The step the host is at (last started or completed) and its position in the sequence. */
  step: string | null;
  seq: number;
  steps: Record<string, StepState>;
  /** True once the signed sequence is in the host's queue. */
  enqueued: boolean;
  /** The queue the sequence went to, set with `enqueued` (absent in states written before control kept it). */
  route?: JobRoute;
  abortRequested?: boolean;
  queuedAt: number | null;
  startedAt: number | null;
  finishedAt: number | null;
  lastEventAt: number | null;
  error: { step: string; seq: number; code: string; message: string } | null;
  /** Set when a failure past the point of no return sent the host back to B. */
  rescue: { state: 'queued' | 'running' | 'done' | 'failed'; enqueued: boolean; at: number; error?: string; route?: JobRoute } | null;
  /** Last report lines (progress excluded), oldest first. */
  log: string[];
  /** Filled by `get(id, {logs: true})` for failed hosts: the failed job's BullMQ log tail. */
  jobLog?: string[];
}

/** Lifecycle of a rollout. `completed`: every host converted; `failed`: finished with failures. */
export type RolloutState = 'running' | 'paused' | 'aborting' | 'aborted' | 'completed' | 'failed';
/** Rollout states that end it. */
export const FINISHED_ROLLOUT: readonly RolloutState[] = ['aborted', 'completed', 'failed'];

/** What a rollout was asked to do, fixed at creation. */
export interface RolloutSpec {
  id: string;
  createdAt: number;
  actor: string;
  base: BundleRef;
  target: BundleRef;
  /** Blob digests of B and C (what preheat asks stages to fetch). */
  blobs: { base: string; target: string };
  manifests: { base: string; target: string };
  selector: { hosts?: string[]; colos?: string[] };
  plan: Plan & { maxInFlightPerColo: number };
  /** Host ids per wave, in start order. */
  waves: string[][];
  /** Failure budget as a host count. */
  budget: number;
  hostCount: number;
}

/** Counters by host status, plus in-flight. */
export type Counts = Record<HostStatus, number> & { inFlight: number; rescued: number };

/** The mutable part of a rollout. */
export interface RolloutStatus {
  state: RolloutState;
  pauseReason: string | null;
  /** Index of the current wave. */
  wave: number;
  phase: 'preheat' | 'rolling' | 'bake' | 'done';
  phaseSince: number;
  bakeUntil: number | null;
  /** Failed hosts when last resumed: the budget counts failures after that. */
  failuresAtResume: number;
  /** Set when an operator resumed after a canary failure. */
  canaryAccepted: boolean;
  counts: Counts;
  updatedAt: number;
  finishedAt: number | null;
}

/** Preheat of one colo's stages for the rollout's B and C blobs. */
export interface PreheatColo {
  colo: string;
  wave: number;
  state: 'filling' | 'done' | 'failed' | 'timeout' | 'skipped';
  reason?: string;
  startedAt: number;
  finishedAt: number | null;
  stages: {
    url: string;
    state: 'filling' | 'done' | 'failed';
    error?: string;
    digests: Record<string, { state: string; bytes?: number; size?: number | null }>;
  }[];
}

/** A rollout as the API returns it. */
export interface RolloutView {
  spec: RolloutSpec;
  status: RolloutStatus;
  preheat: Record<string, PreheatColo>;
  hosts?: HostState[];
}

/** A host operation (rescue, reinstall, install) outside rollouts. */
export interface HostOp {
  id: string;
  kind: 'rescue' | 'reinstall' | 'install';
  host: string;
  bundle: string | null;
  createdAt: number;
  actor: string;
  status: 'queued' | 'running' | 'done' | 'failed';
  enqueued: boolean;
  /** The queue the sequence went to, set with `enqueued` (absent in records written before control kept it). */
  route?: JobRoute;
  steps: string[];
  step: string | null;
  seq: number;
  error: { step: string; code: string; message: string } | null;
  finishedAt: number | null;
  log: string[];
}

/**
 * A host's newest finished result as control recorded it (`<prefix>:control:host-last`): the
 * rollout that converted, failed or aborted it, or the operation that ended on it, whichever
 * finished last. What the dashboard colours a host by; it never has to guess from lists.
 */
export interface HostResult {
  kind: 'rollout' | 'op';
  id: string;
  /** The operation's kind (kind `op`). */
  op?: HostOp['kind'];
  /** converted | failed | aborted (a rollout), done | failed (an operation). */
  outcome: string;
  error: { step: string; code: string; message: string } | null;
  /** A rollout's rescue run of this host, if one was started. */
  rescue?: HostState['rescue'];
  at: number;
}

/** Rollout host statuses that are a result (skipped is not: the rollout never touched the host). */
export const RESULT_STATUSES: readonly HostStatus[] = ['converted', 'failed', 'aborted'];

/** An active rollout as the engine holds it in memory (a write-through copy of Redis). */
export interface ActiveRollout {
  spec: RolloutSpec;
  status: RolloutStatus;
  preheat: Record<string, PreheatColo>;
  /** Its hosts by id, indexed for the engine's passes (host-table.ts). */
  hosts: HostTable;
  /** When preheat last polled the stages, and when reconcile last looked at BullMQ (ms). */
  lastPreheatPoll: number;
  lastReconcile: number;
  /** When reconcile last looked up each host's jobs (ms; memory only: a restarted control looks at every quiet host once). */
  reconciledAt: Map<string, number>;
}

/** What control is doing with a host right now (see `workOf`). */
export interface HostWork {
  kind: 'rollout' | 'op';
  id: string;
  status: string;
  step: string | null;
}

/** What a 'change' event of the engine says changed. */
export interface ChangeEvent {
  kind: 'rollout' | 'op';
  id: string;
}

/** The suffix rescueRunId adds to a rollout id. */
export const RESCUE_SUFFIX = '-rescue';

/**
 * The id a rollout's rescue sequences run under: not the rollout's own id, so that an abort of
 * the rollout (the agents' abort flag names the rollout id) never stops a rescue.
 */
export function rescueRunId(rollout: string): string {
  return `${rollout}${RESCUE_SUFFIX}`;
}

/** A fresh rollout (`r-…`) or operation (`op-…`) id; callers check it is unused. */
export function newId(kind: 'r' | 'op', now: number): string {
  return `${kind}-${now.toString(36)}-${randomBytes(3).toString('hex')}`;
}

/** The Redis key `<prefix>:control:<parts…>`. */
export function controlKey(prefix: string, ...parts: string[]): string {
  return [prefix, 'control', ...parts].join(':');
}


/** All counters at zero. */
export function emptyCounts(): Counts {
  return { pending: 0, queued: 0, running: 0, converted: 0, failed: 0, aborted: 0, skipped: 0, inFlight: 0, rescued: 0 };
}

/** A host as a new rollout holds it: pending, nothing done yet. */
export function pendingHost(host: string, colo: string, wave: number): HostState {
  return {
    host,
    colo,
    wave,
    status: 'pending',
    step: null,
    seq: 0,
    steps: {},
    enqueued: false,
    queuedAt: null,
    startedAt: null,
    finishedAt: null,
    lastEventAt: null,
    error: null,
    rescue: null,
    log: [],
  };
}

/** The status of a new rollout of `hosts` hosts at `now`: running, in the preheat of wave 0. */
export function newRolloutStatus(now: number, hosts: number): RolloutStatus {
  return {
    state: 'running',
    pauseReason: null,
    wave: 0,
    phase: 'preheat',
    phaseSince: now,
    bakeUntil: null,
    failuresAtResume: 0,
    canaryAccepted: false,
    counts: { ...emptyCounts(), pending: hosts },
    updatedAt: now,
    finishedAt: null,
  };
}

/** The queue part of a route the producer used: what a host or operation keeps of it. */
export function jobRoute(r: StepRoute): JobRoute {
  return { transport: r.transport, queue: r.queue };
}

/**
 * The queue a sequence (a rollout host's, its rescue's, or an operation's) was put in, while it is
 * the one enqueued; undefined before it is, and in records written before control kept it (its
 * jobs are then looked up where the host's registration routes it).
 */
export function enqueuedRoute(s: { enqueued: boolean; route?: JobRoute } | null | undefined): JobRoute | undefined {
  return s?.enqueued ? s.route : undefined;
}

/** True while the host's rescue sequence is queued or running. */
export function rescueOpen(h: HostState): boolean {
  return !!h.rescue && (h.rescue.state === 'queued' || h.rescue.state === 'running');
}
