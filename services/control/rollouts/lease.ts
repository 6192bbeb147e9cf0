/**
 * Owns the leader lease: one control engine per Redis prefix. The lease is the key
 * `<prefix>:control:lease` (value: this instance's id, TTL LEASE_MS), renewed every third of its
 * TTL by a Lua script. A second instance refuses to start while the lease is held; an instance
 * that finds its lease taken by another is told (`onLost`) and must stop (the CLI then exits,
 * systemd restarts it, and it waits for the lease).
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import type { Redis } from 'ioredis';
import { scError } from '../../../shared/errors.js';
import type { Logger } from '../../../shared/log.js';
import { controlKey } from './model.js';

/** Lifetime of the lease (ms); it is renewed every third of it. */
export const LEASE_MS = 15_000;

/** Extends the lease when we hold it, takes it back when it expired (e.g. a long Redis outage), else 0. */
const RENEW_LEASE = `local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0`;
/** Deletes the lease only when we hold it. */
const RELEASE_LEASE = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`;

/** What the lease needs. */
export interface LeaseDeps {
  redis: Redis;
  prefix: string;
  log: Logger;
}

/** The leader lease of one engine instance. */
export class LeaderLease {
  readonly #deps: LeaseDeps;
  readonly #key: string;
  /** This instance: `<hostname>:<pid>:<random>`, the lease's value. */
  readonly #instance = `${hostname()}:${process.pid}:${randomBytes(4).toString('hex')}`;
  #renewTimer: NodeJS.Timeout | null = null;
  #renewing = false;

  constructor(deps: LeaseDeps) {
    this.#deps = deps;
    this.#key = controlKey(deps.prefix, 'lease');
  }

  /** Takes the lease; SC_ERR_CONFLICT (with the holder) when another instance holds it. */
  async acquire(): Promise<void> {
    const redis = this.#deps.redis;
    if ((await redis.set(this.#key, this.#instance, 'PX', LEASE_MS, 'NX')) === 'OK') return;
    const [holder, ttl] = await Promise.all([redis.get(this.#key), redis.pttl(this.#key)]);
    throw scError('SC_ERR_CONFLICT', `another control instance (${holder}) runs on prefix ${this.#deps.prefix}; its lease expires in ${Math.ceil(Math.max(ttl, 0) / 1000)} s`, {
      holder,
    });
  }

  /**
   * Renews the lease every LEASE_MS / 3 until stopRenewing. A failed renewal is retried at the
   * next interval; when another instance holds the lease, renewal stops and `onLost` runs once.
   */
  keep(onLost: () => void): void {
    this.#renewing = true;
    this.#renewTimer = setInterval(() => void this.#renew(onLost), LEASE_MS / 3);
    this.#renewTimer.unref();
  }

  /** Stops renewing (idempotent); the lease stays until release or expiry. */
  stopRenewing(): void {
    this.#renewing = false;
    if (this.#renewTimer) clearInterval(this.#renewTimer);
    this.#renewTimer = null;
  }

  /** Deletes the lease if this instance still holds it. */
  async release(): Promise<void> {
    await this.#deps.redis.eval(RELEASE_LEASE, 1, this.#key, this.#instance);
  }

  async #renew(onLost: () => void): Promise<void> {
    if (!this.#renewing) return;
    let r: unknown;
    try {
      r = await this.#deps.redis.eval(RENEW_LEASE, 1, this.#key, this.#instance, String(LEASE_MS));
    } catch (err) {
      this.#deps.log.warn({ err: (err as Error).message }, 'lease renewal failed; retrying');
      return;
    }
    if (r === 0 && this.#renewing) {
      this.#deps.log.error({ prefix: this.#deps.prefix }, 'another control instance took the lease; stopping the engine');
      this.stopRenewing();
      onLost();
    }
  }
}
