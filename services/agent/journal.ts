/**
 * The host's own record of the step jobs it ran: what lets the agent refuse a replayed job. A
 * transport (the colo's relay, the host's queue in Redis, the network in between) can hand the
 * host any job control ever signed for it; the signature proves the job came from control, not
 * that it is still due. The journal is the host's memory of what it already did, and the only
 * thing the agent believes about re-adoption: what a transport says (`readopted`, `processedOn`)
 * is never trusted.
 *
 * ## Content (`journal.json`, JSON, schema 1)
 * `{v: 1, host, rollouts: {<rollout id>: Entry}}` where Entry is
 * - `done`: the highest step sequence number (`seq`) this host finished in that rollout (-1: none);
 * - `total`: the sequence's length, from the signed payload;
 * - `started`: the one job started and not finished: `{job, digest, seq, step, at, ran?,
 *   failures?}` (BullMQ job id, stepPayloadDigest of its signed payload, start time by the host's
 *   clock in ms, `ran` once the step's run ended well and only the job's completion is left, and
 *   the number of failed runs);
 * - `ended`: `finished` once step `total - 1` is done, `failed` once a step failed for good here
 *   (a permanent failure, an abort, or as many failed runs as a job has attempts, counted here);
 * - `exp`: the latest expiry of a job of that rollout seen (entries are pruned 30 days after it).
 *
 * ## Rules (admit below)
 * A job whose rollout ended here, or whose `seq` is at or below `done`, is a replay. A job is
 * re-adopted only when `started` names exactly it (job id and payload digest); its expiry is then
 * checked as of `started.at`. Any other job is taken fresh: its expiry is checked by the host's
 * clock now, and it must be the next step (`done + 1`, or `started.seq + 1` when the started step
 * `ran`: the host died between completing its job in the queue and writing `finish`).
 *
 * ## When it is written
 * `begin` before a step's first effect, `ran` when the step's run ended well, `finish` after the
 * step's job was completed in the queue, `failed` after a failed run (before the queue hears of
 * it), `end` after an abort. A crash between a step's
 * completion and `finish` leaves `started` (ran) in place: the job is gone from the queue, and the
 * next step is accepted as `started.seq + 1`; a step that did not run to its end keeps the next
 * one out. A refusal writes nothing.
 *
 * ## Where (bundles.ts journalPaths)
 * Two copies, both written atomically and durably (shared/fs-atomic.ts: temp file, fsync, rename,
 * fsync of the directory), so a copy written before a step's first effect survives a power cut:
 * - the running OS's state dir, `<root of the running device>/var/lib/stagecoach/journal.json`,
 *   the only one before disk 2 is laid out (steps `fetch` and `partition` run there);
 * - the kept store on disk2p2, `<disk2p2>/stagecoach/journal.json`, once disk2p2 has a
 *   filesystem. It survives wiping disk 1, so B and C share A's record.
 * Every write goes to every copy that exists; every read merges them (per rollout: the highest
 * `done`, the `started` of the highest `seq` above it, any `ended`). So the state dir of OS A
 * carries the record across `partition` (which may lay out a disk2p2 holding an old journal),
 * disk2p2 carries it across `wipe-target-disk`, and the copy in an OS that stops running (A
 * after the swap, B once C runs) only ever lags behind. A copy that is torn or unreadable counts
 * as empty; a write that fails on every copy fails the step before it starts.
 */
import { join } from 'node:path';
import { scError } from '../../shared/errors.js';
import { writeFileAtomic } from '../../shared/fs-atomic.js';
import { journalPaths, readJson } from './bundles.js';
import type { StepPayload } from '../../shared/protocol/index.js';
import type { MachineDriver } from './machine/driver.js';

/** The job started and not finished. */
export interface StartedJob {
  /** BullMQ job id as the transport named it. */
  job: string;
  /** stepPayloadDigest of the signed payload. */
  digest: string;
  seq: number;
  step: string;
  /** When this host first took it (its own clock, ms). */
  at: number;
  /** Set once the step's run ended well, before its job is completed in the queue. */
  ran?: boolean;
  /** Failed runs of this job so far. */
  failures?: number;
}

/** What the journal says about one rollout. */
export interface JournalEntry {
  done: number;
  total: number;
  started?: StartedJob;
  ended?: 'finished' | 'failed';
  exp: number;
}

/** The whole journal. */
export interface JournalDoc {
  v: 1;
  host: string;
  rollouts: Record<string, JournalEntry>;
}

