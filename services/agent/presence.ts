/**
 * What an agent publishes in Redis (keys in client.ts): its registration and heartbeat
 * (`P:agent:<id>` hash and `P:agents` sorted set), one StepReport per step event on the shared
 * `P:reports` stream, and the abort flag it reads (`P:hostctl:<id>`). These are the only
 * non-queue keys an agent touches, which is what the per-agent Redis ACL allows.
 */
import type { Redis } from 'ioredis';
import { encodeHostRecord, type HostRecord, keys, type StepReport } from '../../shared/protocol/index.js';

/** Registration, heartbeats and step reports of one host. */
export class Presence {
  readonly #redis: Redis;
  readonly #k: ReturnType<typeof keys>;
  readonly #hostId: string;
  readonly #maxLen: number;
  readonly #now: () => number;

  constructor(opts: { redis: Redis; prefix: string; hostId: string; reportsMaxLen?: number; now?: () => number }) {
    this.#redis = opts.redis;
    this.#k = keys(opts.prefix);
    this.#hostId = opts.hostId;
    this.#maxLen = opts.reportsMaxLen ?? 1_000_000;
    this.#now = opts.now ?? Date.now;
  }

  /** Writes (or updates) the registration fields and bumps the heartbeat. */
  async update(fields: Partial<HostRecord>): Promise<void> {
    const now = this.#now();
    await this.#redis
      .multi()
      .hset(this.#k.agent(this.#hostId), encodeHostRecord({ ...fields, hostId: this.#hostId, lastSeen: now }))
      .zadd(this.#k.agents, now, this.#hostId)
      .exec();
  }

  /** Appends one event to the reports stream (field `r`: the StepReport as JSON). Returns the entry id. */
  async report(r: Omit<StepReport, 'host' | 'ts'>): Promise<string | null> {
    const full: StepReport = { host: this.#hostId, ts: this.#now(), ...r };
    return this.#redis.xadd(this.#k.reports, 'MAXLEN', '~', this.#maxLen, '*', 'r', JSON.stringify(full));
  }

  /** True when control asked this host to stop `rollout` at the next step boundary. */
  async abortRequested(rollout: string): Promise<boolean> {
    return (await this.#redis.hget(this.#k.hostctl(this.#hostId), 'abort')) === rollout;
  }
}
