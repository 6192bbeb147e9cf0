/**
 * The agent's job loop: one step per job, over a StepTransport (shared/protocol/transport.ts): the host's own
 * BullMQ queue (`host.<id>`, transport-direct.ts: processed manually — a Worker without a
 * processor: `getNextJob`, `extendLock`, `moveToCompleted`, `moveToFailed`), or its colo's
 * relay over HTTP (services/relay/client.ts; the relay does the BullMQ part with the same rules, one
 * stable lock token per colo instead of per host). What follows is said for direct mode.
 *
 * ## Why a step interrupted by a crash or a reboot runs again, and a finished one never does
 *
 * 1. The lock token is stable per host: `agent:<hostId>`. A job taken by this host stays in the
 *    queue's active list, locked with that token, until this host moves it to completed or
 *    failed. Nothing else ever consumes the queue (one agent per machine: lock.ts).
 * 2. A reboot (the sim's exit action, or a real reboot) and a crash (kill -9) end the agent
 *    without touching the job: it stays active, locked with the host's token, for up to
 *    `lockDurationMs`.
 * 3. A returning agent first looks at its queue's active list and re-adopts what it finds there:
 *    `extendLock(token)` succeeds because the token matches, and the step runs again at once
 *    (no waiting for stalled-job recovery).
 * 4. If the agent was away longer than the lock (a slow real reboot), the lock expired; BullMQ's
 *    stalled-job check (run by this worker every `stalledIntervalMs`) moves the job back to wait,
 *    and `getNextJob` hands it out again. `maxStalledCount` is high (reboots are expected), so a
 *    stall never fails a job. This is the backstop.
 * 5. The queue holds a host's sequence as a flow chain (client.ts): a step's job becomes
 *    available only once the previous step's job completed, so the sequence continues exactly
 *    where it stopped, and a completed job is never handed out again.
 * 6. A step's effect and the job's completion are not one transaction: the agent can die after
 *    the effect and before `moveToCompleted`. That is why every step is idempotent (steps/step.ts):
 *    the re-run's `check` finds the effect in place and completes the job without producing it
 *    again. The sim driver's action log (actions.jsonl) records every effect, so tests prove that
 *    none happens twice.
 *
 * ## Replays: the journal decides, never the transport
 * Points 1–5 say what an honest queue does. The agent does not rely on them: whoever can write
 * the host's queue, a relay, or the network between a relay and its hosts can hand the host any
 * job control ever signed for it, marked re-adopted or not. Every job therefore goes through the
 * host's durable journal (journal.ts) before it runs:
 * - a job of a rollout that finished (or failed for good) on this host, or whose `seq` is at or
 *   below the highest step the host finished in its rollout, is refused with
 *   SC_ERR_JOB_REPLAYED and never run;
 * - a job is re-adopted (run again although it may have expired meanwhile: its expiry is checked
 *   as of its first start) only when the journal says this host started exactly that job (job id
 *   and payload digest) and did not finish it; the transport's `readopted` and `processedOn` are
 *   ignored;
 * - any other job is taken fresh: it must not have expired by the host's clock now, and it must
 *   be the next step of its rollout (SC_ERR_JOB_REJECTED, reason `out-of-order`, otherwise).
 * The journal records the start before the step's first effect, the finish after the job's
 * completion, and the end of a rollout that failed for good. The same holds in both transports.
 *
 * ## Refusals and aborts
 * A job that is unsigned, signed by another key, addressed to another host, expired, out of
 * order or malformed is failed with SC_ERR_JOB_REJECTED as an UnrecoverableError (no retry),
 * before anything touches the machine; a replayed one likewise with SC_ERR_JOB_REPLAYED. Both
 * are reported as `refused`. Before each step, `hostctl:<id>` `abort` equal to the job's
 * rollout fails it with SC_ERR_ABORTED at that safe boundary.
 *
 * ## Failures
 * A step failure is recorded with `moveToFailed`, which applies the job's attempts and backoff;
 * failures that a retry cannot cure (steps/common.ts isPermanent) fail at once. The failed
 * reason is `<code>: <message>`. Every event also goes to the host's reports stream.
 */
