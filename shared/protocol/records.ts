/**
 * What agents (or their relay) publish and control reads: host records (registration and
 * heartbeat) and step reports, with their writers and readers.
 */
import type { ChainableCommander, Redis } from 'ioredis';
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
