/**
 * A sim fleet for tests (services/demo/fleet.ts in a temp dir): real origin and stages on port 0, sim
 * machines in temp dirs, in-process agents, real Redis with a unique prefix. Adds what tests
 * need around it: a signing producer, waiting for jobs, reading reports and the sim machines,
 * and a cleanup that stops everything, deletes the prefix's keys and the temp dir.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import { createLogger } from '../../shared/log.js';
import { createRedis } from '../../shared/redis.js';
import { AgentProducer, hostQueueName, readAllReports, type SequenceStep, type StepReport } from '../../shared/protocol/index.js';
import { type Fleet, type FleetOptions, startFleet } from '../../services/demo/fleet.js';
import { SimMachine, readActionLog, type SimAction } from '../../services/agent/machine/sim.js';
import type { MachineInspect } from '../../services/agent/machine/driver.js';

/** The final state of a job as BullMQ records it. */
export interface JobOutcome {
  id: string;
  state: string;
  failedReason?: string;
  returnvalue?: Record<string, unknown>;
  attemptsMade: number;
}

/** A test fleet. */
export interface TestFleet extends Fleet {
  redisUrl: string;
  /** A plain connection for assertions (not for BullMQ workers). */
  redis: Redis;
  producer: AgentProducer;
  /** Signs and enqueues `steps` for `host` (rollout id default: a fresh one). Returns the job ids. */
  enqueue(host: string, steps: SequenceStep[], opts?: { rollout?: string; ttlMs?: number }): Promise<string[]>;
  /** Waits until job `id` of `host` is completed or failed (bounded deadline). */
  waitJob(host: string, id: string, timeoutMs?: number): Promise<JobOutcome>;
  /** Waits until every job completed or one failed; returns the outcomes so far. */
  waitSequence(host: string, ids: string[], timeoutMs?: number): Promise<JobOutcome[]>;
  /** Every report on the stream so far. */
  reports(): Promise<StepReport[]>;
  /** The machine of `host`. */
  machine(host: string): SimMachine;
  inspect(host: string): Promise<MachineInspect>;
  actions(host: string): Promise<SimAction[]>;
  /** Stops everything, deletes the Redis keys of the prefix and the temp dir. */
  cleanup(): Promise<void>;
}

/** Deletes every key under `prefix:`. */
export async function deletePrefix(redis: Redis, prefix: string): Promise<void> {
  let cursor = '0';
  do {
    const [next, batch] = await redis.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', 1000);
    cursor = next;
    if (batch.length) await redis.del(...batch);
  } while (cursor !== '0');
}

/** Polls `cond` every 25 ms until it returns a truthy value or `ms` pass (then throws naming `what`). */
export async function until<T>(cond: () => Promise<T> | T, ms: number, what: string): Promise<NonNullable<T>> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v as NonNullable<T>;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/**
 * Starts a test fleet; `colos` default: one colo `c1` with one host. Logs are silent unless
 * AGENT_TEST_LOG names a level (debugging a test).
 */
export async function startTestFleet(opts: Partial<FleetOptions> = {}): Promise<TestFleet> {
  const redisUrl = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
  const root = await mkdtemp(join(tmpdir(), 'sc-fleet-'));
  const prefix = opts.prefix ?? `t-${randomBytes(6).toString('hex')}`;
  const redis = createRedis(redisUrl, { forBullmq: true });
  let fleet: Fleet;
  try {
    const logger = process.env.AGENT_TEST_LOG ? createLogger({ level: process.env.AGENT_TEST_LOG }) : undefined;
    fleet = await startFleet({ colos: [{ name: 'c1', hosts: 1 }], ...(logger ? { logger } : {}), ...opts, root, redisUrl, prefix });
  } catch (err) {
    await deletePrefix(redis, prefix).catch(() => {});
    redis.disconnect();
    await rm(root, { recursive: true, force: true });
    throw err;
  }
  const producer = new AgentProducer({ connection: redis, prefix, signingKey: fleet.keys.controlKey });
  const queues = new Map<string, Queue>();
  const queue = (host: string) => {
    let q = queues.get(host);
    if (!q) {
      q = new Queue(hostQueueName(host), { connection: redis, prefix });
      queues.set(host, q);
    }
    return q;
  };
  const dirOf = (host: string) => {
    const h = fleet.hosts.find((x) => x.hostId === host);
    if (!h) throw new Error(`no host ${host}`);
    return h.dir;
  };
  const outcome = async (host: string, id: string): Promise<JobOutcome | null> => {
    // State first, then the job's fields: read the other way round, a job that finishes in
    // between shows a final state with the fields of its active phase.
    const state = await queue(host).getJobState(id);
    const j = await queue(host).getJob(id);
    if (!j || state === 'unknown') return null;
    return { id, state, failedReason: j.failedReason, returnvalue: j.returnvalue as Record<string, unknown>, attemptsMade: j.attemptsMade };
  };
  const t: TestFleet = Object.assign(fleet, {
    redisUrl,
    redis,
    producer,
    enqueue: (host: string, steps: SequenceStep[], o: { rollout?: string; ttlMs?: number } = {}) =>
      producer.enqueueSequence(host, o.rollout ?? `r${randomBytes(4).toString('hex')}`, steps, { ttlMs: o.ttlMs }),
    waitJob: (host: string, id: string, timeoutMs = 60_000) =>
      until(
        async () => {
          const o = await outcome(host, id);
          return o && (o.state === 'completed' || o.state === 'failed') ? o : null;
        },
        timeoutMs,
        `job ${id} of ${host}`,
      ),
    waitSequence: async (host: string, ids: string[], timeoutMs = 90_000) => {
      const done = await until(
        async () => {
          const all = await Promise.all(ids.map((id) => outcome(host, id)));
          if (all.some((o) => o?.state === 'failed')) return all;
          return all.every((o) => o?.state === 'completed') ? all : null;
        },
        timeoutMs,
        `sequence ${ids[0]}… of ${host}`,
      );
      return done.filter((o): o is JobOutcome => o !== null);
    },
    reports: async () => {
      return readAllReports(redis, prefix);
    },
    machine: (host: string) => new SimMachine(dirOf(host)),
    inspect: (host: string) => new SimMachine(dirOf(host)).inspect(),
    actions: (host: string) => readActionLog(dirOf(host)),
    cleanup: async () => {
      await fleet.close();
      for (const q of queues.values()) await q.close().catch(() => {});
      await producer.close().catch(() => {});
      await deletePrefix(redis, prefix).catch(() => {});
      await redis.quit().catch(() => redis.disconnect());
      await rm(root, { recursive: true, force: true });
    },
  });
  return t;
}