import type { Redis } from 'ioredis';
import { type ScError, scError, toScError } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import type { HostRecord, StepPayload } from '../../shared/protocol/index.js';
import { checkStepExpiry, STEP_JOB_OPTS, stepPayloadDigest, verifyStepJobSignature } from '../../shared/protocol/index.js';
import type { AgentKeys } from './config.js';
import { type CrashPoint, noCrashPoints } from './hooks.js';
import { Journal } from './journal.js';
import { type MachineDriver, RebootSignal } from './machine/driver.js';
import { isPermanent } from './steps/common.js';
import { type Base, runStep, throttleProgress } from './step-run.js';
import { STEPS, type Step, type StepContext } from './steps/index.js';
import type { ReportFields, StepJob, StepTransport } from '../../shared/protocol/transport.js';
import { DirectTransport, hostToken } from './transport-direct.js';

export { hostToken };

/** How the job loop ended. */
export type WorkerExit = { reason: 'stopped' } | { reason: 'reboot'; reboots: number };

/** Everything one agent instance needs. */
export interface AgentWorkerOptions {
  hostId: string;
  colo: string;
  prefix: string;
  /**
   * Direct mode: a connection made with createRedis(url, {forBullmq: true}); shared by the
   * Worker, the Queue and the reports. Ignored when `transport` is given.
   */
  redis?: Redis;
  /** The job source (default: a DirectTransport over `redis`). Closed by the loop when it ends. */
  transport?: StepTransport;
  keys: AgentKeys;
  driver: MachineDriver;
  stages: readonly string[];
  origin?: string;
  /** See StepContext.agentFiles. */
  agentFiles?: readonly string[];
  agentVersion: string;
  logger: Logger;
  lockDurationMs?: number;
  stalledIntervalMs?: number;
  maxStalledCount?: number;
  heartbeatMs?: number;
  reportsMaxLen?: number;
  /**
   * Minimum interval between progress reports of one step, ms (default PROGRESS_INTERVAL_MS).
   * The last value is always sent when the step ends.
   */
  progressIntervalMs?: number;
  crashPoint?: CrashPoint;
  now?: () => number;
  /** Step implementations (default: every step of steps/index.ts). */
  steps?: Readonly<Record<string, Step>>;
  /** The host's journal (default: the journal on the machine's own disks, journal.ts). */
  journal?: Journal;
}

/**
 * Default interval between a step's progress reports (ms). Progress is telemetry for the
 * dashboard: at one report a second, the progress of a fleet's long steps (fetch, install) was
 * most of what relays and control handled; five seconds keeps a bar moving for steps that take
 * minutes at a fifth of that cost.
 */
export const PROGRESS_INTERVAL_MS = 5000;

/** How long the running OS's inspected identity (IP, OS) is reused for registrations, ms. */
const IDENTITY_TTL_MS = 60_000;

/** One agent instance's job loop. Create, `run()`, and `stop()` from outside to end it. */
export class AgentWorker {
  readonly #opts: Required<Omit<AgentWorkerOptions, 'origin' | 'redis' | 'transport' | 'journal'>> & { origin?: string };
  readonly #transport: StepTransport;
  readonly #journal: Journal;
  #stopping = false;
  #current?: AbortController;
  #state: Pick<HostRecord, 'state' | 'rollout' | 'step'> = { state: 'starting', rollout: null, step: null };
  /** What the running OS looks like (IP, OS), from the last full inspection, and when it was taken. */
  #identity: { ip: string; running: HostRecord['running']; at: number } | null = null;

