/**
 * The per-colo relay: a stage started with `--redis` consumes its colo's BullMQ queue
 * (`colo.<colo>`, shared/protocol/keys.ts) on behalf of the colo's hosts, which then need no Redis connection:
 * 10,000 hosts cost Redis three connections per colo instead of two per host.
 *
 * - ONE consumer of the colo's queue per relay (StepQueueConsumer, shared/protocol/consumer.ts:
 *   the same manual BullMQ consumer a direct-mode agent uses on its own queue) with ONE stable
 *   lock token per colo (`relay:<colo>`): it takes each job that becomes available (one per host
 *   at a time: a host's sequence is a flow chain), and the relay holds it in memory, keyed by its
 *   host (`payload.host` of the signed data). The consumer renews the locks of all held jobs in
 *   one burst by its one rule (lockRenewalIntervalMs: every third of `lockDurationMs`), also
 *   while their hosts reboot; a job whose lock is lost is dropped.
 * - A host long-polls `GET /v1/relay/hosts/:id/next?wait=S`. The relay first checks the host's
 *   abort flag (`hostctl:<id>`, as a direct agent does) and then hands out the host's held job,
 *   or waits up to S seconds for one (204). A job handed out and not yet reported is handed out
 *   again on the next poll (`readopted: true`): that is the direct mode's re-adoption, so a step
 *   interrupted by a reboot or a crash runs again, and a finished one never does (it left the
 *   queue when the host reported it). The host does not take the relay's word for either: its
 *   own journal (services/agent/journal.ts) decides whether it started a job and whether it
 *   already finished it, so a relay that hands out old jobs gets them refused
 *   (SC_ERR_JOB_REPLAYED).
 * - `POST /v1/relay/jobs/:jobId/{progress,complete,fail}` move the job in BullMQ
 *   (`updateProgress`/`log`, the consumer's `complete`, and its `fail` with the job's attempts
 *   and backoff and the protocol's failure encoding, encodeFailure) and write the host's step
 *   reports; `POST /v1/relay/hosts/:id/heartbeat` and any request's `fields` write its
 *   registration. Both go to this colo's own keys (`P:relay:<colo>:*`, shared/protocol/keys.ts),
 *   the only ones its Redis user may write: a relay cannot rewrite a host of another colo or a
 *   direct-mode host, and control shows its hosts as `transport: relay` in this colo. Hosts with an
 *   open poll, and hosts that made any request since the last tick, are kept alive by the relay
 *   (one pipelined write of their `lastSeen` per `heartbeatMs` for all of them).
 * - If the relay dies, its jobs stay active under the colo token. A restarted relay re-adopts
 *   them at once (`extendLock` with the same token succeeds) and hands them out again; if none
 *   restarts, BullMQ's stalled-job check (run by every relay of the colo) returns them to wait
 *   after `lockDurationMs`.
 * - Hosts authenticate (services/relay/auth.ts) with `Authorization: Bearer <relayToken(secret, colo, id)>` and
 *   `X-Stagecoach-Host: <id>` (a per-host HMAC, nothing stored per host): a host can only take
 *   and report its own jobs (403 otherwise). The relay holds its own colo's keys only, never the
 *   fleet secret, so what it holds mints no token for another colo's relay. The relay never sees step secrets and cannot forge a
 *   step: the agent verifies control's signature on every job. It cannot replay one either (the
 *   host's journal), and what it reports is not believed by control on its word: a final state
 *   changes a rollout only once the BullMQ job itself is completed or failed (services/control).
 *
 * Run one relay per colo at a time (a second relay of the same colo would take half the jobs,
 * which the hosts polling the first one would not see). A standby stage can be started with the
 * same flags when the first one dies: it re-adopts the colo's jobs at its start.
 */