/** How a verified job is to be treated. */
export type Admission =
  | { kind: 'fresh' }
  /** This host started exactly this job and did not finish it: run it again (expiry as of `since`). */
  | { kind: 'readopt'; since: number }
  /** Already done here, or its rollout ended here: refuse (SC_ERR_JOB_REPLAYED). */
  | { kind: 'replayed'; reason: string }
  /** Not the next step of its rollout: refuse (SC_ERR_JOB_REJECTED, reason out-of-order). */
  | { kind: 'out-of-order'; reason: string };

/** File name of the journal in both places. */
export const JOURNAL_FILE = 'journal.json';

/** Entries are kept this long after their jobs expired, ms (a replay of older jobs fails their expiry). */
const KEEP_AFTER_EXP_MS = 30 * 24 * 3600 * 1000;

/** The journal's verdict on a verified job `p` handed out as `jobId` (see the rules above). Pure. */
export function admit(doc: JournalDoc, p: StepPayload, jobId: string, digest: string): Admission {
  const e = doc.rollouts[p.rollout];
  if (!e) return p.seq === 0 ? { kind: 'fresh' } : { kind: 'out-of-order', reason: `step ${p.seq} of rollout ${p.rollout}, which this host never started` };
  if (e.ended === 'finished') return { kind: 'replayed', reason: `rollout ${p.rollout} is finished on this host` };
  if (e.ended === 'failed') return { kind: 'replayed', reason: `rollout ${p.rollout} ended on this host with a failure` };
  if (p.seq <= e.done) return { kind: 'replayed', reason: `step ${p.seq} (${p.step}) of rollout ${p.rollout} was already finished on this host` };
  const s = e.started;
  if (s && s.job === jobId && s.digest === digest) return { kind: 'readopt', since: s.at };
  if (p.seq === e.done + 1 || (s?.ran && p.seq === s.seq + 1)) return { kind: 'fresh' };
  return { kind: 'out-of-order', reason: `step ${p.seq} of rollout ${p.rollout} is not next on this host (finished: ${e.done})` };
}

/** Merges journal copies (see "Where" above). */
export function mergeJournals(host: string, docs: readonly (JournalDoc | null)[]): JournalDoc {
  const out: JournalDoc = { v: 1, host, rollouts: {} };
  for (const d of docs) {
    if (d?.v !== 1 || typeof d.rollouts !== 'object' || d.rollouts === null) continue;
    for (const [id, raw] of Object.entries(d.rollouts)) {
      const e = sane(raw);
      if (!e) continue;
      const cur = out.rollouts[id];
      if (!cur) {
        out.rollouts[id] = e;
        continue;
      }
      const m: JournalEntry = { done: Math.max(cur.done, e.done), total: Math.max(cur.total, e.total), exp: Math.max(cur.exp, e.exp) };
      const starts = [cur.started, e.started].filter((x): x is StartedJob => !!x).sort((a, b) => b.seq - a.seq || b.at - a.at || Number(!!b.ran) - Number(!!a.ran));
      if (starts[0]) m.started = starts[0];
      if (cur.ended === 'finished' || e.ended === 'finished') m.ended = 'finished';
      else if (cur.ended === 'failed' || e.ended === 'failed') m.ended = 'failed';
      out.rollouts[id] = m;
    }
  }
  for (const e of Object.values(out.rollouts)) if (e.started && (e.started.seq <= e.done || e.ended)) delete e.started;
  return out;
}

function sane(raw: unknown): JournalEntry | null {
  const r = raw as Partial<JournalEntry> | null;
  if (!r || typeof r !== 'object' || !Number.isSafeInteger(r.done)) return null;
  const e: JournalEntry = { done: r.done as number, total: Number.isSafeInteger(r.total) ? (r.total as number) : 0, exp: typeof r.exp === 'number' ? r.exp : 0 };
  const s = r.started;
  if (s && typeof s === 'object' && typeof s.job === 'string' && typeof s.digest === 'string' && Number.isSafeInteger(s.seq) && typeof s.at === 'number') {
    e.started = {
      job: s.job,
      digest: s.digest,
      seq: s.seq,
      step: String(s.step ?? ''),
      at: s.at,
      ...(s.ran === true ? { ran: true } : {}),
      ...(Number.isSafeInteger(s.failures) ? { failures: s.failures } : {}),
    };
  }
  if (r.ended === 'finished' || r.ended === 'failed') e.ended = r.ended;
  return e;
}

/** The journal of one host (see the top of this file). One agent per machine uses it at a time. */
export class Journal {
  readonly #driver: MachineDriver;
  readonly #host: string;
  readonly #now: () => number;

