/**
 * Owns control's side of the report streams. Every source writes its own stream
 * (shared/protocol/keys.ts: a direct-mode host `P:agent:<id>:reports`, a colo's relay
 * `P:relay:<c>:reports`), which the Redis ACL lets nobody else write, and rings the report bell
 * (`P:report-bell`) with its name.
 *
 * - One consumer group `control` per stream, created when control first learns of the stream:
 *   from a ring, or from a sweep of `P:agents` and `P:relays` (only streams that exist get a
 *   group, so a forged name costs one failed XGROUP and nothing else).
 * - ONE blocking connection waits on the bell (BLMPOP), then reads the rung streams with
 *   XREADGROUP, in chunks. After a failure it first re-reads its own unacknowledged entries
 *   (id `0`), then new ones. Every `sweepMs` all known streams are read without a ring, so a
 *   lost ring (or one an attacker trimmed) delays a report by at most that; streams it has no
 *   group on yet are looked for every `discoverMs` (a new stream's first report whose ring was
 *   lost waits at most that long).
 * - Decoding drops what a source may not say: a host's stream speaks only of that host, a
 *   relay's only of hosts whose registration that relay holds.
 */
import type { Redis } from 'ioredis';
import { decodeReport, keys, parseSourceName, reportStreamOf, type Source, type StepReport, stepBaseId } from '../../../shared/protocol/index.js';
import type { Logger } from '../../../shared/log.js';
import { type JobOutcome, jobOutcomes } from '../queues.js';
import { FINAL_EVENTS } from './host-reducer.js';
import type { JobRoute } from './model.js';
import { NAME_RE } from '../../../shared/names.js';

const GROUP = 'control';
/** Entries read per stream and call. */
const PER_STREAM = 100;
/** Streams per XREADGROUP call. */
const CHUNK = 500;
/** Rings taken from the bell per wait. */
const RINGS = 1000;

/** A stream entry: id, fields (null when the entry was trimmed before we read it) and its stream. */
export type StreamEntry = [id: string, fields: string[] | null, stream: string];

/** What the stream reader needs. */
export interface ReportStreamDeps {
  /** For XGROUP, XACK and lookups. */
  redis: Redis;
  /** A dedicated connection for the blocking BLMPOP and the reads (maxRetriesPerRequest: null). */
  readerRedis: Redis;
  prefix: string;
  consumer: string;
  /** How long one wait on the bell blocks (ms). */
  blockMs: number;
  /** How often every known stream is read without a ring (ms, default 5000). */
  sweepMs?: number;
  /**
   * How often a sweep also looks for streams it has no group on yet (ms, default 60000): a host
   * that registered and never reported has none, and asking for it every sweep would cost one
   * XGROUP per such host. New streams are normally learnt from their first ring.
   */
  discoverMs?: number;
  log: Logger;
  now?: () => number;
}

/** Control's consumer of the report streams. */
export class ReportStream {
  readonly #deps: ReportStreamDeps;
  readonly #now: () => number;
  /** Streams with our group, and whose they are. */
  readonly #known = new Map<string, Source>();
  /** Streams whose unacknowledged entries are read again first. */
  #pending = new Set<string>();
  /** Streams to read next. */
  readonly #due = new Set<string>();
  #lastSweep = Number.NEGATIVE_INFINITY;
  #lastDiscovery = Number.NEGATIVE_INFINITY;
  #started = false;

  constructor(deps: ReportStreamDeps) {
    this.#deps = deps;
    this.#now = deps.now ?? Date.now;
  }

  /** Forgets which streams have groups: the next read sweeps and creates them again (at start, and after NOGROUP). */
  async ensureGroup(): Promise<void> {
    this.#known.clear();
    this.#lastSweep = Number.NEGATIVE_INFINITY;
    this.#lastDiscovery = Number.NEGATIVE_INFINITY;
  }

