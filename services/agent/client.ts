/**
 * The agent's public surface for other services (control, the demo, the fleet benchmark):
 * queue and key names, the signed step-job format, the producer API that signs and enqueues a
 * host's install sequence as an ordered BullMQ flow, and readers for what agents publish
 * (registrations, heartbeats, step reports). Nothing here runs a step.
 *
 * Redis layout (prefix P, default `stagecoach`; use `{stagecoach}` on Redis Cluster):
 * - `P:host.<id>:*`       BullMQ queue `host.<id>`: the host's step jobs. Consumed only by that host's agent.
 * - `P:agent:<id>`        hash: the host's registration and last heartbeat (HostRecord fields, JSON values).
 * - `P:agents`            sorted set: host id → last heartbeat (ms).
 * - `P:reports`           stream: one entry per step event (StepReport), written by agents, read by control.
 * - `P:hostctl:<id>`      hash written by control, read by the agent: `abort` = rollout id to stop at the next step boundary.
 * - `P:colo.<colo>:*`     BullMQ queue `colo.<colo>`: the step jobs of the colo's hosts in relay mode (no Redis on
 *                         the host), consumed by the colo's relay (a stage started with `--redis`), which hands each
 *                         job to its host over HTTP. Job ids there end in `.<host>` (see stepJobId).
 *
 * Which queue a host's jobs go to is its route (StepRoute), read from its registration's
 * `transport` field (`direct` when absent): the producer and control's readers resolve it.
 */
import type { KeyObject } from 'node:crypto';
import { FlowProducer, type FlowJob } from 'bullmq';
import { createHash, createHmac, randomBytes } from 'node:crypto';
import type { ChainableCommander, Redis } from 'ioredis';
import { scError } from '../../shared/errors.js';
import { canonicalJson, keyId, signBytes, verifyBytes } from '../../shared/manifest.js';
import { NAME_RE } from '../../shared/names.js';

/** Host ids follow the bundle-name rule: `[a-z0-9][a-z0-9._-]{0,63}`. */
export const HOST_ID_RE = NAME_RE;

/** The conversion sequence, steps 1–11 of ARCHITECTURE.md, in order. */
export const CONVERT_STEPS = [
  'fetch',
  'partition',
  'install-base',
  'capture-config',
  'apply-config-base',
  'boot-base',
  'commit-base',
  'wipe-target-disk',
  'install-target',
  'boot-target',
  'verify',
] as const;

/** Every step name an agent understands. */
export const STEP_NAMES = [...CONVERT_STEPS, 'rescue', 'fetch-other'] as const;
export type StepName = (typeof STEP_NAMES)[number];

/** The step after which the host can no longer fall back to OS A. */
export const POINT_OF_NO_RETURN: StepName = 'commit-base';

/** `name@version` of a bundle, split. */
export interface BundleRef {
  name: string;
  version: string;
}

/**
 * What a signed step job says. `exp` is a Unix time in ms after which the agent refuses it (by
 * its own clock, when it takes the job). `seq`, `total` and `nonce` are what the agent's journal
 * (journal.ts) keys on: a host runs the steps of a rollout once each, in order.
 */
export interface StepPayload {
  host: string;
  rollout: string;
  /** Position of the step in its sequence, from 0 (an integer below `total`). */
  seq: number;
  /** Number of steps in the sequence: the rollout is finished on the host once step `total - 1` is. */
  total: number;
  step: StepName;
  args: Record<string, unknown>;
  exp: number;
  /** Random, fresh at every signing (16–64 base64url characters): two signings never look alike. */
  nonce: string;
}

/** The nonce rule of StepPayload. */
export const NONCE_RE = /^[A-Za-z0-9_-]{16,64}$/;

/** The data of every BullMQ step job. */
export interface SignedStepJob {
  payload: StepPayload;
  keyId: string;
  sig: string;
}

/** One step of a sequence before signing. */
export interface SequenceStep {
  step: StepName;
  args?: Record<string, unknown>;
}

/** Queue name of a host. Throws SC_ERR_BAD_NAME for a malformed host id. */
export function hostQueueName(hostId: string): string {
  if (!HOST_ID_RE.test(hostId)) throw scError('SC_ERR_BAD_NAME', `bad host id ${JSON.stringify(hostId.slice(0, 80))}`);
  return `host.${hostId}`;
}

