/**
 * What agents (or their relay) publish and control reads: host records (registration and
 * heartbeat) and step reports, with their writers and readers.
 */
import type { ChainableCommander, Redis } from 'ioredis';
import { z } from 'zod';
import { scError } from '../errors.js';
import { NAME_RE } from '../names.js';
import { keys } from './keys.js';
import type { Transport } from './job.js';

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

/** Queues the registration/heartbeat writes of one host on a MULTI or pipeline (what an agent or its relay writes). */
export function queuePresence(pipe: ChainableCommander, prefix: string, hostId: string, fields: Partial<HostRecord>, now: number): ChainableCommander {
  const k = keys(prefix);
  return pipe.hset(k.agent(hostId), encodeHostRecord({ ...fields, hostId, lastSeen: now })).zadd(k.agents, now, hostId);
}

/** Queues one report on the shared stream (field `r`: the StepReport as JSON) on a MULTI or pipeline. */
export function queueReport(pipe: ChainableCommander, prefix: string, r: StepReport, maxLen = 1_000_000): ChainableCommander {
  return pipe.xadd(keys(prefix).reports, 'MAXLEN', '~', maxLen, '*', 'r', JSON.stringify(r));
}

/** A string cut to `max` characters (a host's free text is kept, not refused, but bounded). */
const clipped = (max: number) => z.string().transform((v) => v.slice(0, max));
const finite = z.number().refine(Number.isFinite, 'expected a finite number');

/**
 * Registration fields as a host sends them to its relay: every HostRecord field, typed and
 * bounded; unknown keys are dropped. `hostId` and `lastSeen` are the writer's to set.
 */
export const hostFieldsSchema = z.object({
  hostId: z.string().max(64).optional(),
  colo: z.string().regex(NAME_RE).optional(),
  ip: z.string().max(64).optional(),
  running: z.object({ id: z.string().max(64), version: z.string().max(64), device: z.string().max(32) }).nullable().optional(),
  bootDevice: z.string().max(32).nullable().optional(),
  stages: z.array(z.string().max(512)).max(32).optional(),
  transport: z.enum(['direct', 'relay']).optional(),
  agentVersion: z.string().max(64).optional(),
  lastSeen: finite.optional(),
  state: z.string().max(64).optional(),
  rollout: z.string().max(80).nullable().optional(),
  step: z.string().max(64).nullable().optional(),
});

/** A step report as a host sends it (without `host` and `ts`, which the writer sets); unknown keys are dropped. */
export const reportFieldsSchema = z.object({
  rollout: z.string().min(1).max(80),
  seq: z.number().int(),
  step: z.string().min(1).max(64),
  event: z.string().min(1).max(32),
  code: z.string().max(64).optional(),
  message: clipped(4000).optional(),
  bytes: finite.optional(),
  percent: finite.optional(),
});

/** Parses a host's input with `schema`; SC_ERR_BAD_REQUEST names the first bad field. */
export function parseHostInput<T extends z.ZodType>(schema: T, input: unknown, what: string): z.infer<T> {
  const r = schema.safeParse(input);
  if (r.success) return r.data;
  const i = r.error.issues[0];
  throw scError('SC_ERR_BAD_REQUEST', `malformed ${what}: ${i.path.join('.') || '(root)'}: ${i.message}`);
}