import type { ServerResponse } from 'node:http';
import { json } from 'body-parser';
import type { Job } from 'bullmq';
import type { Redis } from 'ioredis';
import Router from 'router';
import {
  coloQueueName,
  HOST_ID_RE,
  type HostRecord,
  keys,
  relayLockToken,
  type RelayKey,
  type StepPayload,
  StepQueueConsumer,
  type StepReport,
  type RelayStats,
  isFailureCode,
} from '../../shared/protocol/index.js';
import { stepJobOf } from '../../shared/protocol/transport.js';
import { scError } from '../../shared/errors.js';
import { noContent, queryParam, sendJson } from '../../shared/http.js';
import type { Logger } from '../../shared/log.js';
import { createRedis } from '../../shared/redis.js';
import { fieldsChecker, hostAuthenticator, pathHost, reportParser } from './auth.js';
import { RecordBatch } from './record-batch.js';

/** The lock token of every job a relay of `colo` takes (stable across relay restarts; shared/protocol/keys.ts). */
export { relayLockToken };
export type { RelayStats };

/** Options of startRelay. */
export interface RelayOptions {
  colo: string;
  redisUrl: string;
  prefix: string;
  /**
   * This colo's relay keys, current first (shared/protocol/relay-wire.ts; never the fleet secret):
   * a host's token is accepted under any of them. Never logged.
   */
  keys: readonly RelayKey[];
  log: Logger;
  /** BullMQ lock duration of held jobs, ms (default 30000; renewed by lockRenewalIntervalMs, every third). */
  lockDurationMs?: number;
  /** Stalled-job check period, ms (default 15000). */
  stalledIntervalMs?: number;
  /** Stalls a job may have before BullMQ fails it (default 1000: reboots are expected). */
  maxStalledCount?: number;
  /** Longest long-poll wait a host may ask for, s (default 60). */
  maxWaitSec?: number;
  /** How often hosts with an open poll get their heartbeat written, ms (default 10000). */
  heartbeatMs?: number;
  /** Approximate cap of this colo's reports stream (default 1,000,000). */
  reportsMaxLen?: number;
  now?: () => number;
}

interface Held {
  job: Job;
  host: string;
  /** Handed to the host at least once (a further hand-out is a re-adoption). */
  handedOut: boolean;
}

interface Waiter {
  /** Something changed (a job came, the request closed, the relay closes): look again. */
  wake: () => void;
  /** A newer poll of the same host took over: answer 204. */
  replace: () => void;
}

/** A relay request: the router's, with the body body-parser read. */
type RelayRequest = Router.Request & { body?: unknown };

/** A running relay (see the top of this file). */
export interface Relay {
  /**
   * The router to mount at `/v1/relay`: the `router` package, express's own, on Node's plain
   * request and response. Hosts' polls and reports are most of a stage's requests, and an express
   * app costs each of them about 60 µs of CPU more than its router alone (it swaps the prototypes
   * of Node's request and response for its own, which defeats V8's inline caches in Node's HTTP
   * code), so the stage runs this router in front of its express app (services/stage/server.ts).
   */
  router: Router.Router;
  stats(): RelayStats;
  /** Stops taking jobs and ends open polls; held jobs stay active (a restart re-adopts them). Idempotent. */
  close(): Promise<void>;
}

const JOB_ID_RE = /^[A-Za-z0-9._-]{1,300}$/;

function hostOf(job: Job): string | null {
  const h = (job.data as { payload?: Partial<StepPayload> } | null)?.payload?.host;
  return typeof h === 'string' && HOST_ID_RE.test(h) ? h : null;
}

