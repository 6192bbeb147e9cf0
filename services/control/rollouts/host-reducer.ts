/**
 * Owns the host state machine: how one step report, or one failure, changes a rollout host, its
 * rescue, or a host operation. Pure: no I/O and no clock (time comes in as `now`); inputs are
 * never modified, a changed host or operation is a new object, an unchanged one is returned as is.
 *
 * Final reports (`completed`, `failed`, `refused`) are believed only when the step's BullMQ job
 * agrees (`outcome`, see `isConfirmed`): an unconfirmed `completed` or `refused` changes
 * nothing, an unconfirmed `failed` only marks the step as retrying.
 */
import type { StepReport } from '../../../shared/protocol/index.js';
import { failureOf } from '../../../shared/protocol/index.js';
import type { JobOutcome } from '../queues.js';
import { type HostOp, type HostState, PONR_SEQ, LAST_SEQ, type StepState, TERMINAL_HOST } from './model.js';

/** Report events that settle a step: believed only when the step's BullMQ job agrees. */
export const FINAL_EVENTS: readonly string[] = ['completed', 'failed', 'refused'];
/** How many report lines a host or operation keeps. */
export const LOG_TAIL = 20;

/** The error code of a confirmed failure report: the host's, else the one in BullMQ's reason. */
export function failCode(rep: StepReport, o?: JobOutcome): string {
  return rep.code ?? failureOf(o?.failedReason)?.code ?? (rep.event === 'refused' ? 'SC_ERR_JOB_REJECTED' : 'SC_ERR_STEP_FAILED');
}

/** The error message of a confirmed failure report: the host's, else BullMQ's reason, else the event. */
export function failMessage(rep: StepReport, o?: JobOutcome): string {
  return rep.message ?? o?.failedReason ?? rep.event;
}

/**
 * True when the BullMQ job a final report names is in the state it claims, reached under the
 * lock the host holds: completed by the host's lock holder, or failed (by its lock holder, or by
 * BullMQ itself, which fails a parent whose child failed without anyone taking it).
 */
export function isConfirmed(rep: StepReport, o: JobOutcome | undefined): boolean {
  if (o && rep.event === 'completed') return o.state === 'completed' && o.byHost;
  if (o && (rep.event === 'failed' || rep.event === 'refused')) return o.state === 'failed';
  return false;
}

/** True for a final report that changes nothing at all: a `completed` or `refused` its job does not confirm. */
export function isIgnoredFinal(rep: StepReport, o: JobOutcome | undefined): boolean {
  return FINAL_EVENTS.includes(rep.event) && !isConfirmed(rep, o) && rep.event !== 'failed';
}

/** `list` plus the report's line (`HH:MM:SS step event [code: message]`), cut to the last LOG_TAIL lines. */
export function withLogLine(list: readonly string[], rep: StepReport, now: number): string[] {
  const t = new Date(rep.ts || now).toISOString().slice(11, 19);
  const extra = [rep.code, rep.message].filter(Boolean).join(': ');
  const out = [...list, `${t} ${rep.step} ${rep.event}${extra ? ` ${extra}` : ''}`.slice(0, 500)];
  return out.length > LOG_TAIL ? out.slice(out.length - LOG_TAIL) : out;
}

/** The state of `step` in `steps`, if the host reported it (own keys only). */
function stepOf(steps: Record<string, StepState>, step: string): StepState | undefined {
  return Object.hasOwn(steps, step) ? steps[step] : undefined;
}

/** How a report is read: BullMQ's view of its job, the time, and which run of the host it is about. */
export interface ReportContext {
  /** Now, in ms since the epoch: the host's `lastEventAt`, and the time of a report without `ts`. */
  now: number;
  /** BullMQ's view of the job of a final report (undefined: not looked up, i.e. unconfirmed). */
  outcome?: JobOutcome;
  /** True when the report is about the host's rescue run (`<rollout>-rescue`), not its conversion. */
  rescue?: boolean;
}

/**
 * The rollout host after one report. Every report that is not ignored (isIgnoredFinal) sets
 * `lastEventAt`. A host in a terminal status changes no further; a rescue report changes only
 * the host's `rescue` and log (and nothing when the host has no rescue).
 */
export function applyReport(host: HostState, rep: StepReport, ctx: ReportContext): HostState {
  if (isIgnoredFinal(rep, ctx.outcome)) return host;
  const confirmed = FINAL_EVENTS.includes(rep.event) && isConfirmed(rep, ctx.outcome);
  const h: HostState = { ...host, lastEventAt: ctx.now };
  if (ctx.rescue) return h.rescue ? applyRescueReport(h, rep, confirmed, ctx) : h;
  return applyConvertReport(h, rep, confirmed, ctx);
}

