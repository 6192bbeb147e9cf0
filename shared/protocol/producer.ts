/** The producer of step jobs: control (and the demo, the fleet benchmark) enqueue host sequences with it. */
import { FlowProducer, type FlowJob } from 'bullmq';
import { type KeyObject, randomBytes } from 'node:crypto';
import type { Redis } from 'ioredis';
import { scError } from '../errors.js';
import { hostQueueName } from './keys.js';
import { readRoutes, ROLLOUT_RE, signStepJob, STEP_JOB_OPTS, type StepPayload, type StepRoute, stepJobId } from './job.js';
import type { SequenceStep } from './steps.js';

/**
 * Signs and enqueues host sequences as ordered flows: the first step is the deepest child, so
 * BullMQ runs them strictly in order, and a failed step fails every later one. The queue is the
 * host's route (its own queue, or its colo's relay queue: read from its registration unless
 * given). Job ids are stepJobId's, so enqueueing the same sequence twice adds nothing.
 */
export class AgentProducer {
  readonly #flow: FlowProducer;
  readonly #key: KeyObject;
  readonly #redis: Redis;
  readonly prefix: string;

  constructor(opts: { connection: Redis; prefix?: string; signingKey: KeyObject }) {
    this.prefix = opts.prefix ?? 'stagecoach';
    this.#redis = opts.connection;
    this.#key = opts.signingKey;
    this.#flow = new FlowProducer({ connection: opts.connection, prefix: this.prefix });
  }

  /**
   * Enqueues `steps` for `host` under `rollout`; jobs expire `ttlMs` from now (default 24 h).
   * `route` defaults to the host's registered route (one HMGET). Returns the job ids.
   */
  async enqueueSequence(
    host: string,
    rollout: string,
    steps: SequenceStep[],
    opts: { ttlMs?: number; now?: number; route?: StepRoute } = {},
  ): Promise<string[]> {
    hostQueueName(host);
    const route = opts.route ?? (await readRoutes(this.#redis, this.prefix, [host])).get(host)!;
    if (route.conflict?.length) {
      throw scError('SC_ERR_HOST_CONFLICT', `host ${host} is registered by ${route.conflict.join(' and ')}; no job goes to it until one of them has been quiet for 5 minutes (or an operator deletes the stale registration's key)`);
    }
    const queueName = route.queue;
    if (!ROLLOUT_RE.test(rollout)) throw scError('SC_ERR_BAD_NAME', `bad rollout id ${JSON.stringify(rollout.slice(0, 80))}`);
    if (steps.length === 0) throw scError('SC_ERR_BAD_REQUEST', 'empty sequence');
    const exp = (opts.now ?? Date.now()) + (opts.ttlMs ?? 24 * 3600 * 1000);
    let node: FlowJob | undefined;
    const ids: string[] = [];
    steps.forEach((s, seq) => {
      const payload: StepPayload = { host, rollout, seq, total: steps.length, step: s.step, args: s.args ?? {}, exp, nonce: randomBytes(18).toString('base64url') };
      const id = stepJobId(route, host, rollout, seq, s.step);
      ids.push(id);
      node = {
        name: s.step,
        queueName,
        data: signStepJob(payload, this.#key),
        opts: { jobId: id, ...STEP_JOB_OPTS },
        ...(node ? { children: [node] } : {}),
      };
    });
    await this.#flow.add(node!);
    return ids;
  }

  async close(): Promise<void> {
    await this.#flow.close();
  }
}
