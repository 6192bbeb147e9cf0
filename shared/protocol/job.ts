/**
 * The step job: what control signs and a host verifies before it runs anything, its job id on
 * each route, and the options every step job is enqueued with.
 */
import { createHash, type KeyObject } from 'node:crypto';
import type { Redis } from 'ioredis';
import { scError } from '../errors.js';
import { canonicalJson, keyId, signBytes, verifyBytes } from '../manifest.js';
import { coloQueueName, hostQueueName } from './keys.js';
import { readRecordSources } from './records.js';
import { STEP_NAMES, type StepName } from './steps.js';

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

/** How a host takes its jobs: its own queue over Redis, or its colo's relay over HTTP. */
export type Transport = 'direct' | 'relay';

/** Where a host's step jobs are enqueued. */
export interface StepRoute {
  transport: Transport;
  /** BullMQ queue name: `host.<id>` (direct) or `colo.<colo>` (relay). */
  queue: string;
  /** Sources that hold live registrations of the host at once (records.ts): no job goes to it until one is gone. */
  conflict?: string[];
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
  return routedJobId(route, host, stepBaseId(rollout, seq, step));
}

/** The route-independent id of step `seq` of `rollout`: `<rollout>.<seq>.<step>` (see stepJobId). */
export function stepBaseId(rollout: string, seq: number, step: string): string {
  return `${rollout}.${seq}.${step}`;
}

/** A route-independent step id (`<rollout>.<seq>.<step>`) made into the job id on `route` (see stepJobId). */
export function routedJobId(route: StepRoute | Transport, host: string, baseId: string): string {
  const t = typeof route === 'string' ? route : route.transport;
  return t === 'relay' ? `${baseId}.${host}` : baseId;
}

/**
 * The routes of many hosts, from who holds each one's registration (records.ts
 * readRecordSources): a relay's record routes the host to its colo's queue, the host's own record
 * (or none) to its own queue. What a record says of its transport is not asked: a host cannot
 * send its jobs to a colo, and a relay cannot take a host into another colo.
 */
export async function readRoutes(redis: Redis, prefix: string, hosts: readonly string[]): Promise<Map<string, StepRoute>> {
  const sources = await readRecordSources(redis, prefix, hosts);
  const out = new Map<string, StepRoute>();
  for (const h of new Set(hosts)) {
    const s = sources.get(h);
    const route = s?.source.kind === 'relay' ? stepRoute(h, { transport: 'relay', colo: s.source.colo }) : stepRoute(h);
    if (s?.conflict.length) route.conflict = s.conflict;
    out.set(h, route);
  }
  return out;
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
export const ROLLOUT_RE = /^[A-Za-z0-9_-]{1,64}$/;

/** Options of every step job (see the agent's worker for why attempts are bounded). */
export const STEP_JOB_OPTS = {
  attempts: 3,
  backoff: { type: 'exponential', delay: 1000 },
  failParentOnFailure: true,
  removeOnComplete: { age: 7 * 24 * 3600 },
  removeOnFail: { age: 30 * 24 * 3600 },
} as const;