/** `h` is the caller's own copy: its top-level fields may be set, nested objects are replaced. */
function applyConvertReport(h: HostState, rep: StepReport, confirmed: boolean, ctx: ReportContext): HostState {
  if (TERMINAL_HOST.includes(h.status)) return h;
  const ts = rep.ts || ctx.now;
  if (rep.event !== 'progress') h.log = withLogLine(h.log, rep, ctx.now);
  const st: StepState = { ...(stepOf(h.steps, rep.step) ?? { state: 'running' }) };
  h.steps = { ...h.steps, [rep.step]: st };
  switch (rep.event) {
    case 'started':
      h.status = 'running';
      h.startedAt ??= ts;
      h.step = rep.step;
      h.seq = rep.seq;
      st.state = 'running';
      st.startedAt ??= ts;
      break;
    case 'progress':
      if (typeof rep.percent === 'number') st.percent = rep.percent;
      if (typeof rep.bytes === 'number') st.bytes = rep.bytes;
      break;
    case 'rebooting':
      st.note = 'rebooting';
      break;
    case 'completed':
      st.state = 'completed';
      st.finishedAt = ts;
      st.percent = 100;
      h.step = rep.step;
      h.seq = rep.seq;
      if (rep.seq >= LAST_SEQ) {
        h.status = 'converted';
        h.finishedAt = ts;
      }
      break;
    case 'failed':
    case 'refused':
      st.state = 'retrying';
      h.step = rep.step;
      h.seq = rep.seq;
      // Final only when BullMQ moved the job to its failed set (else it is being retried).
      if (confirmed) return failHost(h, { step: rep.step, seq: rep.seq, code: failCode(rep, ctx.outcome), message: failMessage(rep, ctx.outcome), ts });
      break;
    default:
      break;
  }
  return h;
}

function applyRescueReport(h: HostState, rep: StepReport, confirmed: boolean, ctx: ReportContext): HostState {
  const r = { ...h.rescue! };
  if (rep.event !== 'progress') h.log = withLogLine(h.log, rep, ctx.now);
  if (rep.event === 'started' && r.state === 'queued') r.state = 'running';
  else if (rep.event === 'completed') r.state = 'done';
  else if ((rep.event === 'failed' || rep.event === 'refused') && confirmed) {
    r.state = 'failed';
    r.error = `${failCode(rep, ctx.outcome)}: ${failMessage(rep, ctx.outcome)}`.slice(0, 500);
  }
  h.rescue = r;
  return h;
}

/** A final failure of a host's sequence at `step` (position `seq`), at time `ts`. */
export interface HostFailure {
  step: string;
  seq: number;
  code: string;
  message: string;
  ts: number;
}

/**
 * The host after its sequence failed for good: `aborted` for SC_ERR_ABORTED, else `failed`.
 * Past the point of no return (a step after commit-base) a failed host gets a queued rescue
 * (back to B), never left on a half-written disk 1. A terminal host is returned unchanged.
 */
export function failHost(host: HostState, f: HostFailure): HostState {
  if (TERMINAL_HOST.includes(host.status)) return host;
  const st: StepState = { ...(stepOf(host.steps, f.step) ?? { state: 'failed' }), state: 'failed', finishedAt: f.ts };
  const h: HostState = {
    ...host,
    steps: { ...host.steps, [f.step]: st },
    finishedAt: f.ts,
    error: { step: f.step, seq: f.seq, code: f.code, message: f.message.slice(0, 1000) },
  };
  if (f.code === 'SC_ERR_ABORTED') {
    h.status = 'aborted';
  } else {
    h.status = 'failed';
    if (f.seq > PONR_SEQ && !h.rescue) h.rescue = { state: 'queued', enqueued: false, at: f.ts };
  }
  return h;
}

/** True once a host operation is over. */
export function opFinished(op: HostOp): boolean {
  return op.status === 'done' || op.status === 'failed';
}

/**
 * The host operation after one report (same confirmation rules as applyReport). A finished
 * operation, or an ignored report, returns `op` itself; anything else a new object.
 */
export function applyOpReport(op: HostOp, rep: StepReport, ctx: Omit<ReportContext, 'rescue'>): HostOp {
  if (isIgnoredFinal(rep, ctx.outcome) || opFinished(op)) return op;
  const confirmed = FINAL_EVENTS.includes(rep.event) && isConfirmed(rep, ctx.outcome);
  const next: HostOp = { ...op };
  if (rep.event !== 'progress') next.log = withLogLine(op.log, rep, ctx.now);
  if (rep.event === 'started') {
    next.status = 'running';
    next.step = rep.step;
    next.seq = rep.seq;
  } else if (rep.event === 'completed') {
    next.step = rep.step;
    next.seq = rep.seq;
    if (rep.seq >= op.steps.length - 1) {
      next.status = 'done';
      next.finishedAt = rep.ts || ctx.now;
    }
  } else if ((rep.event === 'failed' || rep.event === 'refused') && confirmed) {
    return failOp(next, { step: rep.step, code: failCode(rep, ctx.outcome), message: failMessage(rep, ctx.outcome), ts: rep.ts === undefined ? ctx.now : rep.ts });
  }
  return next;
}

/** The host operation after it failed for good at `step`; a finished one is returned unchanged. */
export function failOp(op: HostOp, f: Omit<HostFailure, 'seq'>): HostOp {
  if (opFinished(op)) return op;
  return { ...op, status: 'failed', error: { step: f.step, code: f.code, message: f.message.slice(0, 1000) }, finishedAt: f.ts };
}
