/**
 * Plumbing shared by the tar packer and extractor: waiting on a writable's back-pressure, and
 * giving the event loop its turns while extracting (file system errors become ScErrors with
 * fsFailure, shared/errors.ts).
 */

/**
 * Resolves when a writable wants more, or is closed (destroyed). A writable already destroyed
 * (or being destroyed: streamx's `destroying`) resolves at once: its 'close' may have fired
 * before this was called, and waiting for it would hang the writer for ever.
 */
export function drained(w: { once(ev: string, fn: () => void): unknown; off(ev: string, fn: () => void): unknown; destroyed?: boolean; destroying?: boolean }): Promise<void> {
  if (w.destroyed || w.destroying) return Promise.resolve();
  return new Promise<void>((res) => {
    const done = () => {
      w.off('drain', done);
      w.off('close', done);
      res();
    };
    w.once('drain', done);
    w.once('close', done);
  });
}

/**
 * Gives the event loop a turn (timers, I/O) once `everyMs` of work has passed since the last
 * one. The extractor's work is synchronous system calls chained by promises that are mostly
 * resolved already: left alone, a busy unpack keeps the loop from its timers and sockets for as
 * long as data is buffered (seconds at a time on a loaded machine, tens of seconds on a slow
 * one), and a step's progress reports, its deadline and its requests wait that long.
 */
export class Breather {
  readonly #everyMs: number;
  #last = performance.now();

  constructor(everyMs: number) {
    this.#everyMs = everyMs;
  }

  /** True when a turn is due. */
  due(): boolean {
    return performance.now() - this.#last >= this.#everyMs;
  }

  /** Resolves after the event loop has run its timers and I/O once. */
  async breathe(): Promise<void> {
    // setImmediate from the check phase runs in the next turn, after its timers and poll phases.
    await new Promise<void>((res) => setImmediate(res));
    await new Promise<void>((res) => setImmediate(res));
    this.#last = performance.now();
  }
}
