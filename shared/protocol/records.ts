/**
 * What agents (or their relay) publish and control reads: host records (registration and
 * heartbeat) and step reports, with their writers and readers.
 */
import type { ChainableCommander, Redis } from 'ioredis';
import { z } from 'zod';
import { scError } from '../errors.js';
import { NAME_RE } from '../names.js';
import { keys, reportStreamOf, type Source, sourceName } from './keys.js';
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
  /** Who wrote this record (`host.<id>` or `relay.<colo>`, keys.ts): set by the reader, never by the writer. */
  source?: string;
  /**
   * Set by the reader when more than one source holds a live record of this host (keys.ts): the
   * sources, newest first. Control sends such a host no job until the stale claim is gone.
   */
  conflict?: string[];
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

/**
 * Two records of one host whose heartbeats are this close (ms) are a conflict (HostRecord.conflict);
 * farther apart, the newer one is the host's (a host moved from direct mode to a relay, or between
 * colos, and its old record went quiet).
 */
export const RECORD_CONFLICT_WINDOW_MS = 5 * 60_000;

/** One host's record as one source wrote it. */
interface SourcedRecord {
  source: Source;
  fields: Record<string, string>;
}

/** The host record from one source's hash: the key decides id, transport and (for a relay) colo. */
function fromSource(host: string, r: SourcedRecord): HostRecord {
  const rec = decodeHostRecord(r.fields);
  rec.hostId = host;
  rec.source = sourceName(r.source);
  if (r.source.kind === 'relay') {
    rec.colo = r.source.colo;
    rec.transport = 'relay';
  } else {
    rec.transport = 'direct';
  }
  return rec;
}

/** The record of a host from every source's claim: the newest, with the conflict rule (RECORD_CONFLICT_WINDOW_MS). */
function resolve(host: string, claims: SourcedRecord[]): HostRecord | null {
  const recs = claims.filter((c) => Object.keys(c.fields).length > 0).map((c) => fromSource(host, c));
  if (recs.length === 0) return null;
  const seen = (h: HostRecord) => (typeof h.lastSeen === 'number' && Number.isFinite(h.lastSeen) ? h.lastSeen : 0);
  recs.sort((x, y) => seen(y) - seen(x));
  const live = recs.filter((h) => seen(recs[0]) - seen(h) <= RECORD_CONFLICT_WINDOW_MS);
  const out = recs[0];
  if (live.length > 1) out.conflict = live.map((h) => h.source!);
  else delete out.conflict;
  return out;
}

/** The colos whose relay registered hosts. */
async function relayColos(redis: Redis, prefix: string): Promise<string[]> {
  return (await redis.smembers(keys(prefix).relays)).filter((c) => NAME_RE.test(c)).sort();
}

/**
 * Reads every registered host: direct-mode hosts (`P:agents`) and every relay's hosts
 * (`P:relays`, then each `P:relay:<c>:agents`), each record as its source wrote it, resolved per
 * host (the newest; HostRecord.conflict when several sources claim a host at once).
 */
export async function readHosts(redis: Redis, prefix = 'stagecoach'): Promise<HostRecord[]> {
  const k = keys(prefix);
  const wanted = await listedClaims(redis, prefix);
  if (wanted.length === 0) return [];
  const pipe = redis.pipeline();
  for (const w of wanted) pipe.hgetall(w.source.kind === 'host' ? k.agent(w.host) : k.relayAgent(w.source.colo, w.host));
  const res = (await pipe.exec()) ?? [];
  const claims = new Map<string, SourcedRecord[]>();
  wanted.forEach((w, i) => {
    const fields = (res[i]?.[1] as Record<string, string> | undefined) ?? {};
    const list = claims.get(w.host) ?? [];
    list.push({ source: w.source, fields });
    claims.set(w.host, list);
  });
  const out: HostRecord[] = [];
  for (const [h, list] of claims) {
    const r = resolve(h, list);
    if (r) out.push(r);
  }
  return out;
}

/** Every (host, source) pair the host indexes list: `P:agents`, then each relay's `P:relay:<c>:agents`. */
async function listedClaims(redis: Redis, prefix: string): Promise<{ host: string; source: Source }[]> {
  const k = keys(prefix);
  const colos = await relayColos(redis, prefix);
  const idPipe = redis.pipeline().zrange(k.agents, '0', '-1');
  for (const c of colos) idPipe.zrange(k.relayAgents(c), '0', '-1');
  const idRes = (await idPipe.exec()) ?? [];
  const ids = (i: number) => ((idRes[i]?.[1] as string[] | undefined) ?? []).filter((h) => NAME_RE.test(h));
  const out: { host: string; source: Source }[] = ids(0).map((h) => ({ host: h, source: { kind: 'host', host: h } }));
  colos.forEach((c, i) => {
    for (const h of ids(i + 1)) out.push({ host: h, source: { kind: 'relay', colo: c } });
  });
  return out;
}

/**
 * The source of every registered host's record, by the rule of readHosts (the newest), without
 * reading the records of hosts that one source alone lists (a record and its index entry are
 * written together and never removed): one ZRANGE per source, and a lastSeen read only for the
 * hosts claimed twice (readRecordSources). readHosts reads every whole record: at 10,000 hosts,
 * 10,000 HGETALLs.
 */
export async function readHostSources(redis: Redis, prefix: string): Promise<Map<string, Source>> {
  const out = new Map<string, Source>();
  const claimedTwice = new Set<string>();
  for (const { host, source } of await listedClaims(redis, prefix)) {
    if (out.has(host)) claimedTwice.add(host);
    else out.set(host, source);
  }
  for (const [host, { source }] of await readRecordSources(redis, prefix, [...claimedTwice])) out.set(host, source);
  return out;
}