  constructor(o: { driver: MachineDriver; hostId: string; now?: () => number }) {
    this.#driver = o.driver;
    this.#host = o.hostId;
    this.#now = o.now ?? Date.now;
  }

  /** The merged journal of every copy there is (empty when none). */
  async read(): Promise<JournalDoc> {
    const dirs = await journalPaths(this.#driver);
    const docs = await Promise.all(dirs.map((d) => readJson<JournalDoc>(join(d, JOURNAL_FILE)).catch(() => null)));
    return mergeJournals(this.#host, docs);
  }

  /** The verdict on a verified job (admit over the merged journal). */
  async admit(p: StepPayload, jobId: string, digest: string): Promise<Admission> {
    return admit(await this.read(), p, jobId, digest);
  }

  /**
   * Records that this host starts job `jobId` (`digest`) of `p` (before its first effect):
   * every step before it counts as finished. A re-adoption keeps the first start time.
   */
  async begin(p: StepPayload, jobId: string, digest: string): Promise<void> {
    await this.#update((doc) => {
      const e = entry(doc, p);
      e.done = Math.max(e.done, p.seq - 1);
      const same = e.started && e.started.job === jobId && e.started.digest === digest;
      e.started = same ? e.started : { job: jobId, digest, seq: p.seq, step: p.step, at: this.#now() };
    });
  }

  /** Records that the run of the started job `jobId` of `p` ended well (before its job is completed). */
  async ran(p: StepPayload, jobId: string, digest: string): Promise<void> {
    await this.#update((doc) => {
      const s = entry(doc, p).started;
      if (s && s.job === jobId && s.digest === digest) s.ran = true;
    });
  }

  /** Records that step `p.seq` is finished (its job completed); the last step finishes the rollout. */
  async finish(p: StepPayload): Promise<void> {
    await this.#update((doc) => {
      const e = entry(doc, p);
      e.done = Math.max(e.done, p.seq);
      if (e.started && e.started.seq <= e.done) delete e.started;
      if (e.done >= e.total - 1) e.ended = 'finished';
    });
  }

  /** Records that the rollout of `p` failed for good on this host: none of its jobs runs again. */
  async end(p: StepPayload): Promise<void> {
    await this.#update((doc) => {
      const e = entry(doc, p);
      delete e.started;
      e.ended ??= 'failed';
    });
  }

  /**
   * Records a failed run of the started job `jobId` of `p`. The rollout ends here (as `end`) when
   * the failure is `permanent` or the job has failed `maxAttempts` times by this host's count,
   * whatever the transport says about retries. Returns true when it ended.
   */
  async failed(p: StepPayload, jobId: string, digest: string, permanent: boolean, maxAttempts: number): Promise<boolean> {
    let ended = false;
    await this.#update((doc) => {
      const e = entry(doc, p);
      const s = e.started && e.started.job === jobId && e.started.digest === digest ? e.started : undefined;
      if (s) s.failures = (s.failures ?? 0) + 1;
      if (permanent || (s?.failures ?? 0) >= maxAttempts) {
        delete e.started;
        e.ended ??= 'failed';
        ended = true;
      }
    });
    return ended;
  }

  async #update(fn: (doc: JournalDoc) => void): Promise<void> {
    const dirs = await journalPaths(this.#driver);
    if (dirs.length === 0) throw scError('SC_ERR_CONFLICT', 'no place for the journal: the machine runs no OS with a state dir');
    const docs = await Promise.all(dirs.map((d) => readJson<JournalDoc>(join(d, JOURNAL_FILE)).catch(() => null)));
    const doc = mergeJournals(this.#host, docs);
    fn(doc);
    const now = this.#now();
    for (const [id, e] of Object.entries(doc.rollouts)) if (e.exp && e.exp + KEEP_AFTER_EXP_MS < now && !e.started) delete doc.rollouts[id];
    const text = `${JSON.stringify(doc)}\n`;
    const res = await Promise.allSettled(dirs.map((d) => writeFileAtomic(join(d, JOURNAL_FILE), text, { mode: 0o600, mkdirs: true })));
    const ok = res.filter((r) => r.status === 'fulfilled').length;
    if (ok === 0) throw scError('SC_ERR_INTERNAL', `cannot write the journal: ${(res[0] as PromiseRejectedResult).reason?.message ?? 'unknown error'}`);
  }
}

function entry(doc: JournalDoc, p: StepPayload): JournalEntry {
  doc.rollouts[p.rollout] ??= { done: -1, total: p.total, exp: p.exp };
  const e = doc.rollouts[p.rollout];
  e.total = Math.max(e.total, p.total);
  e.exp = Math.max(e.exp, p.exp);
  return e;
}
