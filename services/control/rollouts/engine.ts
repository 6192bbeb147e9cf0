/**
 * Owns the rollout engine's loop: it feeds reports and time into the pure parts (host-reducer.ts,
 * waves.ts) and carries out what they decide. Every rollout's spec (selection, plan, concrete
 * waves), its status (state, wave cursor, phase, counters), its preheat progress and every host's
 * step states live in Redis; memory holds a write-through copy of the active ones (store.ts). The
 * loop can be stopped and started at any time:
 *
 * 1. read step reports from every source's report stream with ONE connection (report-stream.ts:
 *    woken by the report bell, XREADGROUP in a consumer group `control` per stream; a restarted
 *    control first re-reads what it had read but not acknowledged, then continues with new
 *    entries);
 * 2. apply them to host states, advance waves (preheat → rolling → bake), start hosts within
 *    the in-flight limits, enforce the failure budget, and run pending side effects;
 * 3. persist every change in one MULTI, and only then XACK the reports.
 *
 * Side effects are idempotent and driven by persisted intents: a host is first marked `queued`
 * (persisted), then its signed sequence is enqueued with deterministic job ids
 * (`<rollout>.<seq>.<step>`), so a crash between the two re-enqueues nothing twice. When any
 * Redis write fails, the in-memory copy is dropped and reloaded, and unacknowledged reports are
 * read again (applying a report twice is harmless). A reconcile pass compares in-flight hosts
 * with BullMQ's own job records (reconcile.ts), so a report lost with a Redis crash cannot stall
 * a rollout. Run one control per Redis keyspace (prefix): the leader lease (lease.ts) enforces it.
 */
import { EventEmitter } from 'node:events';
import type { KeyObject } from 'node:crypto';
import type { Redis } from 'ioredis';
import { type AgentProducer, type BundleRef, HOST_ID_RE, requestAbort, type StepReport } from '../../../shared/protocol/index.js';
import { isScError, scError } from '../../../shared/errors.js';
import type { Logger } from '../../../shared/log.js';
import { parseRef } from '../../../shared/names.js';
import type { ReadClient } from '../../origin/client.js';
import type { Inventory } from '../inventory.js';
import type { CreateRolloutRequest } from '../plan.js';
import type { JobOutcome } from '../queues.js';
import { checkManifest, newRollout, selectHosts } from './admission.js';
import { getOp, listOps, newOp, tickOp } from './host-ops.js';
import { applyOpReport, applyReport, isIgnoredFinal } from './host-reducer.js';
import { LeaderLease } from './lease.js';
import { type ActiveRollout, type Counts, FINISHED_ROLLOUT, type HostOp, type HostResult, type HostState, type HostWork, newId, type RolloutView, enqueuedRoute } from './model.js';
import { runPreheat } from './preheat.js';
import { enqueuePending, reconcileRollout } from './reconcile.js';
import { finalOutcomes, ReportStream } from './report-stream.js';
import { RolloutStore } from './store.js';
import { activeHostCounts, getRollout, heldHosts, listRollouts, viewOf, workOf } from './views.js';
import { advance, applyWaveIntent, type WaveIntent } from './waves.js';

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
  /**
   * Shortest time between two passes of the loop (ms, default 0): reports that arrive meanwhile
   * are applied together in the next pass, so a busy fleet costs one pass (waves, persistence)
   * per batch instead of one per report.
   */
  passMs?: number;
  preheatTimeoutMs: number;
  jobTtlMs: number;
  /** In-flight hosts silent for this long fail with SC_ERR_TIMEOUT (0: never). */
  hostTimeoutMs?: number;
  log: Logger;
  now?: () => number;
}

function isRedisError(err: unknown): boolean {
  const e = err as { name?: string; message?: string } | null;
  return !!e && (/Redis|MaxRetriesPerRequest/.test(e.name ?? '') || /Connection is closed|ECONNREFUSED|ECONNRESET|NOPERM|READONLY|LOADING/.test(e.message ?? ''));
}

/**
 * The rollout engine (see the module comment). All state changes run one at a time through an
 * internal queue, so API writes and report batches never interleave. Emits `change`
 * ({kind, id}) after each persisted change and `lease-lost` when another instance took over.
 */
export class RolloutEngine extends EventEmitter {
  readonly #deps: EngineDeps;
  readonly #now: () => number;
  readonly #store: RolloutStore;
  readonly #lease: LeaderLease;
  readonly #reports: ReportStream;
  /** Enqueueing and BullMQ lookups, as reconcile.ts and host-ops.ts take them. */
  readonly #jobs: { redis: Redis; prefix: string; producer: AgentProducer; jobTtlMs: number; now: () => number };
  #chain: Promise<unknown> = Promise.resolve();
  #reportsApplied = 0;
  #needLoad = true;
  #stopped = true;
  #loop: Promise<void> | null = null;