  constructor(opts: AgentWorkerOptions) {
    const { redis, transport, journal, ...rest } = opts;
    this.#opts = {
      lockDurationMs: 60_000,
      stalledIntervalMs: 30_000,
      maxStalledCount: 1000,
      heartbeatMs: 10_000,
      reportsMaxLen: 1_000_000,
      progressIntervalMs: PROGRESS_INTERVAL_MS,
      crashPoint: noCrashPoints,
      now: Date.now,
      steps: STEPS,
      agentFiles: [],
      ...(Object.fromEntries(Object.entries(rest).filter(([, v]) => v !== undefined)) as Omit<AgentWorkerOptions, 'redis' | 'transport' | 'journal'>),
    };
    this.#journal = journal ?? new Journal({ driver: this.#opts.driver, hostId: this.#opts.hostId, now: this.#opts.now });
    if (transport) this.#transport = transport;
    else if (redis) {
      const o = this.#opts;
      this.#transport = new DirectTransport({
        hostId: o.hostId,
        prefix: o.prefix,
        redis,
        logger: o.logger,
        lockDurationMs: o.lockDurationMs,
        stalledIntervalMs: o.stalledIntervalMs,
        maxStalledCount: o.maxStalledCount,
        reportsMaxLen: o.reportsMaxLen,
        now: o.now,
      });
    } else throw scError('SC_ERR_BAD_CONFIG', 'an agent needs a Redis connection or a transport');
  }

  /** The transport's kind. */
  get transport(): 'direct' | 'relay' {
    return this.#transport.kind;
  }

  /**
   * Registers the host, then takes and runs jobs until `stop()` (→ `stopped`) or until a step
   * reboots the machine through a driver whose exit action throws RebootSignal (→ `reboot`; the
   * job stays active for the next instance). Other errors of the loop are logged and retried.
   */
  async run(): Promise<WorkerExit> {
    const o = this.#opts;
    const log = o.logger;
    let heartbeat: NodeJS.Timeout | undefined;
    try {
      await this.#transport.open();
      await this.#register('idle');
      heartbeat = setInterval(() => {
        this.#transport.heartbeat(this.#state).catch((err) => log.warn({ err: (err as Error).message }, 'heartbeat failed'));
      }, o.heartbeatMs);
      heartbeat.unref();
      let job = await this.#transport.readopt();
      while (!this.#stopping) {
        if (!job) {
          try {
            job = await this.#transport.next();
          } catch (err) {
            if (this.#stopping) break;
            log.warn({ err: (err as Error).message }, 'fetching the next job failed; retrying');
            await new Promise((r) => setTimeout(r, 1000));
            continue;
          }
        }
        if (this.#stopping) break;
        if (!job) continue; // the wait timed out, or a delayed job is not due yet
        await this.#runJob(job);
        job = undefined;
      }
      return { reason: 'stopped' };
    } catch (err) {
      if (err instanceof RebootSignal) return { reason: 'reboot', reboots: err.reboots };
      throw err;
    } finally {
      clearInterval(heartbeat);
      await this.#transport.close().catch(() => {});
    }
  }

  /**
   * Ends the loop. A step in progress is aborted and its job left active (locked with the host
   * token), exactly as after a crash: the next instance re-adopts it and runs it again.
   */
  async stop(): Promise<void> {
    this.#stopping = true;
    this.#current?.abort(scError('SC_ERR_UNAVAILABLE', 'agent stopping'));
    await this.#transport.close().catch(() => {});
  }

  /**
   * The registration facts of the machine. The running OS and its IP only change with a reboot
   * (which starts a new agent instance), so the full inspection (it reads network config, host
   * keys and every partition) runs at start and then at most once a minute; the boot entry, which
   * steps do change, is read every time.
   */
  async #facts(): Promise<Pick<HostRecord, 'ip' | 'running' | 'bootDevice'>> {
    const d = this.#opts.driver;
    if (!this.#identity || this.#opts.now() - this.#identity.at > IDENTITY_TTL_MS) {
      const ins = await d.inspect();
      this.#identity = { ip: ins.ip ?? '', running: ins.running, at: this.#opts.now() };
      return { ip: this.#identity.ip, running: ins.running, bootDevice: ins.bootDevice };
    }
    return { ip: this.#identity.ip, running: this.#identity.running, bootDevice: (await d.bootConfig()).default };
  }

  async #register(state: string): Promise<void> {
    this.#identity = null;
    const ins = await this.#facts();
    this.#state = { ...this.#state, state };
    await this.#transport.update({
      hostId: this.#opts.hostId,
      colo: this.#opts.colo,
      ip: ins.ip ?? '',
      running: ins.running,
      bootDevice: ins.bootDevice,
      stages: [...this.#opts.stages],
      agentVersion: this.#opts.agentVersion,
      transport: this.#transport.kind,
      ...this.#state,
    });
  }

  async #setState(s: Pick<HostRecord, 'state' | 'rollout' | 'step'>): Promise<void> {
    this.#state = s;
    await this.#transport.update(s).catch((err) => this.#opts.logger.warn({ err: (err as Error).message }, 'state update failed'));
  }

  async #runJob(job: StepJob): Promise<void> {
    const abort = new AbortController();
    this.#current = abort;
    const release = this.#transport.hold(job, () => {
      this.#opts.logger.error({ job: job.id }, 'lost the job lock; abandoning the step');
      abort.abort(scError('SC_ERR_CONFLICT', 'lost the job lock'));
    });
    try {
      await this.#process(job, abort);
    } finally {
      release();
      this.#current = undefined;
    }
  }

  async #process(job: StepJob, abort: AbortController): Promise<void> {
    const o = this.#opts;
    const t = this.#transport;
    let payload: StepPayload;
    try {
      payload = verifyStepJobSignature(job.data, o.hostId, o.keys.control);
    } catch (err) {
      const e = toScError(err);
      if (e.code === 'SC_ERR_JOB_REJECTED') await this.#refuse(job, e);
      else await t.fail(job, e, false, { rollout: '', seq: -1, step: job.name.slice(0, 40), event: 'failed', code: e.code, message: e.message });
      return;
    }
    const base: Base = { rollout: payload.rollout, seq: payload.seq, step: payload.step };
    const log = o.logger.child({ job: job.id, step: payload.step, rollout: payload.rollout });
    if (job.deferredFailure) {
      // BullMQ hands out a parent whose child failed (failParentOnFailure) or a job that stalled
      // too often, marked with a deferred failure: it is failed here without running (a normal
      // Worker does the same before calling its processor).
      await this.#fail(job, base, scError('SC_ERR_STEP_FAILED', `not run: ${job.deferredFailure}`), true);
      return;
    }
    // The journal, not the transport, says whether this host already ran or started this job.
    const digest = stepPayloadDigest(payload);
    let adm: Awaited<ReturnType<Journal['admit']>>;
    try {
      adm = await this.#journal.admit(payload, job.id, digest);
    } catch (err) {
      const e = toScError(err);
      log.error({ err: e.message }, 'cannot read the journal; leaving the job for a retry');
      await this.#fail(job, base, e, false);
      return;
    }
    if (adm.kind === 'replayed') {
      await this.#refuse(job, scError('SC_ERR_JOB_REPLAYED', adm.reason, { reason: 'replayed' }));
      return;
    }
    if (adm.kind === 'out-of-order') {
      await this.#refuse(job, scError('SC_ERR_JOB_REJECTED', adm.reason, { reason: 'out-of-order' }));
      return;
    }
    try {
      // A job this host started before a crash or reboot (by its own journal) is finished even if
      // it expired meanwhile: its expiry is checked as of its first start. Anything else by now.
      checkStepExpiry(payload, adm.kind === 'readopt' ? adm.since : o.now());
    } catch (err) {
      await this.#refuse(job, toScError(err));
      return;
    }
    if (adm.kind === 'readopt') log.info('resuming a step this host started and did not finish');
    o.crashPoint(`${payload.step}:before`);
    if (await t.abortRequested(payload.rollout)) {
      await this.#fail(job, base, scError('SC_ERR_ABORTED', `rollout ${payload.rollout} was aborted; stopped before ${payload.step}`), true);
      await this.#journal.end(payload).catch((err) => log.warn({ err: (err as Error).message }, 'journal write failed'));
      await this.#setState({ state: 'aborted', rollout: payload.rollout, step: payload.step });
      return;
    }
    try {
      await this.#journal.begin(payload, job.id, digest);
    } catch (err) {
      const e = toScError(err);
      log.error({ err: e.message }, 'cannot write the journal; the step does not start');
      await this.#fail(job, base, e, false);
      return;
    }
    const step = o.steps[payload.step];
    await this.#setState({ state: 'running', rollout: payload.rollout, step: payload.step });
    await t.event(job, { ...base, event: 'started', message: `attempt ${job.attemptsMade + 1}` });
    log.info({ attempt: job.attemptsMade + 1 }, 'step started');

    const progress = throttleProgress(t, job, base, o.progressIntervalMs);
    const ctx: StepContext = {
      hostId: o.hostId,
      payload,
      driver: o.driver,
      trusted: o.keys.trusted,
      identities: o.keys.identities,
      stages: o.stages,
      origin: o.origin,
      agentFiles: o.agentFiles,
      signal: abort.signal,
      logger: log,
      log: async (line) => {
        log.info(line);
        await t.log(job, line);
      },
      progress: progress.report,
      reboot: async () => {
        progress.flush();
        await this.#setState({ state: 'rebooting', rollout: payload.rollout, step: payload.step });
        await t.event(job, { ...base, event: 'rebooting' });
        log.info('rebooting');
        return o.driver.reboot();
      },
      crashPoint: o.crashPoint,
      now: o.now,
    };

    let result: Record<string, unknown>;
    try {
      result = await runStep(step, ctx, abort);
    } catch (err) {
      progress.stop();
      if (err instanceof RebootSignal) throw err;
      if (this.#stopping) {
        log.info('stopped during the step; the job stays active and runs again at the next start');
        return;
      }
      if (abort.signal.aborted && isScError(abort.signal.reason, 'SC_ERR_CONFLICT')) {
        log.error('the job lock was lost; leaving the job to its new holder');
        return;
      }
      const e = toScError(err);
      log.warn({ code: e.code, err: e.message }, 'step failed');
      const permanent = isPermanent(e);
      // Failed for good (by the host's own count, not the transport's): no job of this rollout
      // runs here again (a rescue runs under its own id).
      await this.#journal.failed(payload, job.id, digest, permanent, STEP_JOB_OPTS.attempts).catch((x) => log.warn({ err: (x as Error).message }, 'journal write failed'));
      await this.#fail(job, base, e, permanent);
      await this.#setState({ state: 'failed', rollout: payload.rollout, step: payload.step });
      return;
    }
    progress.stop();
    progress.flush();
    // Only the job's completion is left: should the host die before the journal hears of it,
    // the next step is let in (the queue hands it out only once this job completed).
    await this.#journal.ran(payload, job.id, digest).catch((err) => log.error({ err: (err as Error).message }, 'journal write failed'));
    // The idle registration (with what the machine now runs) rides along with the completion in
    // relay mode; in direct mode it is written right after it.
    this.#state = { state: 'idle', rollout: payload.rollout, step: payload.step };
    const facts = await this.#facts().catch(() => null);
    const reg: Partial<HostRecord> = facts ? { ...this.#state, ...facts } : { ...this.#state };
    if (t.kind === 'relay') await t.update(reg);
    try {
      await t.complete(job, result, { ...base, event: 'completed', message: typeof result.reason === 'string' ? `already done: ${result.reason}` : undefined });
    } catch (err) {
      log.error({ err: (err as Error).message }, 'could not complete the job (lock lost?); it will run again and find its effect in place');
      return;
    }
    // Should this write be lost (a crash right here), the next step is still taken: the journal
    // accepts the step after the one it saw run to its end.
    await this.#journal.finish(payload).catch((err) => log.error({ err: (err as Error).message }, 'journal write failed'));
    log.info({ skipped: result.skipped === true }, 'step completed');
    o.crashPoint(`${payload.step}:after`);
    if (t.kind === 'direct') await t.update(reg).catch((err) => log.warn({ err: (err as Error).message }, 'registration update failed'));
  }

  /** Fails a job that did not pass verification: never retried, nothing touched. */
  async #refuse(job: StepJob, e: ScError): Promise<void> {
    const d = (job.data ?? {}) as { payload?: Partial<StepPayload> };
    const p = d.payload && typeof d.payload === 'object' ? d.payload : {};
    const str = (v: unknown, n: number) => (typeof v === 'string' ? v.slice(0, n) : '');
    const base = { rollout: str(p.rollout, 64), seq: typeof p.seq === 'number' ? p.seq : -1, step: str(p.step, 40) || job.name.slice(0, 40) };
    this.#opts.logger.warn({ job: job.id, reason: e.details?.reason, err: e.message }, 'job refused');
    await this.#transport.fail(job, e, true, { ...base, event: 'refused', code: e.code, message: e.message });
    await this.#setState({ state: 'refused', rollout: base.rollout || null, step: base.step || null });
  }

  async #fail(job: StepJob, base: Base, e: ScError, permanent: boolean): Promise<void> {
    const r: ReportFields = { ...base, event: 'failed', code: e.code, message: e.message };
    await this.#transport.fail(job, e, permanent, r);
  }
}

function isScError(v: unknown, code: string): boolean {
  return (v as { code?: string })?.code === code;
}
