/**
 * Running one step of a job: check-then-apply under the step's deadline, and the step's
 * progress reports, sent at most once per interval. The job loop around it is worker.ts.
 */
import { scError } from '../../shared/errors.js';
import type { StepJob, StepTransport } from '../../shared/protocol/transport.js';
import { RebootSignal } from './machine/driver.js';
import type { Step, StepContext, StepProgress } from './steps/index.js';

/** The report fields every event of one job carries. */
export type Base = { rollout: string; seq: number; step: string };

/**
 * A step's progress reporter: `report` keeps the latest value, `flush` sends it unless it was
 * sent already, `stop` ends the ticker.
 */
export interface ProgressThrottle {
  report(p: StepProgress): void;
  flush(): void;
  stop(): void;
}

/** Starts the progress reporter of one job's step; `stop` it when the step ends. */
export function throttleProgress(t: StepTransport, job: StepJob, base: Base, intervalMs: number): ProgressThrottle {
  // Progress: the latest value is sent at most once per interval, to BullMQ and the stream.
  let latest: StepProgress | null = null;
  let sent: StepProgress | null = null;
  const flush = () => {
    if (!latest || latest === sent) return;
    const p = latest;
    sent = p;
    const percent = p.total ? Math.min(100, Math.floor((p.bytes / p.total) * 1000) / 10) : undefined;
    void t.progress(job, { bytes: p.bytes, total: p.total, percent }, { ...base, event: 'progress', bytes: p.bytes, percent });
  };
  const ticker = setInterval(flush, intervalMs);
  return {
    report: (p) => {
      latest = p;
    },
    flush,
    stop: () => clearInterval(ticker),
  };
}

/**
 * Runs `step` for `ctx` under the step's deadline (withDeadline): `check` first, and when it
 * finds the effect in place the step is logged and reported as skipped; else `apply`.
 */
export function runStep(step: Step, ctx: StepContext, abort: AbortController): Promise<Record<string, unknown>> {
  return withDeadline(step.timeoutMs, abort, async () => {
    const done = await step.check(ctx);
    if (done) {
      await ctx.log(`already done: ${done}`);
      return { skipped: true, reason: done };
    }
    return step.apply(ctx);
  });
}

/**
 * Runs `fn` with a deadline: when it passes, `abort` is aborted with SC_ERR_TIMEOUT and, once
 * `fn` has settled (so a timed-out step never keeps writing while the job is retried), the
 * promise rejects with SC_ERR_TIMEOUT.
 */
async function withDeadline<T>(ms: number, abort: AbortController, fn: () => Promise<T>): Promise<T> {
  let timedOut = false;
  const t = setTimeout(() => {
    timedOut = true;
    abort.abort(scError('SC_ERR_TIMEOUT', `step took longer than ${ms} ms`));
  }, ms);
  try {
    const r = await fn();
    if (timedOut) throw scError('SC_ERR_TIMEOUT', `step took longer than ${ms} ms`);
    return r;
  } catch (err) {
    if (timedOut && !(err instanceof RebootSignal)) throw scError('SC_ERR_TIMEOUT', `step took longer than ${ms} ms`);
    throw err;
  } finally {
    clearTimeout(t);
  }
}
