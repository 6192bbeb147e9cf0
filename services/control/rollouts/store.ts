/**
 * Owns persistence of rollouts and host operations: the Redis layout under `<prefix>:control:`,
 * the in-memory write-through copy of the active ones, and dirty tracking (what changed since
 * the last flush is written in one MULTI).
 *
 * Keys: `r:<id>` (hash: spec, status, preheat as JSON), `r:<id>:hosts` (hash: host id → host
 * state), `rollouts` (sorted set by creation time), `active` (set of unfinished rollout ids),
 * `op:<id>` (hash: op), `ops` (sorted set), `ops:active` (set), `ops:host:<host>` (sorted set: the
 * host's operations), `host-last` (hash: host id → its newest finished result, HostResult).
 */
import type { Redis } from 'ioredis';
import { opFinished } from './host-reducer.js';
import { HostTable } from './host-table.js';
import {
  type ActiveRollout,
  type ChangeEvent,
  controlKey,
  FINISHED_ROLLOUT,
  type HostOp,
  type HostResult,
  type HostState,
  type PreheatColo,
  RESCUE_SUFFIX,
  RESULT_STATUSES,
  type RolloutSpec,
  type RolloutStatus,
  type RolloutView,
} from './model.js';

/** What the store needs. */
export interface StoreDeps {
  redis: Redis;
  prefix: string;
  now: () => number;
  /** Called after a flush, once per rollout or operation written. */
  onChange: (change: ChangeEvent) => void;
}

/**
 * How long a host's progress-only change (a `progress` report: bytes, percent, lastEventAt) may
 * wait in memory before it is written (ms). Progress is most of the reports of a busy fleet and
 * only telemetry: the API and the dashboard read the in-memory copy at once; Redis gets it with
 * the host's next real change, or after this long. A control that dies loses at most this much
 * of it, which moves no host's state (the host timeout is an hour by default).
 */
export const PROGRESS_PERSIST_MS = 10_000;

/** Who a report is about: a rollout host (its conversion or its rescue run) or a host operation. */
export type ReportTarget = { rollout: ActiveRollout; host: HostState; rescue: boolean } | { op: HostOp };

/** The rollout and operation state in Redis, with a write-through copy of the active ones. */
export class RolloutStore {
  /** Active rollouts by id. Change them, then mark them (touchHost, touchProgress, touchRollout, touchPreheat) and flush. */
  readonly active = new Map<string, ActiveRollout>();
  /** Active host operations by id (same rule, touchOp). */
  readonly ops = new Map<string, HostOp>();
  /** Every host's newest finished result (a write-through copy of `host-last`). */
  readonly lastResults = new Map<string, HostResult>();
  readonly #deps: StoreDeps;
  readonly #dirtyHosts = new Map<string, Set<string>>();
  readonly #dirtyRollouts = new Set<string>();
  readonly #dirtyOps = new Set<string>();
  /** Rollouts whose preheat changed (its JSON is written only then, not with every status write). */
  readonly #dirtyPreheat = new Set<string>();
  /**
   * Hosts changed by progress reports only, by rollout: when the oldest unwritten change was
   * made, and whether one came since the last flush (only then is a change reported).
   */
  readonly #progressHosts = new Map<string, { hosts: Set<string>; since: number; fresh: boolean }>();

  constructor(deps: StoreDeps) {
    this.#deps = deps;
  }