/** Queue name of a colo's relay queue (`colo.<colo>`). Throws SC_ERR_BAD_NAME for a malformed colo. */
export function coloQueueName(colo: string): string {
  if (!NAME_RE.test(colo)) throw scError('SC_ERR_BAD_NAME', `bad colo ${JSON.stringify(colo.slice(0, 80))}`);
  return `colo.${colo}`;
}

/** How a host takes its jobs: its own queue over Redis, or its colo's relay over HTTP. */
export type Transport = 'direct' | 'relay';

/** Where a host's step jobs are enqueued. */
export interface StepRoute {
  transport: Transport;
  /** BullMQ queue name: `host.<id>` (direct) or `colo.<colo>` (relay). */
  queue: string;
}

/**
 * The route of `host` from its registration fields (decoded HostRecord or raw JSON hash values):
 * relay when `transport` is `relay` and a colo is known, else direct. Throws SC_ERR_BAD_NAME.
 */
export function stepRoute(host: string, rec?: { transport?: unknown; colo?: unknown } | null): StepRoute {
  const t = jsonish(rec?.transport);
  const colo = jsonish(rec?.colo);
  if (t === 'relay' && typeof colo === 'string' && colo) return { transport: 'relay', queue: coloQueueName(colo) };
  return { transport: 'direct', queue: hostQueueName(host) };
}

function jsonish(v: unknown): unknown {
  if (typeof v !== 'string' || !v.startsWith('"')) return v;
  try {
    return JSON.parse(v);
  } catch {
    return v;
  }
}

/**
 * The BullMQ job id of step `seq` of `rollout` for `host`: `<rollout>.<seq>.<step>` in the host's
 * own queue (direct), `<rollout>.<seq>.<step>.<host>` in a colo queue shared by many hosts (relay).
 */
export function stepJobId(route: StepRoute | Transport, host: string, rollout: string, seq: number, step: string): string {
  return routedJobId(route, host, `${rollout}.${seq}.${step}`);
}

/** A route-independent step id (`<rollout>.<seq>.<step>`) made into the job id on `route` (see stepJobId). */
export function routedJobId(route: StepRoute | Transport, host: string, baseId: string): string {
  const t = typeof route === 'string' ? route : route.transport;
  return t === 'relay' ? `${baseId}.${host}` : baseId;
}

/** The routes of many hosts in one pipelined round trip (hosts without a registration: direct). */
export async function readRoutes(redis: Redis, prefix: string, hosts: readonly string[]): Promise<Map<string, StepRoute>> {
  const uniq = [...new Set(hosts)];
  const out = new Map<string, StepRoute>();
  if (uniq.length === 0) return out;
  const k = keys(prefix);
  const pipe = redis.pipeline();
  for (const h of uniq) pipe.hmget(k.agent(h), 'transport', 'colo');
  const res = (await pipe.exec()) ?? [];
  uniq.forEach((h, i) => {
    const [err, v] = res[i] ?? [];
    const [transport, colo] = !err && Array.isArray(v) ? (v as (string | null)[]) : [null, null];
    out.set(h, stepRoute(h, { transport, colo }));
  });
  return out;
}

/**
 * A host's relay token: hex HMAC-SHA256 of the host id under the relay secret. The relay derives
 * it again to authenticate the host (`Authorization: Bearer <token>` with header
 * `X-Stagecoach-Host: <id>`), so a host can only take and report its own jobs.
 */
export function relayToken(secret: string | Buffer, hostId: string): string {
  if (!HOST_ID_RE.test(hostId)) throw scError('SC_ERR_BAD_NAME', `bad host id ${JSON.stringify(hostId.slice(0, 80))}`);
  return createHmac('sha256', secret).update(hostId).digest('hex');
}

/** Queues the registration/heartbeat writes of one host on a MULTI or pipeline (what an agent or its relay writes). */
export function queuePresence(pipe: ChainableCommander, prefix: string, hostId: string, fields: Partial<HostRecord>, now: number): ChainableCommander {
  const k = keys(prefix);
  return pipe.hset(k.agent(hostId), encodeHostRecord({ ...fields, hostId, lastSeen: now })).zadd(k.agents, now, hostId);
}

/** Queues one report on the shared stream (field `r`: the StepReport as JSON) on a MULTI or pipeline. */
export function queueReport(pipe: ChainableCommander, prefix: string, r: StepReport, maxLen = 1_000_000): ChainableCommander {
  return pipe.xadd(keys(prefix).reports, 'MAXLEN', '~', maxLen, '*', 'r', JSON.stringify(r));
}