  constructor(deps: EngineDeps) {
    super();
    this.#deps = deps;
    this.#now = deps.now ?? Date.now;
    this.#store = new RolloutStore({ redis: deps.redis, prefix: deps.prefix, now: this.#now, onChange: (c) => this.emit('change', c) });
    this.#lease = new LeaderLease({ redis: deps.redis, prefix: deps.prefix, log: deps.log });
    this.#reports = new ReportStream({
      redis: deps.redis,
      readerRedis: deps.readerRedis,
      prefix: deps.prefix,
      consumer: deps.consumer,
      blockMs: deps.tickMs,
      log: deps.log,
    });
    this.#jobs = { redis: deps.redis, prefix: deps.prefix, producer: deps.producer, jobTtlMs: deps.jobTtlMs, now: this.#now };
  }

  // ---------------------------------------------------------------- lifecycle

  /** Takes the lease (SC_ERR_CONFLICT if held), creates the consumer group if needed, loads active rollouts and starts the loop. */
  async start(): Promise<void> {
    await this.#lease.acquire();
    try {
      await this.#reports.ensureGroup();
      await this.#exclusive(() => this.#load());
    } catch (err) {
      await this.#lease.release().catch(() => {});
      throw err;
    }
    this.#stopped = false;
    this.#loop = this.#run();
    this.#lease.keep(() => this.#leaseLost());
  }

  /** Stops the loop (in-flight work finishes) and releases the lease; state stays in Redis. */
  async stop(): Promise<void> {
    this.#stopped = true;
    this.#lease.stopRenewing();
    this.#deps.readerRedis.disconnect();
    await this.#loop;
    await this.#chain.catch(() => {});
    await this.#lease.release().catch(() => {});
  }

  #leaseLost(): void {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#deps.readerRedis.disconnect();
    this.emit('lease-lost');
  }

  async #load(): Promise<void> {
    await this.#store.load();
    this.#needLoad = false;
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
    let lastPass = 0;
    while (!this.#stopped) {
      try {
        const wait = (this.#deps.passMs ?? 0) - (Date.now() - lastPass);
        if (wait > 0) await new Promise((r) => setTimeout(r, wait));
        if (this.#stopped) break;
        const entries = await this.#reports.read();
        lastPass = Date.now();
        if (this.#stopped) break;
        await this.#exclusive(async () => {
          this.#reportsApplied += entries.filter(([, fields]) => fields).length;
          const reps = await this.#reports.decode(entries);
          const outcomes = await finalOutcomes(this.#deps.redis, this.#deps.prefix, reps, (r) => {
            const t = this.#store.target(r);
            if (!t) return false;
            // A sequence is looked up in the queue it was put in, once it was.
            return { route: enqueuedRoute('op' in t ? t.op : t.rescue ? t.host.rescue : t.host) };
          });
          for (const rep of reps) {
            try {
              this.#applyReport(rep, outcomes.get(rep));
            } catch (err) {
              this.#deps.log.warn({ err }, 'ignoring a malformed report');
            }
          }
          await this.#tickAll();
          await this.#store.flush();
        });
        await this.#reports.ack(entries);
        backoff = 100;
      } catch (err) {
        if (this.#stopped) break;
        this.#deps.log.warn({ err: (err as Error).message }, 'engine step failed; retrying');
        this.#needLoad = true;
        this.#reports.rewind();
        if (/NOGROUP/.test((err as Error).message)) await this.#reports.ensureGroup().catch(() => {});
        await new Promise((r) => setTimeout(r, backoff));
        backoff = Math.min(backoff * 2, 2000);
      }
    }
  }

  /** Applies one report to the host or operation it names (host-reducer.ts), if control follows it. */
  #applyReport(rep: StepReport, outcome?: JobOutcome): void {
    const t = this.#store.target(rep);
    if (!t) return;
    if (isIgnoredFinal(rep, outcome)) {
      this.#deps.log.warn({ host: rep.host, rollout: rep.rollout, step: rep.step, event: rep.event }, 'ignoring a final report its BullMQ job does not confirm');
      return;
    }
    const now = this.#now();
    if ('op' in t) {
      const next = applyOpReport(t.op, rep, { now, outcome });
      if (next === t.op) return;
      this.#store.ops.set(next.id, next);
      this.#store.touchOp(next.id);
      return;
    }
    t.rollout.hosts.set(t.host.host, applyReport(t.host, rep, { now, outcome, rescue: t.rescue }));
    if (rep.event === 'progress') this.#store.touchProgress(t.rollout, t.host.host);
    else this.#store.touchHost(t.rollout, t.host.host);
  }

  // ---------------------------------------------------------------- the tick

  async #tickAll(): Promise<void> {
    for (const a of [...this.#store.active.values()]) {
      try {
        await this.#tick(a);
      } catch (err) {
        if (isRedisError(err)) throw err;
        this.#deps.log.error({ err, rollout: a.spec.id }, 'rollout tick failed');
      }
    }
    for (const op of [...this.#store.ops.values()]) await tickOp(op, this.#jobs, this.#store);
  }

  /** One pass over a rollout: pending enqueues, reconcile, then the scheduler's intents. */
  async #tick(a: ActiveRollout): Promise<void> {
    const now = this.#now();
    if (FINISHED_ROLLOUT.includes(a.status.state)) return;
    await enqueuePending(a, this.#jobs, this.#store);
    await reconcileRollout(a, now, this.#jobs, this.#store);
    // A preheat intent ends the scheduler's answer: carry it out, then ask again, so that a wave
    // whose preheat settles starts in the same tick. Each wave is preheated at most once a tick.
    const preheated = new Set<number>();
    for (;;) {
      let again = false;
      for (const intent of advance(a, a.hosts, now, { hostTimeoutMs: this.#deps.hostTimeoutMs })) {
        if (intent.kind !== 'preheat') await this.#carryOut(a, intent, now);
        else if (!preheated.has(intent.wave)) {
          preheated.add(intent.wave);
          const r = await runPreheat(a, intent.wave, intent.colos, now, this.#deps);
          if (r.changed) this.#store.touchPreheat(a.spec.id);
          again = true;
        }
      }
      if (!again) return;
    }
  }

  /** Carries out one of the scheduler's intents (waves.ts): its I/O, its state change, marks and logs. */
  async #carryOut(a: ActiveRollout, intent: Exclude<WaveIntent, { kind: 'preheat' }>, now: number): Promise<void> {
    if (intent.kind === 'request-abort') await requestAbort(this.#deps.redis, this.#deps.prefix, intent.host, a.spec.id);
    applyWaveIntent(a, intent, now);
    if ('host' in intent) this.#store.touchHost(a, intent.host);
    else this.#store.touchRollout(a.spec.id);
    // Should a timed-out agent come back, it stops at its next step boundary instead of going on.
    if (intent.kind === 'time-out-host') await requestAbort(this.#deps.redis, this.#deps.prefix, intent.host, a.spec.id);
    if (intent.kind === 'pause-rollout') this.#deps.log.info({ rollout: a.spec.id, reason: intent.reason }, 'rollout paused');
    if (intent.kind === 'finish-rollout') this.#deps.log.info({ rollout: a.spec.id, state: intent.state }, 'rollout finished');
  }

  /** The active rollout `id`; SC_ERR_NOT_FOUND when there is no such rollout, SC_ERR_CONFLICT when it is finished. */
  async #mustActive(id: string): Promise<ActiveRollout> {
    const a = this.#store.active.get(id);
    if (a) return a;
    const r = /^r-[a-z0-9-]{1,60}$/.test(id) ? await this.#store.read(id) : null;
    if (!r) throw scError('SC_ERR_NOT_FOUND', `no rollout ${id}`, { rollout: id });
    throw scError('SC_ERR_CONFLICT', `rollout ${id} is ${r.status.state}`, { rollout: id, state: r.status.state });
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
    const [mb, mt] = await Promise.all([checkManifest(this.#deps, base, 'base', 'base'), checkManifest(this.#deps, target, 'target', 'target')]);
    const selected = await selectHosts(this.#deps.inventory, req);
    return this.#exclusive(async () => {
      const busy = heldHosts(this.#store);
      const clash = selected.filter((s) => busy.has(s.host));
      if (clash.length) {
        throw scError('SC_ERR_CONFLICT', `hosts already in work: ${clash.slice(0, 10).map((c) => `${c.host} (${busy.get(c.host)})`).join(', ')}`, {
          hosts: clash.slice(0, 100).map((c) => c.host),
        });
      }
      const now = this.#now();
      let id = newId('r', now);
      while (await this.#store.exists(id)) id = newId('r', now);
      const a = newRollout({ id, req, selected, base: { ref: base, manifest: mb }, target: { ref: target, manifest: mt }, actor, now });
      await this.#store.insertRollout(a);
      this.#deps.log.info({ rollout: id, hosts: selected.length, waves: a.spec.waves.length }, 'rollout accepted');
      try {
        await this.#tick(a);
        await this.#store.flush();
      } catch (err) {
        this.#needLoad = true;
        this.#deps.log.warn({ err, rollout: id }, 'first tick failed; the loop retries');
      }
      return viewOf(a, true);
    });
  }

  /** Pauses a running rollout: no new host starts; hosts in flight go on. SC_ERR_CONFLICT otherwise. */
  pause(id: string): Promise<RolloutView> {
    return this.#exclusive(async () => {
      const a = await this.#mustActive(id);
      if (a.status.state !== 'running') throw scError('SC_ERR_CONFLICT', `rollout ${id} is ${a.status.state}`, { state: a.status.state });
      await this.#carryOut(a, { kind: 'pause-rollout', reason: 'operator' }, this.#now());
      await this.#store.flush();
      return viewOf(a, false);
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
      a.status.failuresAtResume = a.hosts.count('failed');
      this.#store.touchRollout(id);
      await this.#tick(a);
      await this.#store.flush();
      return viewOf(a, false);
    });
  }

  /**
   * Aborts: no new host starts; hosts in flight are asked to stop at their next step boundary
   * (they finish the step they are in). The rollout becomes `aborted` once none is in flight.
   */
  abort(id: string): Promise<RolloutView> {
    return this.#exclusive(async () => {
      const a = await this.#mustActive(id);
      if (a.status.state === 'aborting') return viewOf(a, false);
      a.status.state = 'aborting';
      a.status.pauseReason = null;
      this.#store.touchRollout(id);
      await this.#tick(a);
      await this.#store.flush();
      return viewOf(a, false);
    });
  }

  /** Starts a rescue, reinstall or install (`bundle` = NAME@VERSION of a target) on one registered host. */
  async hostOp(host: string, kind: HostOp['kind'], actor: string, bundle?: string): Promise<HostOp> {
    if (!HOST_ID_RE.test(host)) throw scError('SC_ERR_BAD_NAME', 'bad host id', { host: host.slice(0, 80) });
    let ref: BundleRef | null = null;
    if (kind === 'install') {
      if (typeof bundle !== 'string') throw scError('SC_ERR_BAD_REQUEST', 'install needs {"bundle": "NAME@VERSION"}');
      ref = parseRef(bundle);
      await checkManifest(this.#deps, ref, 'target', 'bundle');
    }
    const records = await this.#deps.inventory.records();
    if (!records.some((r) => r.hostId === host)) throw scError('SC_ERR_NOT_FOUND', `host ${host} is not registered`, { host });
    return this.#exclusive(async () => {
      const busy = heldHosts(this.#store).get(host);
      if (busy) throw scError('SC_ERR_CONFLICT', `host ${host} is held by ${busy}`, { host, by: busy });
      const now = this.#now();
      const op = newOp(newId('op', now), kind, host, ref, actor, now);
      await this.#store.insertOp(op);
      await tickOp(op, this.#jobs, this.#store);
      const current = this.#store.ops.get(op.id) ?? op;
      await this.#store.flush();
      return { ...current };
    });
  }

  /** One host operation, or SC_ERR_NOT_FOUND. */
  getOp(id: string): Promise<HostOp> {
    return getOp(this.#store, id);
  }

  /** The newest host operations (newest first). */
  listOps(limit = 50, host?: string): Promise<HostOp[]> {
    return listOps(this.#store, limit, host);
  }

  /**
   * One rollout with its hosts (in wave order). With `logs`, failed hosts carry the BullMQ log
   * tail of their failed step (`jobLog`). SC_ERR_NOT_FOUND when unknown.
   */
  get(id: string, opts: { logs?: boolean } = {}): Promise<RolloutView & { hosts: HostState[] }> {
    return getRollout(this.#store, this.#deps, id, opts);
  }

  /** Rollouts, newest first, without hosts. */
  list(limit = 50): Promise<RolloutView[]> {
    return listRollouts(this.#store, limit);
  }

  /** A host's newest finished result (rollout or operation), if control recorded one. */
  lastResultOf(host: string): HostResult | null {
    return this.#store.lastResults.get(host) ?? null;
  }

  /** What control is doing with `host` right now (an active rollout or operation), or null. */
  workOf(host: string): HostWork | null {
    return workOf(this.#store, host);
  }

  /** Numbers for /metrics: reports read, and hosts of active rollouts by status. */
  stats(): { reportsApplied: number; hosts: Counts } {
    return { reportsApplied: this.#reportsApplied, hosts: activeHostCounts(this.#store) };
  }

  /** Active rollout ids (for tests and the dashboard). */
  activeIds(): string[] {
    return [...this.#store.active.keys()];
  }
}
