/**
 * The Step interface: one file per install step implements it (ARCHITECTURE.md, "Install
 * sequence"). A step is run by the worker for one signed job; the same step may be run again
 * for the same job after a crash or a reboot, so every step is idempotent by construction:
 *
 * 1. `check` looks at the machine and says whether the step's effect is already in place
 *    (read-only). When it is, the worker completes the job without calling `apply`, so an
 *    effect is never produced twice.
 * 2. `apply` produces the effect. It must be safe to interrupt at any point (kill -9, power
 *    loss) and to start again from the top: it writes its own "done" evidence last.
 *
 * Steps get everything through StepContext; they never touch Redis or BullMQ.
 */
import type { KeyObject } from 'node:crypto';
import type { Logger } from '../../../shared/log.js';
import type { StepName, StepPayload } from '../../../shared/protocol/index.js';
import type { CrashPoint } from '../hooks.js';
import type { MachineDriver } from '../machine/driver.js';

/** Progress of a step, in bytes of its main transfer (fetch, copy, unpack). */
export interface StepProgress {
  bytes: number;
  /** Total bytes when known. */
  total?: number;
}

/** What a step sees of the agent. */
export interface StepContext {
  hostId: string;
  /** The verified job payload. */
  payload: StepPayload;
  driver: MachineDriver;
  /** Release keys that manifests must verify against. */
  trusted: KeyObject[];
  /** age identities for bundle decryption. Never logged. */
  identities: string[];
  /** The colo's stages, as configured. */
  stages: readonly string[];
  /** Origin, the last resort. */
  origin?: string;
  /**
   * Absolute paths of the files the agent itself needs (its config file, keys, identity): the
   * install steps copy them to the same paths in the OS they install (linux), so the agent
   * starts there after the reboot.
   */
  agentFiles: readonly string[];
  /** Aborted when the agent stops or the step's deadline passes; long work must honour it. */
  signal: AbortSignal;
  logger: Logger;
  /** Appends a line to the job's log (BullMQ) and the agent log. */
  log(line: string): Promise<void>;
  /** Reports progress (throttled by the worker). Synchronous: safe from stream callbacks. */
  progress(p: StepProgress): void;
  /**
   * Reports that the machine is about to reboot, then reboots through the driver. Never
   * returns: the agent process (or in-process instance) ends, and the job stays active, so the
   * returning agent runs this step again and `check` sees the outcome.
   */
  reboot(): Promise<never>;
  /** Test crash points (hooks.ts); a no-op in production. */
  crashPoint: CrashPoint;
  /** Clock in ms. */
  now(): number;
  /**
   * Blob size from which bundles are unpacked in a worker thread, and B's unpack follows its
   * copy in install-base (shared/bundle/unpack-file.ts; default 64 MiB). Tests lower it.
   */
  unpackWorkerMinBytes?: number;
}

/** What a step returns; it becomes the job's return value. */
export type StepResult = Record<string, unknown>;

/** One install step. */
export interface Step {
  readonly name: StepName;
  /** Deadline of one run of the step, in ms (the worker aborts `signal` and fails the attempt with SC_ERR_TIMEOUT). */
  readonly timeoutMs: number;
  /**
   * Read-only: null when the effect is not (completely) in place, else a short reason
   * ("disk2 already laid out"). May throw (e.g. a precondition that can never hold).
   */
  check(ctx: StepContext): Promise<string | null>;
  /** Produces the effect; safe to interrupt and re-run. Returns the job's result. */
  apply(ctx: StepContext): Promise<StepResult>;
}