  /** Reads entries: first our own unacknowledged ones, then new ones (waiting on the bell up to blockMs). */
  async read(): Promise<StreamEntry[]> {
    if (this.#now() - this.#lastSweep >= (this.#deps.sweepMs ?? 5000)) await this.#sweep();
    if (this.#pending.size > 0) {
      const { entries, full } = await this.#xread([...this.#pending], '0');
      // A stream whose pending list came back short has nothing more to re-read.
      this.#pending = full;
      if (entries.length > 0) return entries;
    }
    if (this.#due.size === 0) await this.#waitBell();
    const streams = [...this.#due];
    this.#due.clear();
    const { entries, full } = await this.#xread(streams, '>');
    for (const s of full) this.#due.add(s);
    return entries;
  }

  /** Learns every source from `P:agents` and `P:relays`, creates missing groups, and marks every known stream due. */
  async #sweep(): Promise<void> {
    const { redis, prefix } = this.#deps;
    const k = keys(prefix);
    if (!this.#started) {
      // Rings from before this start are covered by this sweep.
      await redis.del(k.bell);
      this.#started = true;
    }
    let fresh: string[] = [];
    if (this.#now() - this.#lastDiscovery >= (this.#deps.discoverMs ?? 60_000)) {
      const [hosts, colos] = await Promise.all([redis.zrange(k.agents, '0', '-1'), redis.smembers(k.relays)]);
      const sources: Source[] = [
        ...hosts.filter((h) => NAME_RE.test(h)).map((host): Source => ({ kind: 'host', host })),
        ...colos.filter((c) => NAME_RE.test(c)).map((colo): Source => ({ kind: 'relay', colo })),
      ];
      fresh = await this.#learn(sources.filter((s) => !this.#known.has(reportStreamOf(prefix, s))));
      this.#lastDiscovery = this.#now();
    }
    for (const s of this.#known.keys()) this.#due.add(s);
    // A group made by an earlier control may hold entries it read and never acknowledged.
    for (const s of fresh) this.#pending.add(s);
    this.#lastSweep = this.#now();
  }

  /** Creates our group on the streams of `sources` that exist; returns the streams now known. */
  async #learn(sources: Source[]): Promise<string[]> {
    if (sources.length === 0) return [];
    const pipe = this.#deps.redis.pipeline();
    const streams = sources.map((s) => reportStreamOf(this.#deps.prefix, s));
    for (const st of streams) pipe.xgroup('CREATE', st, GROUP, '0');
    const res = (await pipe.exec()) ?? [];
    const out: string[] = [];
    streams.forEach((st, i) => {
      const err = res[i]?.[0];
      // No stream yet (nothing reported): learnt at its first ring or a later sweep.
      if (err && !/BUSYGROUP/.test(err.message)) return;
      this.#known.set(st, sources[i]);
      out.push(st);
    });
    return out;
  }

  /** Waits up to blockMs for rings; marks the rung streams due (learning new ones). */
  async #waitBell(): Promise<void> {
    const { readerRedis, prefix, blockMs } = this.#deps;
    const res = (await readerRedis.call('BLMPOP', String(Math.max(0.01, blockMs / 1000)), '1', keys(prefix).bell, 'RIGHT', 'COUNT', String(RINGS))) as
      | [string, string[]]
      | null;
    const names = new Set(res?.[1] ?? []);
    const unknown: Source[] = [];
    for (const n of names) {
      const src = parseSourceName(n);
      if (!src) continue;
      const st = reportStreamOf(prefix, src);
      if (this.#known.has(st)) this.#due.add(st);
      else unknown.push(src);
    }
    for (const st of await this.#learn(unknown)) this.#due.add(st);
  }

  /** XREADGROUP over `streams` from `id`, in chunks; `full`: streams that returned a whole batch (more may wait). */
  async #xread(streams: string[], id: '0' | '>'): Promise<{ entries: StreamEntry[]; full: Set<string> }> {
    const entries: StreamEntry[] = [];
    const full = new Set<string>();
    const r = this.#deps.readerRedis;
    for (let i = 0; i < streams.length; i += CHUNK) {
      const chunk = streams.slice(i, i + CHUNK);
      const res = (await r.xreadgroup('GROUP', GROUP, this.#deps.consumer, 'COUNT', PER_STREAM, 'STREAMS', ...chunk, ...chunk.map(() => id))) as
        | [string, [string, string[] | null][]][]
        | null;
      for (const [stream, rows] of res ?? []) {
        if (rows.length >= PER_STREAM) full.add(stream);
        for (const [eid, fields] of rows) entries.push([eid, fields, stream]);
      }
    }
    return { entries, full };
  }

  /**
   * The reports of `entries` that their source may write; malformed ones, and those a source
   * wrote about a host that is not its own, are logged and left out.
   */
  async decode(entries: StreamEntry[]): Promise<StepReport[]> {
    const k = keys(this.#deps.prefix);
    const reps: { r: StepReport; src: Source }[] = [];
    for (const [, fields, stream] of entries) {
      if (!fields) continue;
      const src = this.#known.get(stream);
      if (!src) continue;
      try {
        const r = decodeReport(fields);
        if (src.kind === 'host' && r.host !== src.host) {
          this.#deps.log.warn({ stream, host: String(r.host).slice(0, 80) }, 'ignoring a report a host wrote about another host');
          continue;
        }
        reps.push({ r, src });
      } catch (err) {
        this.#deps.log.warn({ err }, 'ignoring a malformed report');
      }
    }
    const relayed = reps.filter((x) => x.src.kind === 'relay');
    if (relayed.length === 0) return reps.map((x) => x.r);
    // A relay speaks only for hosts whose registration it holds.
    const pipe = this.#deps.redis.pipeline();
    for (const x of relayed) pipe.exists(k.relayAgent((x.src as { colo: string }).colo, typeof x.r.host === 'string' && NAME_RE.test(x.r.host) ? x.r.host : '-'));
    const res = (await pipe.exec()) ?? [];
    const foreign = new Set<StepReport>();
    relayed.forEach((x, i) => {
      if (res[i]?.[1] !== 1) foreign.add(x.r);
    });
    if (foreign.size) this.#deps.log.warn({ reports: foreign.size }, 'ignoring reports a relay wrote about hosts it does not serve');
    return reps.filter((x) => !foreign.has(x.r)).map((x) => x.r);
  }

  /** Acknowledges `entries` (after their effects were persisted). */
  async ack(entries: StreamEntry[]): Promise<void> {
    if (entries.length === 0) return;
    const by = new Map<string, string[]>();
    for (const [id, , stream] of entries) by.set(stream, [...(by.get(stream) ?? []), id]);
    const pipe = this.#deps.redis.pipeline();
    for (const [stream, ids] of by) pipe.xack(stream, GROUP, ...ids);
    const res = (await pipe.exec()) ?? [];
    const err = res.find(([e]) => e)?.[0];
    if (err) throw err;
  }

  /** After a failure: the next read starts again with our unacknowledged entries. */
  rewind(): void {
    this.#pending = new Set(this.#known.keys());
  }
}

/**
 * What BullMQ says about the job of every final report (completed, failed, refused) that
 * `followed` accepts, in one round trip. A final report is believed only when the named host's
 * own job agrees (host-reducer.ts isConfirmed): a source's word is not enough, not even about
 * its own hosts. `followed` may say which queue the report's sequence was put in (the job is
 * looked up there); without it, where the host's registration routes it now.
 */
export async function finalOutcomes(
  redis: Redis,
  prefix: string,
  reps: StepReport[],
  followed: (r: StepReport) => false | { route?: JobRoute },
): Promise<Map<StepReport, JobOutcome>> {
  const out = new Map<StepReport, JobOutcome>();
  const todo: { r: StepReport; route?: JobRoute }[] = [];
  for (const r of reps) {
    if (!FINAL_EVENTS.includes(r?.event) || !Number.isSafeInteger(r.seq) || typeof r.step !== 'string') continue;
    const f = followed(r);
    if (f) todo.push({ r, route: f.route });
  }
  if (todo.length === 0) return out;
  const res = await jobOutcomes(
    redis,
    prefix,
    todo.map(({ r, route }) => ({ host: r.host, jobId: stepBaseId(r.rollout, r.seq, r.step), route })),
  );
  for (const [i, { r }] of todo.entries()) out.set(r, res[i]);
  return out;
}
