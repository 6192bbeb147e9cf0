/**
 * Owns control's side of the agents' reports stream: the consumer group `control`, reads with
 * ONE blocking connection (after a failure, first our own unacknowledged entries again, then new
 * ones), decoding, acknowledgement, and looking up BullMQ's view of the jobs final reports name.
 */
import type { Redis } from 'ioredis';
import { decodeReport, type StepReport } from '../../../shared/protocol/index.js';
import type { Logger } from '../../../shared/log.js';
import { type JobOutcome, jobOutcomes, stepJobId } from '../queues.js';
import { FINAL_EVENTS } from './host-reducer.js';

const GROUP = 'control';
const BATCH = 500;

/** A stream entry: id and fields (null when the entry was trimmed before we read it). */
export type StreamEntry = [id: string, fields: string[] | null];

/** What the stream reader needs. */
export interface ReportStreamDeps {
  /** For XGROUP and XACK. */
  redis: Redis;
  /** A dedicated connection for the blocking XREADGROUP (maxRetriesPerRequest: null). */
  readerRedis: Redis;
  /** The stream key. */
  stream: string;
  consumer: string;
  /** How long one read blocks (ms). */
  blockMs: number;
  log: Logger;
}

/** Control's consumer of the reports stream. */
export class ReportStream {
  readonly #deps: ReportStreamDeps;
  #readPending = true;

  constructor(deps: ReportStreamDeps) {
    this.#deps = deps;
  }

  /** Creates the consumer group (and the stream) unless it exists. */
  async ensureGroup(): Promise<void> {
    try {
      await this.#deps.redis.xgroup('CREATE', this.#deps.stream, GROUP, '0', 'MKSTREAM');
    } catch (err) {
      if (!/BUSYGROUP/.test((err as Error).message)) throw err;
    }
  }

  /** Reads entries: first our own unacknowledged ones, then new ones (blocking up to blockMs). */
  async read(): Promise<StreamEntry[]> {
    const r = this.#deps.readerRedis;
    const { stream, consumer } = this.#deps;
    if (this.#readPending) {
      const res = (await r.xreadgroup('GROUP', GROUP, consumer, 'COUNT', BATCH, 'STREAMS', stream, '0')) as [string, StreamEntry[]][] | null;
      const entries = res?.[0]?.[1] ?? [];
      // Entries trimmed from the stream come back with null fields: they are acknowledged unread.
      if (entries.length > 0) return entries;
      this.#readPending = false;
    }
    const res = (await r.xreadgroup('GROUP', GROUP, consumer, 'COUNT', BATCH, 'BLOCK', this.#deps.blockMs, 'STREAMS', stream, '>')) as
      | [string, StreamEntry[]][]
      | null;
    return res?.[0]?.[1] ?? [];
  }

  /** The reports of `entries`; malformed ones are logged and left out. */
  decode(entries: StreamEntry[]): StepReport[] {
    const reps: StepReport[] = [];
    for (const [, fields] of entries) {
      if (!fields) continue;
      try {
        reps.push(decodeReport(fields));
      } catch (err) {
        this.#deps.log.warn({ err }, 'ignoring a malformed report');
      }
    }
    return reps;
  }

  /** Acknowledges `entries` (after their effects were persisted). */
  async ack(entries: StreamEntry[]): Promise<void> {
    if (entries.length) await this.#deps.redis.xack(this.#deps.stream, GROUP, ...entries.map(([id]) => id));
  }

  /** After a failure: the next read starts again with our unacknowledged entries. */
  rewind(): void {
    this.#readPending = true;
  }
}

/**
 * What BullMQ says about the job of every final report (completed, failed, refused) that
 * `followed` accepts, in one round trip. Anyone who can write the reports stream (every agent in
 * direct mode, every relay) can write a report naming any host: a final report is believed only
 * when the named host's own job agrees (host-reducer.ts isConfirmed).
 */
export async function finalOutcomes(redis: Redis, prefix: string, reps: StepReport[], followed: (r: StepReport) => boolean): Promise<Map<StepReport, JobOutcome>> {
  const out = new Map<StepReport, JobOutcome>();
  const todo = reps.filter((r) => FINAL_EVENTS.includes(r?.event) && Number.isSafeInteger(r.seq) && typeof r.step === 'string' && followed(r));
  if (todo.length === 0) return out;
  const res = await jobOutcomes(
    redis,
    prefix,
    todo.map((r) => ({ host: r.host, jobId: stepJobId(r.rollout, r.seq, r.step) })),
  );
  for (const [i, r] of todo.entries()) out.set(r, res[i]);
  return out;
}
