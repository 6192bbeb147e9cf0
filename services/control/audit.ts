/**
 * The audit log: one Redis stream entry per accepted write (`P:control:audit`, field `a` = JSON),
 * capped at about `maxLen` entries. Entries never contain tokens.
 */
import type { Redis } from 'ioredis';

/** One audit entry. `actor` is the `X-Actor` header when given, else the token's name. */
export interface AuditEntry {
  /** Stream id (`<ms>-<n>`), assigned by Redis. */
  id: string;
  ts: number;
  actor: string;
  /** Name of the token that authorised the write. */
  token: string;
  /** e.g. `rollout.create`, `rollout.pause`, `host.rescue`. */
  action: string;
  /** The rollout or host id the action was about. */
  target: string;
  details?: Record<string, unknown>;
  remote?: string;
}

/** The audit log of one control plane. */
export class AuditLog {
  readonly #redis: Redis;
  readonly #key: string;
  readonly #maxLen: number;

  constructor(redis: Redis, prefix: string, maxLen = 100_000) {
    this.#redis = redis;
    this.#key = `${prefix}:control:audit`;
    this.#maxLen = maxLen;
  }

  /** Appends an entry; returns it with its id and time. */
  async append(e: Omit<AuditEntry, 'id' | 'ts'>, now = Date.now()): Promise<AuditEntry> {
    const entry = { ts: now, ...e };
    const id = await this.#redis.xadd(this.#key, 'MAXLEN', '~', String(this.#maxLen), '*', 'a', JSON.stringify(entry));
    return { id: id ?? '', ...entry };
  }

  /** The newest `limit` entries (newest first), optionally older than stream id `before`. */
  async list(limit = 100, before?: string): Promise<AuditEntry[]> {
    const end = before ? `(${before}` : '+';
    const rows = (await this.#redis.xrevrange(this.#key, end, '-', 'COUNT', String(Math.max(1, Math.min(limit, 1000))))) as [string, string[]][];
    return rows.map(([id, fields]) => {
      const i = fields.indexOf('a');
      const v = JSON.parse(i >= 0 ? fields[i + 1] : '{}') as Omit<AuditEntry, 'id'>;
      return { id, ...v };
    });
  }
}