/** Redis key names under a prefix. */
export function keys(prefix: string) {
  return {
    agent: (id: string) => `${prefix}:agent:${id}`,
    agents: `${prefix}:agents`,
    reports: `${prefix}:reports`,
    hostctl: (id: string) => `${prefix}:hostctl:${id}`,
  };
}

/**
 * The BullMQ lock token (and worker name, which BullMQ records as the job's `processedBy`) of
 * every job a direct-mode host takes: stable across its restarts and reboots.
 */
export function hostLockToken(hostId: string): string {
  return `agent:${hostId}`;
}

/** The lock token (and worker name) of every job a relay of `colo` takes: stable across relay restarts. */
export function relayLockToken(colo: string): string {
  return `relay:${colo}`;
}

/** `sha256:<hex>` of a payload's canonical JSON: what the agent's journal remembers of a job. */
export function stepPayloadDigest(p: StepPayload): string {
  return `sha256:${createHash('sha256').update(canonicalJson(p)).digest('hex')}`;
}

/** Signs a step payload with control's ed25519 key. */
export function signStepJob(payload: StepPayload, key: KeyObject): SignedStepJob {
  return { payload, keyId: keyId(key), sig: signBytes(key, Buffer.from(canonicalJson(payload))) };
}

/**
 * Verifies a job for `hostId` at time `now` (ms): verifyStepJobSignature, then checkStepExpiry.
 * Throws SC_ERR_JOB_REJECTED, with `details.reason` one of `malformed`, `unsigned`,
 * `bad-signature`, `wrong-host`, `expired`.
 */
export function verifyStepJob(data: unknown, hostId: string, controlKey: KeyObject, now: number): StepPayload {
  const p = verifyStepJobSignature(data, hostId, controlKey);
  checkStepExpiry(p, now);
  return p;
}

/**
 * Everything verifyStepJob checks except expiry: the signature under control's key, the host,
 * and the payload's shape (step name, integer `seq` below integer `total`, a nonce). Throws
 * SC_ERR_JOB_REJECTED (`malformed`, `unsigned`, `bad-signature`, `wrong-host`).
 */
export function verifyStepJobSignature(data: unknown, hostId: string, controlKey: KeyObject): StepPayload {
  const d = data as Partial<SignedStepJob> | null;
  if (!d || typeof d !== 'object' || !d.payload || typeof d.payload !== 'object') throw rejectJob('malformed', 'job has no payload');
  if (typeof d.sig !== 'string' || typeof d.keyId !== 'string') throw rejectJob('unsigned', 'job is not signed');
  if (d.keyId !== keyId(controlKey) || !verifyBytes(controlKey, Buffer.from(canonicalJson(d.payload)), d.sig)) {
    throw rejectJob('bad-signature', 'job signature does not verify with the control key');
  }
  const p = d.payload;
  if (p.host !== hostId) throw rejectJob('wrong-host', `job is addressed to ${String(p.host).slice(0, 80)}, not ${hostId}`);
  if (!(STEP_NAMES as readonly string[]).includes(p.step as string)) throw rejectJob('malformed', `unknown step ${String(p.step).slice(0, 40)}`);
  if (typeof p.rollout !== 'string' || !ROLLOUT_RE.test(p.rollout)) throw rejectJob('malformed', 'job has no valid rollout id');
  if (typeof p.nonce !== 'string' || !NONCE_RE.test(p.nonce)) throw rejectJob('malformed', 'job has no nonce');
  if (!Number.isSafeInteger(p.total) || (p.total as number) < 1) throw rejectJob('malformed', 'job has no sequence length');
  if (!Number.isSafeInteger(p.seq) || (p.seq as number) < 0 || (p.seq as number) >= (p.total as number)) throw rejectJob('malformed', 'job has no valid sequence number');
  if (typeof p.exp !== 'number') throw rejectJob('malformed', 'job has no expiry');
  return p as StepPayload;
}

/** Throws SC_ERR_JOB_REJECTED (`expired`) when `p` expired before `asOf` (ms). */
export function checkStepExpiry(p: StepPayload, asOf: number): void {
  if (!(p.exp >= asOf)) throw rejectJob('expired', 'job has expired');
}

function rejectJob(reason: string, msg: string) {
  return scError('SC_ERR_JOB_REJECTED', msg, { reason });
}