/**
 * Who holds each host's record, by the rule of readHosts, in three round trips whatever the
 * number of hosts: the source of the newest record and the conflicting sources (empty when none).
 * Hosts nobody registered are absent. A relay claims a host when its `P:relay:<c>:agents` lists
 * it (as for readHosts), so only listed relay records are read: one ZMSCORE per colo and one HMGET
 * per claim, instead of one HMGET per host and colo.
 */
export async function readRecordSources(redis: Redis, prefix: string, hosts: readonly string[]): Promise<Map<string, { source: Source; conflict: string[] }>> {
  const k = keys(prefix);
  const uniq = [...new Set(hosts)];
  const out = new Map<string, { source: Source; conflict: string[] }>();
  if (uniq.length === 0) return out;
  const colos = await relayColos(redis, prefix);
  const listed = redis.pipeline();
  for (const c of colos) listed.zmscore(k.relayAgents(c), ...uniq);
  const members = colos.length ? ((await listed.exec()) ?? []) : [];
  const wanted: { host: string; source: Source }[] = [];
  uniq.forEach((h, i) => {
    wanted.push({ host: h, source: { kind: 'host', host: h } });
    colos.forEach((c, j) => {
      const scores = members[j]?.[1] as (string | null)[] | undefined;
      if (scores?.[i] != null) wanted.push({ host: h, source: { kind: 'relay', colo: c } });
    });
  });
  const pipe = redis.pipeline();
  for (const w of wanted) pipe.hmget(w.source.kind === 'host' ? k.agent(w.host) : k.relayAgent(w.source.colo, w.host), 'lastSeen');
  const res = (await pipe.exec()) ?? [];
  const claims = new Map<string, SourcedRecord[]>();
  wanted.forEach((w, i) => {
    const v = res[i]?.[1] as (string | null)[] | undefined;
    if (v?.[0] == null) return;
    const list = claims.get(w.host) ?? [];
    list.push({ source: w.source, fields: { lastSeen: v[0] } });
    claims.set(w.host, list);
  });
  for (const [h, list] of claims) {
    const r = resolve(h, list);
    if (!r) continue;
    const won = list.find((c) => sourceName(c.source) === r.source)!;
    out.set(h, { source: won.source, conflict: r.conflict ?? [] });
  }
  return out;
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

/**
 * Queues the registration/heartbeat writes of one host on a MULTI or pipeline, into the keys of
 * `source` (the host itself, or its colo's relay: keys.ts). Only the given fields change. A
 * relay's writes also name its colo in `P:relays` (unless `announce` is false: a batch of many
 * hosts' writes names it once, announceRelay).
 */
export function queuePresence(
  pipe: ChainableCommander,
  prefix: string,
  source: Source,
  hostId: string,
  fields: Partial<HostRecord>,
  now: number,
  announce = true,
): ChainableCommander {
  const k = keys(prefix);
  const rec = encodeHostRecord({ ...fields, hostId, lastSeen: now });
  if (source.kind === 'host') return pipe.hset(k.agent(hostId), rec).zadd(k.agents, now, hostId);
  pipe.hset(k.relayAgent(source.colo, hostId), rec).zadd(k.relayAgents(source.colo), now, hostId);
  return announce ? announceRelay(pipe, prefix, source.colo) : pipe;
}

/** Queues the naming of a relay's colo in `P:relays`, where control finds the relays' keys. */
export function announceRelay(pipe: ChainableCommander, prefix: string, colo: string): ChainableCommander {
  return pipe.sadd(keys(prefix).relays, colo);
}

/**
 * Queues one report on the source's own stream (field `r`: the StepReport as JSON, MAXLEN ~ cap)
 * and rings the report bell (unless `ring` is false: a batch of reports rings it once,
 * ringReportBell), on a MULTI or pipeline.
 */
export function queueReport(pipe: ChainableCommander, prefix: string, source: Source, r: StepReport, maxLen = 1_000_000, ring = true): ChainableCommander {
  pipe.xadd(reportStreamOf(prefix, source), 'MAXLEN', '~', maxLen, '*', 'r', JSON.stringify(r));
  return ring ? ringReportBell(pipe, prefix, source) : pipe;
}

/** Queues one ring of the report bell with the name of `source`'s stream: control then reads it. */
export function ringReportBell(pipe: ChainableCommander, prefix: string, source: Source): ChainableCommander {
  return pipe.lpush(keys(prefix).bell, sourceName(source));
}

/**
 * Every report of every source (direct hosts and relays), oldest first by `ts`: for tests,
 * benchmarks and tools that read the whole history. Control reads with its consumer groups
 * (services/control/rollouts/report-stream.ts).
 */
export async function readAllReports(redis: Redis, prefix: string): Promise<StepReport[]> {
  const k = keys(prefix);
  const streams = [
    ...(await redis.zrange(k.agents, '0', '-1')).filter((h) => NAME_RE.test(h)).map((h) => k.hostReports(h)),
    ...(await relayColos(redis, prefix)).map((c) => k.relayReports(c)),
  ];
  const pipe = redis.pipeline();
  for (const s of streams) pipe.xrange(s, '-', '+');
  const res = (await pipe.exec()) ?? [];
  const out: { id: string; r: StepReport }[] = [];
  for (const [, rows] of res) {
    for (const [id, fields] of (rows as [string, string[]][] | null) ?? []) {
      try {
        out.push({ id, r: decodeReport(fields) });
      } catch {
        // a malformed entry is skipped, as control skips it
      }
    }
  }
  const ms = (id: string) => Number(id.slice(0, id.indexOf('-')));
  return out.sort((a, b) => a.r.ts - b.r.ts || ms(a.id) - ms(b.id)).map((x) => x.r);
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

