/**
 * The relay's record writes, batched: the registrations and step reports of its hosts
 * (services/relay/server.ts) that are asked for in one turn of the event loop go to Redis in one
 * pipeline, with one ring of the report bell and one naming of the colo in `P:relays` for all of
 * them, instead of a MULTI per request. Each request still waits for its own write: `write`
 * resolves only when every command of that write succeeded, and rejects with its first error
 * (or the pipeline's), so a host is never told a report was taken that Redis refused.
 *
 * Why: at a thousand hosts the relay answers hundreds of requests a second, and a MULTI per
 * request costs more than its commands. A pipeline's commands go out in a write of their own (on
 * the relay's writes connection, which holds no BullMQ scripts: a pipeline made on a connection
 * copies every script of it).
 * A report and the bell ring that follows it still go in one pipeline, in that order, so control
 * never hears a ring before the report is in its stream.
 */
import type { Redis } from 'ioredis';
import { announceRelay, type HostRecord, queuePresence, queueReport, ringReportBell, type Source, type StepReport } from '../../shared/protocol/index.js';

interface PendingWrite {
  host: string;
  fields: Partial<HostRecord> | null;
  report: StepReport | null;
  resolve: () => void;
  reject: (err: Error) => void;
}

/** Writes of one relay's hosts (see the top of this file). */
export class RecordBatch {
  readonly #redis: Redis;
  readonly #prefix: string;
  readonly #source: Source & { kind: 'relay' };
  readonly #maxLen: number;
  readonly #now: () => number;
  #pending: PendingWrite[] = [];
  #scheduled = false;
  /** Pipelines sent so far (tests count them). */
  flushes = 0;

  constructor(o: { redis: Redis; prefix: string; colo: string; reportsMaxLen: number; now: () => number }) {
    this.#redis = o.redis;
    this.#prefix = o.prefix;
    this.#source = { kind: 'relay', colo: o.colo };
    this.#maxLen = o.reportsMaxLen;
    this.#now = o.now;
  }

  /** Writes `fields` into the host's registration and appends `report` to the colo's stream; resolves once Redis took both. */
  write(host: string, fields: Partial<HostRecord> | null, report: StepReport | null): Promise<void> {
    if (!fields && !report) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.#pending.push({ host, fields, report, resolve, reject });
      if (this.#scheduled) return;
      this.#scheduled = true;
      setImmediate(() => this.#flush());
    });
  }

  #flush(): void {
    const batch = this.#pending;
    this.#pending = [];
    this.#scheduled = false;
    const pipe = this.#redis.pipeline();
    const spans: [number, number][] = [];
    let presence = false;
    let reports = false;
    const now = this.#now();
    for (const w of batch) {
      const from = pipe.length;
      if (w.fields) {
        queuePresence(pipe, this.#prefix, this.#source, w.host, w.fields, now, false);
        presence = true;
      }
      if (w.report) {
        queueReport(pipe, this.#prefix, this.#source, w.report, this.#maxLen, false);
        reports = true;
      }
      spans.push([from, pipe.length]);
    }
    const announceAt = presence ? pipe.length : -1;
    if (presence) announceRelay(pipe, this.#prefix, this.#source.colo);
    const ringAt = reports ? pipe.length : -1;
    if (reports) ringReportBell(pipe, this.#prefix, this.#source);
    this.flushes++;
    pipe.exec().then(
      (res) => {
        const errAt = (from: number, to: number): Error | null => {
          for (let i = from; i < to; i++) if (res?.[i]?.[0]) return res[i][0] as Error;
          return null;
        };
        // The announce belongs to every registration write of the batch, the ring to every report.
        const announceErr = announceAt < 0 ? null : errAt(announceAt, announceAt + 1);
        const ringErr = ringAt < 0 ? null : errAt(ringAt, ringAt + 1);
        batch.forEach((w, i) => {
          const err = errAt(...spans[i]) ?? (w.fields ? announceErr : null) ?? (w.report ? ringErr : null);
          if (err) w.reject(err);
          else w.resolve();
        });
      },
      (err: Error) => {
        for (const w of batch) w.reject(err);
      },
    );
  }
}