/** Rollout (and host operation) ids. */
const ROLLOUT_RE = /^[A-Za-z0-9_-]{1,64}$/;

/** The conversion A → C through base B, as a sequence. */
export function convertSequence(base: BundleRef, target: BundleRef): SequenceStep[] {
  return CONVERT_STEPS.map((step) => ({ step, args: { base, target } }));
}

/** Boot into the rescue OS B (from C, or from a broken disk 1). */
export function rescueSequence(): SequenceStep[] {
  return [{ step: 'rescue' }];
}

/** From B, reinstall the kept target bundle from disk2p2 and boot it. */
export function reinstallSequence(): SequenceStep[] {
  return [{ step: 'rescue' }, { step: 'wipe-target-disk' }, { step: 'install-target' }, { step: 'boot-target' }, { step: 'verify' }];
}

/** From B, fetch another OS D through the stage and install it on disk 1. */
export function installOtherSequence(other: BundleRef): SequenceStep[] {
  const args = { target: other };
  return [
    { step: 'rescue' },
    { step: 'fetch-other', args },
    { step: 'wipe-target-disk', args },
    { step: 'install-target', args },
    { step: 'boot-target', args },
    { step: 'verify', args },
  ];
}

/** Options of every step job (see the agent's worker for why attempts are bounded). */
export const STEP_JOB_OPTS = {
  attempts: 3,
  backoff: { type: 'exponential', delay: 1000 },
  failParentOnFailure: true,
  removeOnComplete: { age: 7 * 24 * 3600 },
  removeOnFail: { age: 30 * 24 * 3600 },
} as const;

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

/** A host as its agent last reported it. */
export interface HostRecord {
  hostId: string;
  colo: string;
  ip: string;
  running: { id: string; version: string; device: string } | null;
  bootDevice: string | null;
  /** The stage URLs this agent was configured with, in its configured order (its colo's stages). */
  stages?: string[];
  /** How the host takes its jobs (absent: direct). Relay hosts' jobs go to queue `colo.<colo>`. */
  transport?: Transport;
  agentVersion: string;
  lastSeen: number;
  /** What the agent is doing: idle, running a step, rebooting, refused… */
  state: string;
  rollout: string | null;
  step: string | null;
}

/** One step event from an agent, as written to the reports stream. */
export interface StepReport {
  host: string;
  rollout: string;
  seq: number;
  step: string;
  /** started | progress | completed | failed | refused | rebooting */
  event: string;
  ts: number;
  code?: string;
  message?: string;
  bytes?: number;
  percent?: number;
}

/** Encodes a HostRecord as hash fields (JSON values). */
export function encodeHostRecord(h: Partial<HostRecord>): Record<string, string> {
  return Object.fromEntries(Object.entries(h).map(([k, v]) => [k, JSON.stringify(v)]));
}

/** Decodes hash fields written by encodeHostRecord. */
export function decodeHostRecord(fields: Record<string, string>): HostRecord {
  const o: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(fields)) {
    try {
      o[k] = JSON.parse(v);
    } catch {
      o[k] = v;
    }
  }
  return o as unknown as HostRecord;
}

/** Reads every registered host (registrations and heartbeats). */
export async function readHosts(redis: Redis, prefix = 'stagecoach'): Promise<HostRecord[]> {
  const k = keys(prefix);
  const ids = await redis.zrange(k.agents, '0', '-1');
  if (ids.length === 0) return [];
  const pipe = redis.pipeline();
  for (const id of ids) pipe.hgetall(k.agent(id));
  const res = (await pipe.exec()) ?? [];
  return res
    .map(([, fields]) => fields as Record<string, string>)
    .filter((f) => f && Object.keys(f).length > 0)
    .map(decodeHostRecord);
}

/** Asks a host's agent to stop at its next step boundary for `rollout` (abort). */
export async function requestAbort(redis: Redis, prefix: string, host: string, rollout: string): Promise<void> {
  await redis.hset(keys(prefix).hostctl(host), 'abort', rollout);
}

/** Decodes one reports-stream entry's field list. */
export function decodeReport(fields: string[]): StepReport {
  const o: Record<string, string> = {};
  for (let i = 0; i + 1 < fields.length; i += 2) o[fields[i]] = fields[i + 1];
  return JSON.parse(o.r ?? '{}') as StepReport;
}
