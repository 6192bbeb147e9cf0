/**
 * The rollout engine. Every rollout's spec (selection, plan, concrete waves), its status (state,
 * wave cursor, phase, counters), its preheat progress and every host's step states live in
 * Redis; memory holds a write-through copy of the active ones. The engine is one loop that can be
 * stopped and started at any time:
 *
 * 1. read step reports from the agents' reports stream with ONE connection (XREADGROUP in the
 *    consumer group `control`: a restarted control first re-reads what it had read but not
 *    acknowledged, then continues with new entries);
 * 2. apply them to host states, advance waves (preheat → rolling → bake), start hosts within
 *    the in-flight limits, enforce the failure budget, and run pending side effects;
 * 3. persist every change in one MULTI, and only then XACK the reports.
 *
 * Side effects are idempotent and driven by persisted intents: a host is first marked `queued`
 * (persisted), then its signed sequence is enqueued with deterministic job ids
 * (`<rollout>.<seq>.<step>`), so a crash between the two re-enqueues nothing twice. When any
 * Redis write fails, the in-memory copy is dropped and reloaded, and unacknowledged reports are
 * read again (applying a report twice is harmless). A reconcile pass compares in-flight hosts
 * with BullMQ's own job records, so a report lost with a Redis crash cannot stall a rollout.
 *
 * Run one control per Redis keyspace (prefix); a second one would compete for the same state.
 */
import { EventEmitter } from 'node:events';
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import type { KeyObject } from 'node:crypto';
import type { Redis } from 'ioredis';
import {
  type AgentProducer,
  type BundleRef,
  CONVERT_STEPS,
  decodeReport,
  installOtherSequence,
  keys,
  POINT_OF_NO_RETURN,
  reinstallSequence,
  requestAbort,
  rescueSequence,
  type SequenceStep,
  type StepReport,
} from '../../shared/protocol/index.js';
import type { ReadClient } from '../origin/client.js';
import { StageClient } from '../stage/client.js';
import { type ErrorCode, ERRORS, isScError, scError } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import { type Manifest, manifestDigest, verifyManifest } from '../../shared/manifest.js';
import { HOST_ID_RE } from '../../shared/protocol/index.js';
import { parseRef } from '../../shared/names.js';
import type { Inventory } from './inventory.js';
import { type CreateRolloutRequest, type Plan, planWaves, resolveBudget } from './plan.js';
import { codeInReason, type JobOutcome, jobLogTail, jobOutcomes, stepJobId } from './queues.js';

/** Report events that settle a step: believed only when the step's BullMQ job agrees. */
const FINAL_EVENTS: readonly string[] = ['completed', 'failed', 'refused'];

/** The error code of a confirmed failure report: the host's, else the one in BullMQ's reason. */
function failCode(rep: StepReport, o?: JobOutcome): string {
  return rep.code ?? codeInReason(o?.failedReason) ?? (rep.event === 'refused' ? 'SC_ERR_JOB_REJECTED' : 'SC_ERR_STEP_FAILED');
}

function failMessage(rep: StepReport, o?: JobOutcome): string {
  return rep.message ?? o?.failedReason ?? rep.event;
}

/** Where a host is in a rollout. */
export type HostStatus = 'pending' | 'queued' | 'running' | 'converted' | 'failed' | 'aborted' | 'skipped';
/** Statuses after which nothing more happens to the host in this rollout. */
export const TERMINAL_HOST: readonly HostStatus[] = ['converted', 'failed', 'aborted', 'skipped'];
/** Statuses that count against maxInFlight. */
export const IN_FLIGHT_HOST: readonly HostStatus[] = ['queued', 'running'];

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
  abortRequested?: boolean;
  queuedAt: number | null;
  startedAt: number | null;
  finishedAt: number | null;
  lastEventAt: number | null;
  error: { step: string; seq: number; code: string; message: string } | null;
  /** Set when a failure past the point of no return sent the host back to B. */
  rescue: { state: 'queued' | 'running' | 'done' | 'failed'; enqueued: boolean; at: number; error?: string } | null;
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
  steps: string[];
  step: string | null;
  seq: number;
  error: { step: string; code: string; message: string } | null;
  finishedAt: number | null;
  log: string[];
}

interface Active {
  spec: RolloutSpec;
  status: RolloutStatus;
  preheat: Record<string, PreheatColo>;
  hosts: Map<string, HostState>;
  lastPreheatPoll: number;
  lastReconcile: number;
}

/** Everything the engine needs. */
export interface EngineDeps {
  redis: Redis;
  /** A dedicated connection for the blocking XREADGROUP (maxRetriesPerRequest: null). */
  readerRedis: Redis;
  prefix: string;
  producer: AgentProducer;
  inventory: Inventory;
  origin: ReadClient;
  trustKeys: KeyObject[];
  stageToken: string | null;
  consumer: string;
  tickMs: number;
  preheatTimeoutMs: number;
  jobTtlMs: number;
  /** In-flight hosts silent for this long fail with SC_ERR_TIMEOUT (0: never). */
  hostTimeoutMs?: number;
  log: Logger;
  now?: () => number;
}

