/**
 * Injectable time: idle timeouts, backoff, negative-cache expiry and "down" marks read it, so
 * tests can move time instead of sleeping. The stage re-exports it (services/stage/clock.ts);
 * the ranged blob request (shared/fetch-range.ts) arms its idle timer on it.
 */

/** A source of time and timers. `now()` is milliseconds since the epoch. */
export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

/** The real clock (Date.now and the global timers; timers are unref'd so they never hold the process). */
export const realClock: Clock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => {
    const t = setTimeout(fn, ms);
    t.unref?.();
    return t;
  },
  clearTimeout: (h) => clearTimeout(h as NodeJS.Timeout),
};

/** Resolves after `ms` on `clock`, or at once when `signal` aborts. */
export function sleep(clock: Clock, ms: number, signal?: AbortSignal): Promise<void> {
  if (ms <= 0 || signal?.aborted) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clock.clearTimeout(h);
      signal?.removeEventListener('abort', done);
      resolve();
    };
    const h = clock.setTimeout(done, ms);
    signal?.addEventListener('abort', done, { once: true });
  });
}