/** Starts the relay of `o.colo`: connects, re-adopts the jobs its colo token holds, starts taking jobs. */
export async function startRelay(o: RelayOptions): Promise<Relay> {
  const log = o.log.child({ relay: o.colo });
  const now = o.now ?? Date.now;
  const lockMs = o.lockDurationMs ?? 30_000;
  const maxWait = o.maxWaitSec ?? 60;
  const hbMs = o.heartbeatMs ?? 10_000;
  const maxLen = o.reportsMaxLen ?? 1_000_000;
  const token = relayLockToken(o.colo);
  const queueName = coloQueueName(o.colo);
  const k = keys(o.prefix);
  const redis: Redis = createRedis(o.redisUrl, { forBullmq: true, name: `relay:${o.colo}` });
  redis.on('error', (err) => log.warn({ err: err.message }, 'redis connection error'));
  // The relay's own writes and reads go on a connection BullMQ never loads its scripts into: a
  // pipeline copies every script of its connection (README, "Scaling"). Order across the two is
  // kept by awaiting: a request's job move and its record write never run at the same time.
  const writer: Redis = createRedis(o.redisUrl, { forBullmq: true, name: `relay-writes:${o.colo}` });
  writer.on('error', (err) => log.warn({ err: err.message }, 'redis connection error (writes)'));
  const consumer = new StepQueueConsumer({
    queue: queueName,
    token,
    connection: redis,
    prefix: o.prefix,
    lockDurationMs: lockMs,
    stalledIntervalMs: o.stalledIntervalMs ?? 15_000,
    maxStalledCount: o.maxStalledCount ?? 1000,
    logger: log,
  });

  const held = new Map<string, Held>();
  const byHost = new Map<string, string[]>();
  const waiters = new Map<string, Waiter>();
  let handedOut = 0;
  let closed = false;

  const take = (job: Job, handed: boolean) => {
    const host = hostOf(job);
    if (!host) {
      log.warn({ job: job.id }, 'a job without a valid host; failing it');
      consumer.fail(job, { code: 'SC_ERR_JOB_REJECTED', message: 'job names no valid host' }, true).catch(() => {});
      return;
    }
    if (held.has(job.id!)) return;
    const h: Held = { job, host, handedOut: handed };
    held.set(job.id!, h);
    consumer.hold(job, () => {
      if (held.get(job.id!) === h) drop(job.id!);
    });
    const list = byHost.get(host) ?? [];
    list.push(job.id!);
    byHost.set(host, list);
    waiters.get(host)?.wake();
  };
  const drop = (jobId: string) => {
    const h = held.get(jobId);
    if (!h) return;
    held.delete(jobId);
    const list = (byHost.get(h.host) ?? []).filter((id) => id !== jobId);
    if (list.length) byHost.set(h.host, list);
    else byHost.delete(h.host);
  };

  try {
    await consumer.open();
    // Re-adopt what this colo's token still holds (a restart of this relay).
    for (const j of await consumer.readopt()) take(j, true);
  } catch (err) {
    await consumer.close();
    redis.disconnect();
    writer.disconnect();
    throw err;
  }

  /**
   * Hosts that made an authenticated request since the last heartbeat tick, and when: any request
   * is a sign of life, so a host reporting a long step's progress needs no heartbeat requests.
   */
  let seen = new Map<string, number>();
  // Heartbeats: hosts with an open poll are alive now; hosts seen since the last tick were alive then.
  const beat = setInterval(() => {
    const t = now();
    const last = seen;
    seen = new Map();
    for (const host of waiters.keys()) last.set(host, t);
    if (last.size === 0) return;
    const pipe = writer.pipeline();
    // The hash alone: the colo's host index (`relayAgents`) is written with the registration, and
    // what readers take from it is membership, not its score.
    for (const [host, at] of last) pipe.hset(k.relayAgent(o.colo, host), 'lastSeen', String(at));
    pipe.exec().catch((err) => log.warn({ err: (err as Error).message }, 'heartbeat write failed'));
  }, hbMs);

  const fetching = (async () => {
    while (!closed) {
      try {
        const job = await consumer.next();
        if (job && !closed) take(job, false);
      } catch (err) {
        if (closed) break;
        log.warn({ err: (err as Error).message }, 'taking the next job failed; retrying');
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
  })();

  // ---------------------------------------------------------------- HTTP

  const authenticate = hostAuthenticator(o.keys, o.colo);
  const authHost = (req: RelayRequest): string => {
    const host = authenticate(req);
    seen.set(host, now());
    return host;
  };
  const checkFields = fieldsChecker(o.colo);
  const report = reportParser(now);
  const records = new RecordBatch({ redis: writer, prefix: o.prefix, colo: o.colo, reportsMaxLen: maxLen, now });
  const write = (host: string, fields: Partial<HostRecord> | null, r: StepReport | null) => {
    // A registration write sets lastSeen itself (to a later time than the tick would).
    if (fields) seen.delete(host);
    return records.write(host, fields, r);
  };
  const heldFor = (req: RelayRequest, host: string): Held => {
    const id = String(req.params.jobId);
    if (!JOB_ID_RE.test(id)) throw scError('SC_ERR_BAD_PATH', 'bad job id');
    const h = held.get(id);
    if (!h) throw scError('SC_ERR_CONFLICT', 'this relay does not hold that job (finished, or held elsewhere)');
    if (h.host !== host) throw scError('SC_ERR_FORBIDDEN', 'that job belongs to another host');
    return h;
  };
  /** Appends a host's log lines (at most 100 per request, 4000 characters each) to its job, in order. */
  const addLogs = async (h: Held, lines: unknown): Promise<void> => {
    if (!Array.isArray(lines)) return;
    // One connection sends commands in order, so the lines keep theirs.
    await Promise.all(lines.slice(0, 100).flatMap((line) => (typeof line === 'string' ? [h.job.log(line.slice(0, 4000))] : [])));
  };
  /**
   * Appends the request's log lines, then moves the held job out of the queue's active set
   * (`move` completes or fails it) and lets go of it. SC_ERR_CONFLICT when BullMQ refuses (lock lost).
   */
  const settle = async (h: Held, lines: unknown, what: string, move: () => Promise<unknown>): Promise<void> => {
    await addLogs(h, lines);
    try {
      await move();
    } catch (err) {
      throw scError('SC_ERR_CONFLICT', `could not ${what} the job: ${(err as Error).message}`);
    } finally {
      drop(h.job.id!);
    }
  };
  const wrap =
    (fn: (req: RelayRequest, res: ServerResponse) => Promise<void>) =>
    (req: RelayRequest, res: ServerResponse, next: Router.NextFunction): void => {
      fn(req, res).catch(next);
    };

  const router = new Router({ caseSensitive: true, strict: true });
  router.use(json({ limit: '256kb' }));

  router.post(
    '/hosts/:id/heartbeat',
    wrap(async (req, res) => {
      const host = authHost(req);
      pathHost(req, host);
      await write(host, checkFields((req.body as { fields?: unknown })?.fields) ?? { transport: 'relay' }, null);
      noContent(res);
    }),
  );

  router.get(
    '/hosts/:id/next',
    wrap(async (req, res) => {
      const host = authHost(req);
      pathHost(req, host);
      const wait = Math.min(maxWait, Math.max(0, Number(queryParam(req, 'wait') ?? 25) || 0));
      const hdr = req.headers['x-stagecoach-fields'];
      if (typeof hdr === 'string' && hdr) {
        let f: unknown;
        try {
          f = JSON.parse(Buffer.from(hdr, 'base64url').toString('utf8'));
        } catch {
          throw scError('SC_ERR_BAD_REQUEST', 'X-Stagecoach-Fields is not base64url JSON');
        }
        await write(host, checkFields(f), null);
      }
      let gone = false;
      res.on('close', () => {
        gone = true;
        waiters.get(host)?.wake();
      });
      const deadline = now() + wait * 1000;
      for (;;) {
        if (gone || closed) {
          if (!res.headersSent) noContent(res);
          return;
        }
        const id = byHost.get(host)?.[0];
        const h = id ? held.get(id) : undefined;
        if (h) {
          const rollout = (h.job.data as { payload?: { rollout?: unknown } })?.payload?.rollout;
          if (typeof rollout === 'string' && (await writer.hget(k.hostctl(host), 'abort')) === rollout) {
            await abortJob(h, rollout);
            continue;
          }
          const readopted = h.handedOut;
          h.handedOut = true;
          handedOut++;
          sendJson(res, 200, { job: stepJobOf(h.job, readopted) }, { 'Cache-Control': 'no-store' });
          return;
        }
        const left = deadline - now();
        if (left <= 0) {
          noContent(res);
          return;
        }
        const why = await new Promise<'wake' | 'replaced'>((resolve) => {
          const prev = waiters.get(host);
          const t = setTimeout(() => finish('wake'), left);
          function finish(r: 'wake' | 'replaced') {
            clearTimeout(t);
            if (waiters.get(host) === w) waiters.delete(host);
            resolve(r);
          }
          const w: Waiter = { wake: () => finish('wake'), replace: () => finish('replaced') };
          waiters.set(host, w);
          prev?.replace(); // a newer poll of the same host replaces an older one
        });
        if (why === 'replaced') {
          if (!res.headersSent) noContent(res);
          return;
        }
      }
    }),
  );

  const abortJob = async (h: Held, rollout: string) => {
    const p = (h.job.data as { payload: StepPayload }).payload;
    const msg = `rollout ${rollout} was aborted; stopped before ${p.step}`;
    drop(h.job.id!);
    await consumer.fail(h.job, { code: 'SC_ERR_ABORTED', message: msg }, true).catch((err) => log.warn({ err: (err as Error).message }, 'could not fail an aborted job'));
    await write(
      h.host,
      { state: 'aborted', rollout, step: p.step, transport: 'relay' },
      { host: h.host, ts: now(), rollout, seq: p.seq, step: p.step, event: 'failed', code: 'SC_ERR_ABORTED', message: msg },
    ).catch(() => {});
  };

  router.post(
    '/jobs/:jobId/progress',
    wrap(async (req, res) => {
      const host = authHost(req);
      const h = heldFor(req, host);
      const b = (req.body ?? {}) as { report?: unknown; progress?: unknown; log?: unknown; fields?: unknown };
      const work: Promise<unknown>[] = [write(host, checkFields(b.fields), report(host, b.report))];
      if (b.progress && typeof b.progress === 'object') work.push(h.job.updateProgress(b.progress as object));
      work.push(addLogs(h, b.log));
      await Promise.all(work);
      noContent(res);
    }),
  );

  router.post(
    '/jobs/:jobId/complete',
    wrap(async (req, res) => {
      const host = authHost(req);
      const h = heldFor(req, host);
      const b = (req.body ?? {}) as { result?: unknown; report?: unknown; log?: unknown; fields?: unknown };
      const fields = checkFields(b.fields);
      const r = report(host, b.report);
      await settle(h, b.log, 'complete', () => consumer.complete(h.job, b.result && typeof b.result === 'object' ? (b.result as Record<string, unknown>) : {}));
      await write(host, fields, r);
      noContent(res);
    }),
  );

  router.post(
    '/jobs/:jobId/fail',
    wrap(async (req, res) => {
      const host = authHost(req);
      const h = heldFor(req, host);
      const b = (req.body ?? {}) as { code?: unknown; message?: unknown; permanent?: unknown; report?: unknown; log?: unknown; fields?: unknown };
      // The protocol's codec checks the code and caps the message (FAILURE_MESSAGE_MAX).
      const failure = { code: isFailureCode(b.code) ? b.code : 'SC_ERR_STEP_FAILED', message: typeof b.message === 'string' ? b.message : 'step failed' };
      const permanent = b.permanent === true;
      const fields = checkFields(b.fields);
      let r = report(host, b.report);
      let retry = false;
      await settle(h, b.log, 'fail', async () => {
        ({ retry } = await consumer.fail(h.job, failure, permanent));
      });
      if (r && retry && r.message) r = { ...r, message: `${r.message} (will retry)` };
      await write(host, fields, r);
      sendJson(res, 200, { retry });
    }),
  );

  return {
    router,
    stats: () => ({ colo: o.colo, queue: queueName, held: held.size, polling: waiters.size, handedOut }),
    close: async () => {
      if (closed) return;
      closed = true;
      clearInterval(beat);
      for (const w of [...waiters.values()]) w.wake();
      await consumer.close();
      await fetching;
      await Promise.all([redis.quit().catch(() => redis.disconnect()), writer.quit().catch(() => writer.disconnect())]);
    },
  };
}
