/**
 * What an agent publishes in Redis (keys in shared/protocol/keys.ts): its registration and
 * heartbeat (`P:agent:<id>` hash, and its id on `P:agents`), one StepReport per step event on its
 * own `P:agent:<id>:reports` stream with a ring of the report bell, and the abort flag it reads
 * (`P:hostctl:<id>`). These are the only non-queue keys an agent touches, which is what the
 * per-agent Redis ACL allows.
 */
import type { Redis } from 'ioredis';
import { type HostRecord, keys, queuePresence, queueReport, type Source, type StepReport } from '../../shared/protocol/index.js';

/** Registration, heartbeats and step reports of one host. */
export class Presence {
  readonly #redis: Redis;
  readonly #prefix: string;
  readonly #source: Source;
  readonly #hostId: string;
  readonly #maxLen: number;
  readonly #now: () => number;

  constructor(opts: { redis: Redis; prefix: string; hostId: string; reportsMaxLen?: number; now?: () => number }) {
    this.#redis = opts.redis;
    this.#prefix = opts.prefix;
    this.#hostId = opts.hostId;
    this.#source = { kind: 'host', host: opts.hostId };
    this.#maxLen = opts.reportsMaxLen ?? 1_000_000;
    this.#now = opts.now ?? Date.now;
  }

  /** Writes (or updates) the registration fields and bumps the heartbeat. */
  async update(fields: Partial<HostRecord>): Promise<void> {
    await queuePresence(this.#redis.multi(), this.#prefix, this.#source, this.#hostId, fields, this.#now()).exec();
  }

  /** Appends one event to the host's reports stream (field `r`: the StepReport as JSON) and rings the bell. */
  async report(r: Omit<StepReport, 'host' | 'ts'>): Promise<void> {
    const full: StepReport = { host: this.#hostId, ts: this.#now(), ...r };
    const res = await queueReport(this.#redis.multi(), this.#prefix, this.#source, full, this.#maxLen).exec();
    const err = res?.find(([e]) => e)?.[0];
    if (err) throw err;
  }

  /** True when control asked this host to stop `rollout` at the next step boundary. */
  async abortRequested(rollout: string): Promise<boolean> {
    return (await this.#redis.hget(keys(this.#prefix).hostctl(this.#hostId), 'abort')) === rollout;
  }
}