const GROUP = 'control';
const LEASE_MS = 15_000;
/** Extends the lease when we hold it, takes it back when it expired (e.g. a long Redis outage), else 0. */
const RENEW_LEASE = `local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0`;
const RELEASE_LEASE = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`;
const LOG_TAIL = 20;
const RECONCILE_MS = 2000;
const PONR_SEQ = CONVERT_STEPS.indexOf(POINT_OF_NO_RETURN as (typeof CONVERT_STEPS)[number]);
const LAST_SEQ = CONVERT_STEPS.length - 1;

/**
 * The id a rollout's rescue sequences run under: not the rollout's own id, so that an abort of
 * the rollout (the agents' abort flag names the rollout id) never stops a rescue.
 */
export function rescueRunId(rollout: string): string {
  return `${rollout}-rescue`;
}

function newId(kind: 'r' | 'op', now: number): string {
  return `${kind}-${now.toString(36)}-${randomBytes(3).toString('hex')}`;
}

function emptyCounts(): Counts {
  return { pending: 0, queued: 0, running: 0, converted: 0, failed: 0, aborted: 0, skipped: 0, inFlight: 0, rescued: 0 };
}

function isRedisError(err: unknown): boolean {
  const e = err as { name?: string; message?: string } | null;
  return !!e && (/Redis|MaxRetriesPerRequest/.test(e.name ?? '') || /Connection is closed|ECONNREFUSED|ECONNRESET|NOPERM|READONLY|LOADING/.test(e.message ?? ''));
}

function refString(r: BundleRef): string {
  return `${r.name}@${r.version}`;
}

/**
 * The rollout engine (see the module comment). All state changes run one at a time through an
 * internal queue, so API writes and report batches never interleave.
 */
export class RolloutEngine extends EventEmitter {
  readonly #d: EngineDeps;
  readonly #k: ReturnType<typeof keys>;
  readonly #now: () => number;
  readonly #active = new Map<string, Active>();
  readonly #ops = new Map<string, HostOp>();
  readonly #dirtyHosts = new Map<string, Set<string>>();
  readonly #dirtyRollouts = new Set<string>();
  readonly #dirtyOps = new Set<string>();
  #chain: Promise<unknown> = Promise.resolve();
  #reportsApplied = 0;
  readonly #instance = `${hostname()}:${process.pid}:${randomBytes(4).toString('hex')}`;
  #leaseTimer: NodeJS.Timeout | null = null;
  #needLoad = true;
  #readPending = true;
  #stopped = true;
  #loop: Promise<void> | null = null;

  constructor(deps: EngineDeps) {
    super();
    this.#d = deps;
    this.#k = keys(deps.prefix);
    this.#now = deps.now ?? Date.now;
  }

  #key(...parts: string[]): string {
    return [this.#d.prefix, 'control', ...parts].join(':');
  }

  // ---------------------------------------------------------------- lifecycle

  /** Creates the consumer group if needed, loads active rollouts and starts the loop. */
  async start(): Promise<void> {
    await this.#acquireLease();
    try {
      await this.#ensureGroup();
      await this.#exclusive(() => this.#load());
    } catch (err) {
      await this.#releaseLease().catch(() => {});
      throw err;
    }
    this.#stopped = false;
    this.#loop = this.#run();
    this.#leaseTimer = setInterval(() => void this.#renewLease(), LEASE_MS / 3);
    this.#leaseTimer.unref();
  }

  /** Stops the loop (in-flight work finishes) and releases the lease; state stays in Redis. */
  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#leaseTimer) clearInterval(this.#leaseTimer);
    this.#d.readerRedis.disconnect();
    await this.#loop;
    await this.#chain.catch(() => {});
    await this.#releaseLease().catch(() => {});
  }

  // One engine per prefix: a lease key (`P:control:lease`, TTL LEASE_MS, renewed every third of
  // it). A second instance refuses to start while the lease is held; an instance that finds its
  // lease taken by another stops its loop and emits `lease-lost` (the CLI then exits, systemd
  // restarts it, and it waits for the lease).

  async #acquireLease(): Promise<void> {
    const k = this.#key('lease');
    if ((await this.#d.redis.set(k, this.#instance, 'PX', LEASE_MS, 'NX')) === 'OK') return;
    const [holder, ttl] = await Promise.all([this.#d.redis.get(k), this.#d.redis.pttl(k)]);
    throw scError('SC_ERR_CONFLICT', `another control instance (${holder}) runs on prefix ${this.#d.prefix}; its lease expires in ${Math.ceil(Math.max(ttl, 0) / 1000)} s`, {
      holder,
    });
  }

  async #renewLease(): Promise<void> {
    if (this.#stopped) return;
    let r: unknown;
    try {
      r = await this.#d.redis.eval(RENEW_LEASE, 1, this.#key('lease'), this.#instance, String(LEASE_MS));
    } catch (err) {
      this.#d.log.warn({ err: (err as Error).message }, 'lease renewal failed; retrying');
      return;
    }
    if (r === 0 && !this.#stopped) {
      this.#d.log.error({ prefix: this.#d.prefix }, 'another control instance took the lease; stopping the engine');
      this.#stopped = true;
      if (this.#leaseTimer) clearInterval(this.#leaseTimer);
      this.#d.readerRedis.disconnect();
      this.emit('lease-lost');
    }
  }

  async #releaseLease(): Promise<void> {
    await this.#d.redis.eval(RELEASE_LEASE, 1, this.#key('lease'), this.#instance);
  }

  async #ensureGroup(): Promise<void> {
    try {
      await this.#d.redis.xgroup('CREATE', this.#k.reports, GROUP, '0', 'MKSTREAM');
    } catch (err) {
      if (!/BUSYGROUP/.test((err as Error).message)) throw err;
    }
  }

  #exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.#chain.then(async () => {
      if (this.#needLoad) await this.#load();
      try {
        return await fn();
      } catch (err) {
        // Memory may now differ from Redis: drop it and reload before the next change.
        if (!isScError(err) || isRedisError(err)) this.#needLoad = true;
        throw err;
      }
    });
    this.#chain = p.catch(() => {});
    return p;
  }

  async #run(): Promise<void> {
    let backoff = 100;
    while (!this.#stopped) {
      try {
        const entries = await this.#readReports();
        if (this.#stopped) break;
        await this.#exclusive(async () => {
          const reps: StepReport[] = [];
          for (const [, fields] of entries) {
            if (!fields) continue;
            this.#reportsApplied++;
            try {
              reps.push(decodeReport(fields));
            } catch (err) {
              this.#d.log.warn({ err }, 'ignoring a malformed report');
            }
          }
          const outcomes = await this.#finalOutcomes(reps);
          for (const rep of reps) {
            try {
              this.#applyReport(rep, outcomes.get(rep));
            } catch (err) {
              this.#d.log.warn({ err }, 'ignoring a malformed report');
            }
          }
          await this.#tickAll();
          await this.#flush();
        });
        if (entries.length) await this.#d.redis.xack(this.#k.reports, GROUP, ...entries.map(([id]) => id));
        backoff = 100;
      } catch (err) {
        if (this.#stopped) break;
        this.#d.log.warn({ err: (err as Error).message }, 'engine step failed; retrying');
        this.#needLoad = true;
        this.#readPending = true;
        if (/NOGROUP/.test((err as Error).message)) await this.#ensureGroup().catch(() => {});
        await new Promise((r) => setTimeout(r, backoff));
        backoff = Math.min(backoff * 2, 2000);
      }
    }
  }

  /** Reads reports: first our own unacknowledged ones, then new ones (blocking up to one tick). */
  async #readReports(): Promise<[string, string[]][]> {
    const r = this.#d.readerRedis;
    if (this.#readPending) {
      const res = (await r.xreadgroup('GROUP', GROUP, this.#d.consumer, 'COUNT', 500, 'STREAMS', this.#k.reports, '0')) as
        | [string, [string, string[]][]][]
        | null;
      const entries = res?.[0]?.[1] ?? [];
      // Entries trimmed from the stream come back with null fields: they are acknowledged unread.
      if (entries.length > 0) return entries;
      this.#readPending = false;
    }
    const res = (await r.xreadgroup(
      'GROUP',
      GROUP,
      this.#d.consumer,
      'COUNT',
      500,
      'BLOCK',
      this.#d.tickMs,
      'STREAMS',
      this.#k.reports,
      '>',
    )) as [string, [string, string[]][]][] | null;
    return res?.[0]?.[1] ?? [];
  }

  // ---------------------------------------------------------------- persistence

  async #load(): Promise<void> {
    const redis = this.#d.redis;
    const ids = await redis.smembers(this.#key('active'));
    const opIds = await redis.smembers(this.#key('ops', 'active'));
    const loaded = new Map<string, Active>();
    for (const id of ids) {
      const a = await this.#read(id);
      if (a) loaded.set(id, { ...a, hosts: new Map(a.hosts.map((h) => [h.host, h])), lastPreheatPoll: 0, lastReconcile: 0 });
    }
    const ops = new Map<string, HostOp>();
    for (const id of opIds) {
      const raw = await redis.hget(this.#key('op', id), 'op');
      if (raw) ops.set(id, JSON.parse(raw) as HostOp);
    }
    this.#active.clear();
    for (const [k, v] of loaded) this.#active.set(k, v);
    this.#ops.clear();
    for (const [k, v] of ops) this.#ops.set(k, v);
    this.#dirtyHosts.clear();
    this.#dirtyRollouts.clear();
    this.#dirtyOps.clear();
    this.#needLoad = false;
  }

  async #read(id: string): Promise<(RolloutView & { hosts: HostState[] }) | null> {
    const [meta, hosts] = await Promise.all([this.#d.redis.hgetall(this.#key('r', id)), this.#d.redis.hgetall(this.#key('r', id, 'hosts'))]);
    if (!meta?.spec || !meta.status) return null;
    return {
      spec: JSON.parse(meta.spec) as RolloutSpec,
      status: JSON.parse(meta.status) as RolloutStatus,
      preheat: JSON.parse(meta.preheat ?? '{}') as Record<string, PreheatColo>,
      hosts: Object.values(hosts).map((v) => JSON.parse(v) as HostState),
    };
  }

  #touchHost(a: Active, h: HostState): void {
    let s = this.#dirtyHosts.get(a.spec.id);
    if (!s) {
      s = new Set();
      this.#dirtyHosts.set(a.spec.id, s);
    }
    s.add(h.host);
    this.#dirtyRollouts.add(a.spec.id);
  }

  async #flush(): Promise<void> {
    if (this.#dirtyRollouts.size === 0 && this.#dirtyOps.size === 0) return;
    const m = this.#d.redis.multi();
    const now = this.#now();
    const changed: string[] = [];
    for (const id of this.#dirtyRollouts) {
      const a = this.#active.get(id);
      if (!a) continue;
      a.status.counts = this.#counts(a);
      a.status.updatedAt = now;
      m.hset(this.#key('r', id), 'status', JSON.stringify(a.status), 'preheat', JSON.stringify(a.preheat));
      const hs = this.#dirtyHosts.get(id);
      if (hs && hs.size > 0) {
        const args: string[] = [];
        for (const h of hs) args.push(h, JSON.stringify(a.hosts.get(h)));
        m.hset(this.#key('r', id, 'hosts'), ...args);
      }
      if (FINISHED_ROLLOUT.includes(a.status.state)) m.srem(this.#key('active'), id);
      changed.push(id);
    }
    for (const id of this.#dirtyOps) {
      const op = this.#ops.get(id);
      if (!op) continue;
      m.hset(this.#key('op', id), 'op', JSON.stringify(op));
      if (op.status === 'done' || op.status === 'failed') m.srem(this.#key('ops', 'active'), id);
    }
    const opsChanged = [...this.#dirtyOps];
    await m.exec();
    this.#dirtyRollouts.clear();
    this.#dirtyHosts.clear();
    this.#dirtyOps.clear();
    for (const id of changed) {
      const a = this.#active.get(id);
      if (a && FINISHED_ROLLOUT.includes(a.status.state)) this.#active.delete(id);
      this.emit('change', { kind: 'rollout', id });
    }
    for (const id of opsChanged) {
      const op = this.#ops.get(id);
      if (op && (op.status === 'done' || op.status === 'failed')) this.#ops.delete(id);
      this.emit('change', { kind: 'op', id });
    }
  }

  #counts(a: Active): Counts {
    const c = emptyCounts();
    for (const h of a.hosts.values()) {
      c[h.status]++;
      if (IN_FLIGHT_HOST.includes(h.status)) c.inFlight++;
      if (h.rescue?.state === 'done') c.rescued++;
    }
    return c;
  }

  // ---------------------------------------------------------------- reports

  #logLine(list: string[], rep: StepReport): void {
    const t = new Date(rep.ts || this.#now()).toISOString().slice(11, 19);
    const extra = [rep.code, rep.message].filter(Boolean).join(': ');
    list.push(`${t} ${rep.step} ${rep.event}${extra ? ` ${extra}` : ''}`.slice(0, 500));
    if (list.length > LOG_TAIL) list.splice(0, list.length - LOG_TAIL);
  }

  /** The host, rollout or operation a report is about, if control is following it. */
  #target(rep: StepReport): { a: Active; h: HostState; rescue: boolean } | { op: HostOp } | null {
    if (!rep || typeof rep.rollout !== 'string' || typeof rep.host !== 'string') return null;
    const rescue = rep.rollout.endsWith('-rescue');
    const a = this.#active.get(rescue ? rep.rollout.slice(0, -'-rescue'.length) : rep.rollout);
    if (a) {
      const h = a.hosts.get(rep.host);
      return h ? { a, h, rescue } : null;
    }
    const op = this.#ops.get(rep.rollout);
    return op && op.host === rep.host ? { op } : null;
  }

  /**
   * What BullMQ says about the job of every final report (completed, failed, refused) of a
   * followed host, in one round trip. Anyone who can write the reports stream (every agent in
   * direct mode, every relay) can write a report naming any host: a final report is believed only
   * when the named host's own job agrees (see #confirmed).
   */
  async #finalOutcomes(reps: StepReport[]): Promise<Map<StepReport, JobOutcome>> {
    const out = new Map<StepReport, JobOutcome>();
    const todo = reps.filter((r) => FINAL_EVENTS.includes(r?.event) && Number.isSafeInteger(r.seq) && typeof r.step === 'string' && this.#target(r));
    if (todo.length === 0) return out;
    const res = await jobOutcomes(
      this.#d.redis,
      this.#d.prefix,
      todo.map((r) => ({ host: r.host, jobId: stepJobId(r.rollout, r.seq, r.step) })),
    );
    for (const [i, r] of todo.entries()) out.set(r, res[i]);
    return out;
  }

  /**
   * True when the BullMQ job a final report names is in the state it claims, reached under the
   * lock the host holds: completed by the host's lock holder, or failed (by its lock holder, or by
   * BullMQ itself, which fails a parent whose child failed without anyone taking it).
   */
  #confirmed(rep: StepReport, o: JobOutcome | undefined): boolean {
    if (o && rep.event === 'completed') return o.state === 'completed' && o.byHost;
    if (o && (rep.event === 'failed' || rep.event === 'refused')) return o.state === 'failed';
    return false;
  }

  /**
   * Applies one report. `outcome` is BullMQ's view of the job of a final report (#finalOutcomes):
   * an unconfirmed `completed` or `refused` changes nothing, an unconfirmed `failed` only marks
   * the step as retrying (not a final state).
   */
  #applyReport(rep: StepReport, outcome?: JobOutcome): void {
    const t = this.#target(rep);
    if (!t) return;
    const final = FINAL_EVENTS.includes(rep.event);
    const confirmed = final && this.#confirmed(rep, outcome);
    if (final && !confirmed && rep.event !== 'failed') {
      this.#d.log.warn({ host: rep.host, rollout: rep.rollout, step: rep.step, event: rep.event }, 'ignoring a final report its BullMQ job does not confirm');
      return;
    }
    if ('op' in t) {
      this.#applyOpReport(t.op, rep, confirmed, outcome);
      return;
    }
    const { a, h } = t;
    h.lastEventAt = this.#now();
    if (t.rescue) {
      if (h.rescue) this.#applyRescueReport(h, rep, confirmed, outcome);
    } else this.#applyHostReport(a, h, rep, confirmed, outcome);
    this.#touchHost(a, h);
  }

  #applyHostReport(a: Active, h: HostState, rep: StepReport, confirmed: boolean, outcome?: JobOutcome): void {
    if (TERMINAL_HOST.includes(h.status)) return;
    const ts = rep.ts || this.#now();
    if (rep.event !== 'progress') this.#logLine(h.log, rep);
    h.steps[rep.step] ??= { state: 'running' };
    const st = h.steps[rep.step];
    switch (rep.event) {
      case 'started':
        h.status = 'running';
        h.startedAt ??= ts;
        h.step = rep.step;
        h.seq = rep.seq;
        st.state = 'running';
        st.startedAt ??= ts;
        break;
      case 'progress':
        if (typeof rep.percent === 'number') st.percent = rep.percent;
        if (typeof rep.bytes === 'number') st.bytes = rep.bytes;
        break;
      case 'rebooting':
        st.note = 'rebooting';
        break;
      case 'completed':
        st.state = 'completed';
        st.finishedAt = ts;
        st.percent = 100;
        h.step = rep.step;
        h.seq = rep.seq;
        if (rep.seq >= LAST_SEQ) {
          h.status = 'converted';
          h.finishedAt = ts;
        }
        break;
      case 'failed':
      case 'refused':
        st.state = 'retrying';
        h.step = rep.step;
        h.seq = rep.seq;
        // Final only when BullMQ moved the job to its failed set (else it is being retried).
        if (confirmed) this.#hostFailed(a, h, rep.step, rep.seq, failCode(rep, outcome), failMessage(rep, outcome), ts);
        break;
      default:
        break;
    }
  }

  #applyRescueReport(h: HostState, rep: StepReport, confirmed: boolean, outcome?: JobOutcome): void {
    const r = h.rescue!;
    if (rep.event !== 'progress') this.#logLine(h.log, rep);
    if (rep.event === 'started' && r.state === 'queued') r.state = 'running';
    else if (rep.event === 'completed') r.state = 'done';
    else if ((rep.event === 'failed' || rep.event === 'refused') && confirmed) {
      r.state = 'failed';
      r.error = `${failCode(rep, outcome)}: ${failMessage(rep, outcome)}`.slice(0, 500);
    }
  }

  #applyOpReport(op: HostOp, rep: StepReport, confirmed: boolean, outcome?: JobOutcome): void {
    if (op.status === 'done' || op.status === 'failed') return;
    if (rep.event !== 'progress') this.#logLine(op.log, rep);
    if (rep.event === 'started') {
      op.status = 'running';
      op.step = rep.step;
      op.seq = rep.seq;
    } else if (rep.event === 'completed') {
      op.step = rep.step;
      op.seq = rep.seq;
      if (rep.seq >= op.steps.length - 1) {
        op.status = 'done';
        op.finishedAt = rep.ts || this.#now();
      }
    } else if ((rep.event === 'failed' || rep.event === 'refused') && confirmed) {
      this.#opFailed(op, rep.step, failCode(rep, outcome), failMessage(rep, outcome), rep.ts);
    }
    this.#dirtyOps.add(op.id);
  }

  /**
   * A host's sequence failed for good. Past the point of no return (a step after commit-base)
   * the host is sent back to B with the rescue sequence, never left on a half-written disk 1.
   */
  #hostFailed(a: Active, h: HostState, step: string, seq: number, code: string, message: string, ts = this.#now()): void {
    if (TERMINAL_HOST.includes(h.status)) return;
    h.steps[step] ??= { state: 'failed' };
    const st = h.steps[step];
    st.state = 'failed';
    st.finishedAt = ts;
    h.finishedAt = ts;
    h.error = { step, seq, code, message: message.slice(0, 1000) };
    if (code === 'SC_ERR_ABORTED') {
      h.status = 'aborted';
    } else {
      h.status = 'failed';
      if (seq > PONR_SEQ && !h.rescue) h.rescue = { state: 'queued', enqueued: false, at: ts };
    }
    this.#touchHost(a, h);
  }

  #opFailed(op: HostOp, step: string, code: string, message: string, ts = this.#now()): void {
    if (op.status === 'done' || op.status === 'failed') return;
    op.status = 'failed';
    op.error = { step, code, message: message.slice(0, 1000) };
    op.finishedAt = ts;
    this.#dirtyOps.add(op.id);
  }

  // ---------------------------------------------------------------- the tick

  async #tickAll(): Promise<void> {
    for (const a of [...this.#active.values()]) {
      try {
        await this.#tick(a);
      } catch (err) {
        if (isRedisError(err)) throw err;
        this.#d.log.error({ err, rollout: a.spec.id }, 'rollout tick failed');
      }
    }
    for (const op of [...this.#ops.values()]) await this.#tickOp(op);
  }

  async #tick(a: Active): Promise<void> {
    const now = this.#now();
    const s = a.status;
    if (FINISHED_ROLLOUT.includes(s.state)) return;
    await this.#enqueuePending(a);
    await this.#reconcile(a, now);

    if (s.state === 'aborting') {
      for (const h of a.hosts.values()) {
        if (h.status === 'pending') {
          h.status = 'skipped';
          this.#touchHost(a, h);
        } else if (IN_FLIGHT_HOST.includes(h.status) && !h.abortRequested) {
          await requestAbort(this.#d.redis, this.#d.prefix, h.host, a.spec.id);
          h.abortRequested = true;
          this.#touchHost(a, h);
        }
      }
      if (!this.#busy(a)) this.#finish(a, 'aborted', now);
      return;
    }

    // A host in flight that has said nothing for too long (a dead machine) fails, so that it
    // cannot hold its wave forever. Past the point of no return it gets the rescue sequence.
    const silentMs = this.#d.hostTimeoutMs ?? 0;
    if (silentMs > 0) {
      for (const h of a.hosts.values()) {
        if (!IN_FLIGHT_HOST.includes(h.status)) continue;
        const since = h.lastEventAt ?? h.queuedAt ?? now;
        if (now - since > silentMs) {
          this.#hostFailed(a, h, h.step ?? CONVERT_STEPS[0], h.seq, 'SC_ERR_TIMEOUT', `no report from the host for ${Math.round((now - since) / 1000)} s`, now);
          // Should the agent come back, it stops at its next step boundary instead of going on.
          await requestAbort(this.#d.redis, this.#d.prefix, h.host, a.spec.id);
        }
      }
    }

    // The failure budget: failures since the last resume beyond the budget pause the rollout.
    const failed = [...a.hosts.values()].filter((h) => h.status === 'failed').length;
    if (s.state === 'running' && failed - s.failuresAtResume > a.spec.budget) this.#pause(a, 'failure-budget', now);

    if (s.state === 'running') await this.#advance(a, now);

    const hs = [...a.hosts.values()];
    if (s.state !== 'running' || s.phase === 'done') {
      if (hs.every((h) => h.status !== 'pending') && !this.#busy(a) && (s.state === 'paused' || s.phase === 'done')) {
        this.#finish(a, hs.every((h) => h.status === 'converted') ? 'completed' : 'failed', now);
      }
    }
  }

  /** True while a host of the rollout is in flight or being rescued. */
  #busy(a: Active): boolean {
    for (const h of a.hosts.values()) {
      if (IN_FLIGHT_HOST.includes(h.status)) return true;
      if (h.rescue && (h.rescue.state === 'queued' || h.rescue.state === 'running')) return true;
    }
    return false;
  }

  #setPhase(a: Active, phase: RolloutStatus['phase'], now: number): void {
    a.status.phase = phase;
    a.status.phaseSince = now;
    this.#dirtyRollouts.add(a.spec.id);
  }

  async #advance(a: Active, now: number): Promise<void> {
    const s = a.status;
    const waveHosts = () => a.spec.waves[s.wave].map((id) => a.hosts.get(id)!);
    if (s.phase === 'preheat') {
      if (await this.#preheat(a, now)) this.#setPhase(a, 'rolling', now);
      else return;
    }
    if (s.phase === 'rolling') {
      this.#startHosts(a, waveHosts(), now);
      const hs = waveHosts();
      if (!hs.every((h) => TERMINAL_HOST.includes(h.status))) return;
      if (s.wave === 0 && a.spec.plan.canary > 0 && !s.canaryAccepted && hs.some((h) => h.status !== 'converted')) {
        this.#pause(a, 'canary-failed', now);
        return;
      }
      if (s.wave >= a.spec.waves.length - 1) {
        this.#setPhase(a, 'done', now);
        return;
      }
      s.bakeUntil = now + a.spec.plan.bakeSeconds * 1000;
      this.#setPhase(a, 'bake', now);
    }
    if (s.phase === 'bake' && now >= (s.bakeUntil ?? 0)) {
      s.wave++;
      s.bakeUntil = null;
      this.#setPhase(a, 'preheat', now);
      await this.#advance(a, now);
    }
  }

  /** Marks pending hosts of the wave `queued` within the global and per-colo in-flight limits. */
  #startHosts(a: Active, wave: HostState[], now: number): void {
    let inFlight = 0;
    const perColo = new Map<string, number>();
    for (const h of a.hosts.values()) {
      if (!IN_FLIGHT_HOST.includes(h.status)) continue;
      inFlight++;
      perColo.set(h.colo, (perColo.get(h.colo) ?? 0) + 1);
    }
    for (const h of wave) {
      if (inFlight >= a.spec.plan.maxInFlight) break;
      if (h.status !== 'pending') continue;
      if ((perColo.get(h.colo) ?? 0) >= a.spec.plan.maxInFlightPerColo) continue;
      h.status = 'queued';
      h.queuedAt = now;
      h.enqueued = false;
      inFlight++;
      perColo.set(h.colo, (perColo.get(h.colo) ?? 0) + 1);
      this.#touchHost(a, h);
    }
  }

  /** Runs the persisted intents: enqueue sequences of queued hosts and rescues. */
  async #enqueuePending(a: Active): Promise<void> {
    const ttlMs = this.#d.jobTtlMs;
    const todo: Promise<void>[] = [];
    for (const h of a.hosts.values()) {
      if (h.status === 'queued' && !h.enqueued) {
        todo.push(
          this.#d.producer.enqueueSequence(h.host, a.spec.id, this.#convertSteps(a.spec), { ttlMs, now: this.#now() }).then(() => {
            h.enqueued = true;
            this.#touchHost(a, h);
          }),
        );
      }
      if (h.rescue && h.rescue.state === 'queued' && !h.rescue.enqueued) {
        const r = h.rescue;
        todo.push(
          this.#d.producer.enqueueSequence(h.host, rescueRunId(a.spec.id), rescueSequence(), { ttlMs, now: this.#now() }).then(() => {
            r.enqueued = true;
            this.#logLine(h.log, { host: h.host, rollout: a.spec.id, seq: 0, step: 'rescue', event: 'queued', ts: this.#now() });
            this.#touchHost(a, h);
          }),
        );
      }
      if (todo.length >= 50) await Promise.all(todo.splice(0));
    }
    await Promise.all(todo);
  }

  #convertSteps(spec: RolloutSpec): SequenceStep[] {
    return CONVERT_STEPS.map((step) => ({ step, args: { base: spec.base, target: spec.target } }));
  }

  /**
   * The backstop: for in-flight hosts without news for a while, read BullMQ's record of their
   * current step and of their last step, and settle what a lost report would have told.
   */
  async #reconcile(a: Active, now: number): Promise<void> {
    if (now - a.lastReconcile < RECONCILE_MS) return;
    a.lastReconcile = now;
    const hs = [...a.hosts.values()].filter(
      (h) =>
        ((IN_FLIGHT_HOST.includes(h.status) && h.enqueued) || (h.rescue?.enqueued && (h.rescue.state === 'queued' || h.rescue.state === 'running'))) &&
        now - (h.lastEventAt ?? h.queuedAt ?? 0) >= RECONCILE_MS,
    );
    if (hs.length === 0) return;
    const jobs: { host: string; jobId: string }[] = [];
    for (const h of hs) {
      if (IN_FLIGHT_HOST.includes(h.status)) {
        const seq = h.status === 'queued' ? 0 : h.seq;
        jobs.push({ host: h.host, jobId: stepJobId(a.spec.id, seq, CONVERT_STEPS[seq]) });
        jobs.push({ host: h.host, jobId: stepJobId(a.spec.id, LAST_SEQ, CONVERT_STEPS[LAST_SEQ]) });
      } else {
        jobs.push({ host: h.host, jobId: stepJobId(rescueRunId(a.spec.id), 0, 'rescue') });
        jobs.push({ host: h.host, jobId: stepJobId(rescueRunId(a.spec.id), 0, 'rescue') });
      }
    }
    const out = await jobOutcomes(this.#d.redis, this.#d.prefix, jobs);
    hs.forEach((h, i) => {
      const cur = out[i * 2];
      const last = out[i * 2 + 1];
      if (!IN_FLIGHT_HOST.includes(h.status)) {
        if (cur.state === 'completed' && cur.byHost) h.rescue!.state = 'done';
        else if (cur.state === 'failed') {
          h.rescue!.state = 'failed';
          h.rescue!.error = cur.failedReason?.slice(0, 500);
        } else return;
        this.#touchHost(a, h);
        return;
      }
      const seq = h.status === 'queued' ? 0 : h.seq;
      if (last.state === 'completed' && last.byHost) {
        h.status = 'converted';
        h.finishedAt = now;
        h.step = CONVERT_STEPS[LAST_SEQ];
        h.seq = LAST_SEQ;
        this.#touchHost(a, h);
      } else if (cur.state === 'failed') {
        const code = codeInReason(cur.failedReason) ?? 'SC_ERR_STEP_FAILED';
        this.#hostFailed(a, h, CONVERT_STEPS[seq], seq, code, cur.failedReason ?? 'step failed', now);
      } else if (cur.state === 'completed' && cur.byHost && seq < LAST_SEQ) {
        // The next step's reports were lost: move the cursor on; the next pass looks at it.
        h.steps[CONVERT_STEPS[seq]] = { ...h.steps[CONVERT_STEPS[seq]], state: 'completed' };
        h.status = 'running';
        h.seq = seq + 1;
        h.step = CONVERT_STEPS[seq + 1];
        this.#touchHost(a, h);
      }
    });
  }

  async #tickOp(op: HostOp): Promise<void> {
    if (op.status === 'done' || op.status === 'failed') return;
    if (!op.enqueued) {
      await this.#d.producer.enqueueSequence(op.host, op.id, this.#opSteps(op), { ttlMs: this.#d.jobTtlMs, now: this.#now() });
      op.enqueued = true;
      this.#dirtyOps.add(op.id);
      return;
    }
    const lastSeq = op.steps.length - 1;
    const [cur, last] = await jobOutcomes(this.#d.redis, this.#d.prefix, [
      { host: op.host, jobId: stepJobId(op.id, op.seq, op.steps[op.seq]) },
      { host: op.host, jobId: stepJobId(op.id, lastSeq, op.steps[lastSeq]) },
    ]);
    if (last.state === 'completed' && last.byHost) {
      op.status = 'done';
      op.finishedAt = this.#now();
      this.#dirtyOps.add(op.id);
    } else if (cur.state === 'failed') {
      this.#opFailed(op, op.steps[op.seq], codeInReason(cur.failedReason) ?? 'SC_ERR_STEP_FAILED', cur.failedReason ?? 'step failed');
    }
  }

  #opSteps(op: HostOp): SequenceStep[] {
    if (op.kind === 'rescue') return rescueSequence();
    if (op.kind === 'reinstall') return reinstallSequence();
    return installOtherSequence(parseRef(op.bundle!));
  }

  // ---------------------------------------------------------------- preheat

  /** Starts and follows preheat of the current wave's colos; true once every one is settled. */
  async #preheat(a: Active, now: number): Promise<boolean> {
    const wave = a.status.wave;
    const colos = [...new Set(a.spec.waves[wave].map((id) => a.hosts.get(id)!.colo))];
    const digests = [a.spec.blobs.base, a.spec.blobs.target];
    const token = this.#d.stageToken;
    // New colos of this wave start their prefetches concurrently (a dead stage costs one timeout).
    const fresh = colos.filter((c) => !a.preheat[c]);
    const started = await Promise.all(
      fresh.map(async (colo): Promise<PreheatColo> => {
        // Only the stages control's own configuration names: never a URL a host registered.
        const stages = this.#d.inventory.stagesOf(colo);
        const p: PreheatColo = { colo, wave, state: 'filling', startedAt: now, finishedAt: null, stages: [] };
        if (!token) return { ...p, state: 'skipped', reason: 'no stage token configured', finishedAt: now };
        if (stages.length === 0) return { ...p, state: 'skipped', reason: 'no stage configured for this colo (--stages)', finishedAt: now };
        p.stages = await Promise.all(
          stages.map(async (url) => {
            const st: PreheatColo['stages'][number] = { url, state: 'filling', digests: {} };
            try {
              const r = await new StageClient(url, { timeoutMs: 5000 }).prefetch(digests, token);
              for (const f of r.fills) st.digests[f.digest] = { state: f.state };
            } catch (err) {
              st.state = 'failed';
              st.error = `${(err as { code?: string }).code ?? 'error'}: ${(err as Error).message}`.slice(0, 300);
            }
            return st;
          }),
        );
        return p;
      }),
    );
    for (const p of started) a.preheat[p.colo] = p;
    if (started.length > 0) {
      this.#dirtyRollouts.add(a.spec.id);
      a.lastPreheatPoll = now;
    }
    const open = colos.map((c) => a.preheat[c]).filter((p) => p.state === 'filling');
    if (open.length > 0 && now - a.lastPreheatPoll >= Math.max(this.#d.tickMs, 250)) {
      a.lastPreheatPoll = now;
      await Promise.all(open.map((p) => this.#pollPreheat(p, digests, now)));
      this.#dirtyRollouts.add(a.spec.id);
    }
    for (const p of open) {
      if (p.state === 'filling' && now - p.startedAt > this.#d.preheatTimeoutMs) {
        p.state = 'timeout';
        p.finishedAt = now;
      }
    }
    return colos.every((c) => a.preheat[c].state !== 'filling');
  }

  async #pollPreheat(p: PreheatColo, digests: string[], now: number): Promise<void> {
    // A preheat state restored from Redis may name a stage that is no longer configured: it is
    // given up, never contacted.
    for (const s of p.stages) {
      if (s.state === 'filling' && !this.#d.inventory.isConfiguredStage(p.colo, s.url)) {
        s.state = 'failed';
        s.error = 'not a configured stage of this colo (--stages): not contacted';
      }
    }
    await Promise.all(
      p.stages
        .filter((s) => s.state === 'filling')
        .map(async (s) => {
          const client = new StageClient(s.url, { timeoutMs: 5000 });
          try {
            const fills = await client.fills();
            for (const d of digests) {
              const f = fills.find((x) => x.digest === d);
              if (f) s.digests[d] = { state: f.state, bytes: f.bytes, size: f.size };
              else if (s.digests[d]?.state !== 'committed') {
                // Not (or no longer) listed: ask again; a cached blob answers `committed`.
                const r = await client.prefetch([d], this.#d.stageToken!);
                s.digests[d] = { state: r.fills[0]?.state ?? 'filling' };
              }
            }
          } catch (err) {
            s.error = `${(err as { code?: string }).code ?? 'error'}: ${(err as Error).message}`.slice(0, 300);
          }
          const states = digests.map((d) => s.digests[d]?.state);
          if (states.every((x) => x === 'committed')) s.state = 'done';
          else if (states.every((x) => x === 'committed' || x === 'failed' || x === 'gone')) s.state = 'failed';
        }),
    );
    if (p.stages.every((s) => s.state !== 'filling')) {
      p.state = p.stages.every((s) => s.state === 'done') ? 'done' : 'failed';
      p.finishedAt = now;
    }
  }

  // ---------------------------------------------------------------- state changes

  #pause(a: Active, reason: string, now: number): void {
    a.status.state = 'paused';
    a.status.pauseReason = reason;
    a.status.updatedAt = now;
    this.#dirtyRollouts.add(a.spec.id);
    this.#d.log.info({ rollout: a.spec.id, reason }, 'rollout paused');
  }

  #finish(a: Active, state: RolloutState, now: number): void {
    a.status.state = state;
    a.status.phase = 'done';
    a.status.finishedAt = now;
    this.#dirtyRollouts.add(a.spec.id);
    this.#d.log.info({ rollout: a.spec.id, state }, 'rollout finished');
  }

  /** The active rollout `id`; SC_ERR_NOT_FOUND when there is no such rollout, SC_ERR_CONFLICT when it is finished. */
  async #mustActive(id: string): Promise<Active> {
    const a = this.#active.get(id);
    if (a) return a;
    const r = /^r-[a-z0-9-]{1,60}$/.test(id) ? await this.#read(id) : null;
    if (!r) throw scError('SC_ERR_NOT_FOUND', `no rollout ${id}`, { rollout: id });
    throw scError('SC_ERR_CONFLICT', `rollout ${id} is ${r.status.state}`, { rollout: id, state: r.status.state });
  }

  /** Hosts held by an active rollout (not yet terminal) or an active host operation. */
  #busyHosts(): Map<string, string> {
    const m = new Map<string, string>();
    for (const a of this.#active.values()) {
      for (const h of a.hosts.values()) {
        if (!TERMINAL_HOST.includes(h.status) || (h.rescue && (h.rescue.state === 'queued' || h.rescue.state === 'running'))) m.set(h.host, a.spec.id);
      }
    }
    for (const op of this.#ops.values()) m.set(op.host, op.id);
    return m;
  }

  async #exists(id: string): Promise<boolean> {
    return (await this.#d.redis.zscore(this.#key('rollouts'), id)) !== null;
  }

  /** Fetches and checks a manifest: exists, verifies with the trust keys (if any), has `role`. */
  async #manifest(ref: BundleRef, role: 'base' | 'target', what: string): Promise<Manifest> {
    const rec = await this.#d.origin.findManifest(ref.name, ref.version).catch((err) => {
      throw isScError(err) && ERRORS[err.code as ErrorCode] ? err : scError('SC_ERR_UPSTREAM', `origin: ${(err as Error).message}`);
    });
    if (!rec) throw scError('SC_ERR_MANIFEST_NOT_FOUND', `${what} ${refString(ref)} is not published at the origin`, { [what]: refString(ref) });
    if (this.#d.trustKeys.length > 0) verifyManifest(rec.manifest, this.#d.trustKeys);
    if (rec.manifest.role !== role) {
      throw scError('SC_ERR_BAD_REQUEST', `${what} ${refString(ref)} has role ${rec.manifest.role}, expected ${role}`, { [what]: refString(ref) });
    }
    return rec.manifest;
  }

  // ---------------------------------------------------------------- public API

  /**
   * Accepts a rollout: both manifests must exist at the origin, verify (with trust keys) and
   * have the right roles; every selected host must be registered and not held by another
   * active rollout or host operation. Throws SC_ERR_MANIFEST_NOT_FOUND, SC_ERR_UNTRUSTED_KEY,
   * SC_ERR_BAD_SIGNATURE, SC_ERR_BAD_REQUEST (unknown hosts/colos, wrong roles), SC_ERR_CONFLICT.
   */
  async create(req: CreateRolloutRequest, actor: string): Promise<RolloutView> {
    const base = parseRef(req.base);
    const target = parseRef(req.target);
    const [mb, mt] = await Promise.all([this.#manifest(base, 'base', 'base'), this.#manifest(target, 'target', 'target')]);
    // Fresh, not the 250 ms dashboard cache: a host that registered just now must be selectable.
    const records = await this.#d.inventory.records({ fresh: true });
    const byId = new Map(records.map((r) => [r.hostId, r]));
    let selected: { host: string; colo: string }[];
    if (req.hosts) {
      const unknown = req.hosts.filter((h) => !byId.has(h));
      if (unknown.length) throw scError('SC_ERR_BAD_REQUEST', `unknown hosts: ${unknown.slice(0, 20).join(', ')}`, { unknownHosts: unknown.slice(0, 100) });
      selected = req.hosts.map((h) => ({ host: h, colo: byId.get(h)!.colo }));
    } else {
      const colos = req.colos!;
      const unknown = colos.filter((c) => !records.some((r) => r.colo === c));
      if (unknown.length) throw scError('SC_ERR_BAD_REQUEST', `no registered hosts in colos: ${unknown.join(', ')}`, { unknownColos: unknown });
      selected = records.filter((r) => colos.includes(r.colo)).map((r) => ({ host: r.hostId, colo: r.colo }));
    }
    return this.#exclusive(async () => {
      const busy = this.#busyHosts();
      const clash = selected.filter((s) => busy.has(s.host));
      if (clash.length) {
        throw scError('SC_ERR_CONFLICT', `hosts already in work: ${clash.slice(0, 10).map((c) => `${c.host} (${busy.get(c.host)})`).join(', ')}`, {
          hosts: clash.slice(0, 100).map((c) => c.host),
        });
      }
      const now = this.#now();
      let id = newId('r', now);
      while (await this.#exists(id)) id = newId('r', now);
      const plan = { ...req.plan, maxInFlightPerColo: req.plan.maxInFlightPerColo ?? req.plan.maxInFlight };
      const waves = planWaves(selected, plan);
      const spec: RolloutSpec = {
        id,
        createdAt: now,
        actor,
        base,
        target,
        blobs: { base: mb.blob.digest, target: mt.blob.digest },
        manifests: { base: manifestDigest(mb), target: manifestDigest(mt) },
        selector: req.hosts ? { hosts: req.hosts } : { colos: req.colos },
        plan,
        waves,
        budget: resolveBudget(plan, selected.length),
        hostCount: selected.length,
      };
      const colo = new Map(selected.map((s) => [s.host, s.colo]));
      const hosts = new Map<string, HostState>();
      waves.forEach((w, wi) => {
        for (const host of w) {
          hosts.set(host, {
            host,
            colo: colo.get(host)!,
            wave: wi,
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
          });
        }
      });
      const status: RolloutStatus = {
        state: 'running',
        pauseReason: null,
        wave: 0,
        phase: 'preheat',
        phaseSince: now,
        bakeUntil: null,
        failuresAtResume: 0,
        canaryAccepted: false,
        counts: { ...emptyCounts(), pending: selected.length },
        updatedAt: now,
        finishedAt: null,
      };
      const m = this.#d.redis.multi();
      m.hset(this.#key('r', id), 'spec', JSON.stringify(spec), 'status', JSON.stringify(status), 'preheat', '{}');
      const args: string[] = [];
      for (const [h, st] of hosts) args.push(h, JSON.stringify(st));
      m.hset(this.#key('r', id, 'hosts'), ...args);
      m.zadd(this.#key('rollouts'), now, id);
      m.sadd(this.#key('active'), id);
      await m.exec();
      const a: Active = { spec, status, preheat: {}, hosts, lastPreheatPoll: 0, lastReconcile: now };
      this.#active.set(id, a);
      this.#d.log.info({ rollout: id, hosts: selected.length, waves: waves.length }, 'rollout accepted');
      try {
        await this.#tick(a);
        await this.#flush();
      } catch (err) {
        this.#needLoad = true;
        this.#d.log.warn({ err, rollout: id }, 'first tick failed; the loop retries');
      }
      return this.#view(a, true);
    });
  }

  /** Pauses a running rollout: no new host starts; hosts in flight go on. SC_ERR_CONFLICT otherwise. */
  pause(id: string): Promise<RolloutView> {
    return this.#exclusive(async () => {
      const a = await this.#mustActive(id);
      if (a.status.state !== 'running') throw scError('SC_ERR_CONFLICT', `rollout ${id} is ${a.status.state}`, { state: a.status.state });
      this.#pause(a, 'operator', this.#now());
      await this.#flush();
      return this.#view(a, false);
    });
  }

  /**
   * Resumes a paused rollout. Failed hosts stay failed; the budget counts failures from now on;
   * after a canary failure, the next waves start. SC_ERR_CONFLICT unless paused.
   */
  resume(id: string): Promise<RolloutView> {
    return this.#exclusive(async () => {
      const a = await this.#mustActive(id);
      if (a.status.state !== 'paused') throw scError('SC_ERR_CONFLICT', `rollout ${id} is ${a.status.state}`, { state: a.status.state });
      if (a.status.pauseReason === 'canary-failed') a.status.canaryAccepted = true;
      a.status.state = 'running';
      a.status.pauseReason = null;
      a.status.failuresAtResume = [...a.hosts.values()].filter((h) => h.status === 'failed').length;
      this.#dirtyRollouts.add(id);
      await this.#tick(a);
      await this.#flush();
      return this.#view(a, false);
    });
  }

  /**
   * Aborts: no new host starts; hosts in flight are asked to stop at their next step boundary
   * (they finish the step they are in). The rollout becomes `aborted` once none is in flight.
   */
  abort(id: string): Promise<RolloutView> {
    return this.#exclusive(async () => {
      const a = await this.#mustActive(id);
      if (a.status.state === 'aborting') return this.#view(a, false);
      a.status.state = 'aborting';
      a.status.pauseReason = null;
      this.#dirtyRollouts.add(id);
      await this.#tick(a);
      await this.#flush();
      return this.#view(a, false);
    });
  }

  /** Starts a rescue, reinstall or install (`bundle` = NAME@VERSION of a target) on one registered host. */
  async hostOp(host: string, kind: HostOp['kind'], actor: string, bundle?: string): Promise<HostOp> {
    if (!HOST_ID_RE.test(host)) throw scError('SC_ERR_BAD_NAME', 'bad host id', { host: host.slice(0, 80) });
    let ref: BundleRef | null = null;
    if (kind === 'install') {
      if (typeof bundle !== 'string') throw scError('SC_ERR_BAD_REQUEST', 'install needs {"bundle": "NAME@VERSION"}');
      ref = parseRef(bundle);
      await this.#manifest(ref, 'target', 'bundle');
    }
    const records = await this.#d.inventory.records();
    if (!records.some((r) => r.hostId === host)) throw scError('SC_ERR_NOT_FOUND', `host ${host} is not registered`, { host });
    return this.#exclusive(async () => {
      const busy = this.#busyHosts().get(host);
      if (busy) throw scError('SC_ERR_CONFLICT', `host ${host} is held by ${busy}`, { host, by: busy });
      const now = this.#now();
      const op: HostOp = {
        id: newId('op', now),
        kind,
        host,
        bundle: ref ? refString(ref) : null,
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
      op.steps = this.#opSteps(op).map((s) => s.step);
      await this.#d.redis
        .multi()
        .hset(this.#key('op', op.id), 'op', JSON.stringify(op))
        .zadd(this.#key('ops'), now, op.id)
        .sadd(this.#key('ops', 'active'), op.id)
        .exec();
      this.#ops.set(op.id, op);
      await this.#tickOp(op);
      await this.#flush();
      return { ...op };
    });
  }

  /** One host operation, or SC_ERR_NOT_FOUND. */
  async getOp(id: string): Promise<HostOp> {
    const m = this.#ops.get(id);
    if (m) return { ...m };
    if (!/^op-[a-z0-9-]{1,60}$/.test(id)) throw scError('SC_ERR_NOT_FOUND', 'no such operation');
    const raw = await this.#d.redis.hget(this.#key('op', id), 'op');
    if (!raw) throw scError('SC_ERR_NOT_FOUND', `no operation ${id}`);
    return JSON.parse(raw) as HostOp;
  }

  /** The newest host operations (newest first). */
  async listOps(limit = 50): Promise<HostOp[]> {
    const ids = await this.#d.redis.zrevrange(this.#key('ops'), 0, Math.max(0, Math.min(limit, 500) - 1));
    return Promise.all(ids.map((id) => this.getOp(id)));
  }

  #view(a: Active, withHosts: boolean): RolloutView {
    const status = { ...a.status, counts: this.#counts(a) };
    return structuredClone({ spec: a.spec, status, preheat: a.preheat, ...(withHosts ? { hosts: [...a.hosts.values()] } : {}) });
  }

  /**
   * One rollout with its hosts (in wave order). With `logs`, failed hosts carry the BullMQ log
   * tail of their failed step (`jobLog`). SC_ERR_NOT_FOUND when unknown.
   */
  async get(id: string, opts: { logs?: boolean } = {}): Promise<RolloutView & { hosts: HostState[] }> {
    let v: RolloutView & { hosts: HostState[] };
    const a = this.#active.get(id);
    if (a) v = this.#view(a, true) as RolloutView & { hosts: HostState[] };
    else {
      if (!/^r-[a-z0-9-]{1,60}$/.test(id)) throw scError('SC_ERR_NOT_FOUND', 'no such rollout');
      const r = await this.#read(id);
      if (!r) throw scError('SC_ERR_NOT_FOUND', `no rollout ${id}`);
      const order = new Map(r.spec.waves.flat().map((h, i) => [h, i]));
      r.hosts.sort((x, y) => (order.get(x.host) ?? 0) - (order.get(y.host) ?? 0));
      v = r;
    }
    if (opts.logs) {
      await Promise.all(
        v.hosts
          .filter((h) => h.error)
          .map(async (h) => {
            h.jobLog = await jobLogTail(this.#d.redis, this.#d.prefix, h.host, stepJobId(id, h.error!.seq, h.error!.step)).catch(() => []);
          }),
      );
    }
    return v;
  }

  /** Rollouts, newest first, without hosts. */
  async list(limit = 50): Promise<RolloutView[]> {
    const ids = await this.#d.redis.zrevrange(this.#key('rollouts'), 0, Math.max(0, Math.min(limit, 500) - 1));
    const out: RolloutView[] = [];
    for (const id of ids) {
      const a = this.#active.get(id);
      if (a) {
        out.push(this.#view(a, false));
        continue;
      }
      const meta = await this.#d.redis.hmget(this.#key('r', id), 'spec', 'status', 'preheat');
      if (!meta[0] || !meta[1]) continue;
      out.push({ spec: JSON.parse(meta[0]), status: JSON.parse(meta[1]), preheat: JSON.parse(meta[2] ?? '{}') });
    }
    return out;
  }

  /** What control is doing with a host right now (active rollout or operation), if anything. */
  workOf(host: string): { kind: 'rollout' | 'op'; id: string; status: string; step: string | null } | null {
    for (const a of this.#active.values()) {
      const h = a.hosts.get(host);
      if (h && (!TERMINAL_HOST.includes(h.status) || h.rescue?.state === 'running' || h.rescue?.state === 'queued')) {
        return { kind: 'rollout', id: a.spec.id, status: h.rescue && TERMINAL_HOST.includes(h.status) ? `rescue-${h.rescue.state}` : h.status, step: h.step };
      }
    }
    for (const op of this.#ops.values()) if (op.host === host) return { kind: 'op', id: op.id, status: op.status, step: op.step };
    return null;
  }

  /** Numbers for /metrics: reports read, and hosts of active rollouts by status. */
  stats(): { reportsApplied: number; hosts: Counts } {
    const hosts = emptyCounts();
    for (const a of this.#active.values()) {
      const c = this.#counts(a);
      for (const k of Object.keys(hosts) as (keyof Counts)[]) hosts[k] += c[k];
    }
    return { reportsApplied: this.#reportsApplied, hosts };
  }

  /** Active rollout ids (for tests and the dashboard). */
  activeIds(): string[] {
    return [...this.#active.keys()];
  }
}