  /** The Redis key `<prefix>:control:<parts…>`. */
  key(...parts: string[]): string {
    return controlKey(this.#deps.prefix, ...parts);
  }

  /** Replaces the in-memory copy with the active rollouts and operations in Redis; forgets unflushed changes. */
  async load(): Promise<void> {
    const redis = this.#deps.redis;
    const ids = await redis.smembers(this.key('active'));
    const opIds = await redis.smembers(this.key('ops', 'active'));
    const last = await redis.hgetall(this.key('host-last'));
    const loaded = new Map<string, ActiveRollout>();
    for (const id of ids) {
      const a = await this.read(id);
      if (a) loaded.set(id, { ...a, hosts: inWaveOrder(a.spec, a.hosts), lastPreheatPoll: 0, lastReconcile: 0, reconciledAt: new Map() });
    }
    const ops = new Map<string, HostOp>();
    for (const id of opIds) {
      const op = await this.readOp(id);
      if (op) ops.set(id, op);
    }
    this.active.clear();
    for (const [k, v] of loaded) this.active.set(k, v);
    this.ops.clear();
    for (const [k, v] of ops) this.ops.set(k, v);
    this.lastResults.clear();
    for (const [h, v] of Object.entries(last ?? {})) {
      try {
        this.lastResults.set(h, JSON.parse(v) as HostResult);
      } catch {
        // a malformed entry is rewritten at the host's next result
      }
    }
    this.#dirtyHosts.clear();
    this.#dirtyRollouts.clear();
    this.#dirtyOps.clear();
    this.#dirtyPreheat.clear();
    this.#progressHosts.clear();
  }

  /** One rollout as stored (hosts in hash order), or null. */
  async read(id: string): Promise<(RolloutView & { hosts: HostState[] }) | null> {
    const redis = this.#deps.redis;
    const [meta, hosts] = await Promise.all([redis.hgetall(this.key('r', id)), redis.hgetall(this.key('r', id, 'hosts'))]);
    if (!meta?.spec || !meta.status) return null;
    return {
      spec: JSON.parse(meta.spec) as RolloutSpec,
      status: JSON.parse(meta.status) as RolloutStatus,
      preheat: JSON.parse(meta.preheat ?? '{}') as Record<string, PreheatColo>,
      hosts: Object.values(hosts).map((v) => JSON.parse(v) as HostState),
    };
  }

  /** One rollout without its hosts, or null. */
  async readSummary(id: string): Promise<RolloutView | null> {
    const meta = await this.#deps.redis.hmget(this.key('r', id), 'spec', 'status', 'preheat');
    if (!meta[0] || !meta[1]) return null;
    return { spec: JSON.parse(meta[0]), status: JSON.parse(meta[1]), preheat: JSON.parse(meta[2] ?? '{}') };
  }

  /** One host operation as stored, or null. */
  async readOp(id: string): Promise<HostOp | null> {
    const raw = await this.#deps.redis.hget(this.key('op', id), 'op');
    return raw ? (JSON.parse(raw) as HostOp) : null;
  }

  /** Rollout ids, newest first (at most `limit`, capped at 500). */
  rolloutIds(limit: number): Promise<string[]> {
    return this.#deps.redis.zrevrange(this.key('rollouts'), 0, Math.max(0, Math.min(limit, 500) - 1));
  }

  /** Host operation ids, newest first (at most `limit`, capped at 500), of every host or of one. */
  opIds(limit: number, host?: string): Promise<string[]> {
    const key = host === undefined ? this.key('ops') : this.key('ops', 'host', host);
    return this.#deps.redis.zrevrange(key, 0, Math.max(0, Math.min(limit, 500) - 1));
  }

  /** True when a rollout `id` was ever created. */
  async exists(id: string): Promise<boolean> {
    return (await this.#deps.redis.zscore(this.key('rollouts'), id)) !== null;
  }

  /** Writes a new rollout (spec, status, hosts; listed and active) and holds it in memory. */
  async insertRollout(a: ActiveRollout): Promise<void> {
    const id = a.spec.id;
    const m = this.#deps.redis.multi();
    m.hset(this.key('r', id), 'spec', JSON.stringify(a.spec), 'status', JSON.stringify(a.status), 'preheat', '{}');
    const args: string[] = [];
    for (const [h, st] of a.hosts) args.push(h, JSON.stringify(st));
    m.hset(this.key('r', id, 'hosts'), ...args);
    m.zadd(this.key('rollouts'), a.spec.createdAt, id);
    m.sadd(this.key('active'), id);
    await m.exec();
    this.active.set(id, a);
  }

  /** Writes a new host operation (listed and active) and holds it in memory. */
  async insertOp(op: HostOp): Promise<void> {
    await this.#deps.redis
      .multi()
      .hset(this.key('op', op.id), 'op', JSON.stringify(op))
      .zadd(this.key('ops'), op.createdAt, op.id)
      .zadd(this.key('ops', 'host', op.host), op.createdAt, op.id)
      .sadd(this.key('ops', 'active'), op.id)
      .exec();
    this.ops.set(op.id, op);
  }

  /** The active rollout host or operation a report is about, if control is following it. */
  target(rep: { rollout?: unknown; host?: unknown }): ReportTarget | null {
    if (!rep || typeof rep.rollout !== 'string' || typeof rep.host !== 'string') return null;
    const rescue = rep.rollout.endsWith(RESCUE_SUFFIX);
    const a = this.active.get(rescue ? rep.rollout.slice(0, -RESCUE_SUFFIX.length) : rep.rollout);
    if (a) {
      const h = a.hosts.get(rep.host);
      return h ? { rollout: a, host: h, rescue } : null;
    }
    const op = this.ops.get(rep.rollout);
    return op && op.host === rep.host ? { op } : null;
  }

  /** Marks a host of `a` (and so `a`) changed. */
  touchHost(a: ActiveRollout, host: string): void {
    let s = this.#dirtyHosts.get(a.spec.id);
    if (!s) {
      s = new Set();
      this.#dirtyHosts.set(a.spec.id, s);
    }
    s.add(host);
    this.#dirtyRollouts.add(a.spec.id);
  }

  /**
   * Marks a host of `a` changed by a progress report only: written with the rollout's next
   * write, or once PROGRESS_PERSIST_MS passed (see there). The next flush reports the change.
   */
  touchProgress(a: ActiveRollout, host: string): void {
    let p = this.#progressHosts.get(a.spec.id);
    if (!p) {
      p = { hosts: new Set(), since: this.#deps.now(), fresh: true };
      this.#progressHosts.set(a.spec.id, p);
    }
    p.hosts.add(host);
    p.fresh = true;
  }

  /** Marks a rollout's status changed. */
  touchRollout(id: string): void {
    this.#dirtyRollouts.add(id);
  }

  /** Marks a rollout's preheat changed. */
  touchPreheat(id: string): void {
    this.#dirtyRollouts.add(id);
    this.#dirtyPreheat.add(id);
  }

  /** Marks a host operation changed. */
  touchOp(id: string): void {
    this.#dirtyOps.add(id);
  }

  /**
   * Writes every marked change in one MULTI (rollout counts and `updatedAt` refreshed), with the
   * progress-only hosts that are due (touchProgress), then drops finished rollouts and operations
   * from memory and reports each change, written or not. On a Redis error the caller reloads.
   */
  async flush(): Promise<void> {
    const now = this.#deps.now();
    // Progress-only hosts ride along with their rollout's write, or get one when they waited long enough.
    const quiet: string[] = [];
    for (const [id, p] of this.#progressHosts) {
      if (!this.#dirtyRollouts.has(id) && now - p.since < PROGRESS_PERSIST_MS) {
        if (p.fresh) quiet.push(id);
        p.fresh = false;
        continue;
      }
      let s = this.#dirtyHosts.get(id);
      if (!s) {
        s = new Set();
        this.#dirtyHosts.set(id, s);
      }
      for (const h of p.hosts) s.add(h);
      this.#dirtyRollouts.add(id);
      this.#progressHosts.delete(id);
    }
    if (this.#dirtyRollouts.size === 0 && this.#dirtyOps.size === 0) {
      for (const id of quiet) this.#deps.onChange({ kind: 'rollout', id });
      return;
    }
    const m = this.#deps.redis.multi();
    const changed: string[] = [];
    const results = new Map<string, HostResult>();
    for (const id of this.#dirtyRollouts) {
      const a = this.active.get(id);
      if (!a) continue;
      a.status.counts = a.hosts.counts();
      a.status.updatedAt = now;
      if (this.#dirtyPreheat.has(id)) m.hset(this.key('r', id), 'status', JSON.stringify(a.status), 'preheat', JSON.stringify(a.preheat));
      else m.hset(this.key('r', id), 'status', JSON.stringify(a.status));
      const hs = this.#dirtyHosts.get(id);
      if (hs && hs.size > 0) {
        const args: string[] = [];
        for (const h of hs) {
          const st = a.hosts.get(h);
          args.push(h, JSON.stringify(st));
          if (st && RESULT_STATUSES.includes(st.status)) {
            results.set(h, { kind: 'rollout', id, outcome: st.status, error: st.error, rescue: st.rescue, at: st.finishedAt ?? now });
          }
        }
        m.hset(this.key('r', id, 'hosts'), ...args);
      }
      if (FINISHED_ROLLOUT.includes(a.status.state)) m.srem(this.key('active'), id);
      changed.push(id);
    }
    for (const id of this.#dirtyOps) {
      const op = this.ops.get(id);
      if (!op) continue;
      m.hset(this.key('op', id), 'op', JSON.stringify(op));
      if (opFinished(op)) {
        m.srem(this.key('ops', 'active'), id);
        results.set(op.host, { kind: 'op', id, op: op.kind, outcome: op.status, error: op.error, at: op.finishedAt ?? now });
      }
    }
    if (results.size > 0) m.hset(this.key('host-last'), ...[...results].flatMap(([h, r]) => [h, JSON.stringify(r)]));
    const opsChanged = [...this.#dirtyOps];
    await m.exec();
    this.#dirtyRollouts.clear();
    this.#dirtyHosts.clear();
    this.#dirtyOps.clear();
    this.#dirtyPreheat.clear();
    for (const [h, r] of results) this.lastResults.set(h, r);
    for (const id of changed) {
      const a = this.active.get(id);
      if (a && FINISHED_ROLLOUT.includes(a.status.state)) this.active.delete(id);
      this.#deps.onChange({ kind: 'rollout', id });
    }
    for (const id of quiet) this.#deps.onChange({ kind: 'rollout', id });
    for (const id of opsChanged) {
      const op = this.ops.get(id);
      if (op && opFinished(op)) this.ops.delete(id);
      this.#deps.onChange({ kind: 'op', id });
    }
  }
}

/** A stored rollout's hosts as a table, in wave order (a hash keeps no order), hosts of no wave last. */
function inWaveOrder(spec: RolloutSpec, hosts: HostState[]): HostTable {
  const byId = new Map(hosts.map((h) => [h.host, h]));
  const t = new HostTable();
  for (const id of spec.waves.flat()) {
    const h = byId.get(id);
    if (h) t.set(id, h);
  }
  for (const h of hosts) if (!t.has(h.host)) t.set(h.host, h);
  return t;
}
