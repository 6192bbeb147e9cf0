/**
 * Plumbing shared by the tar packer and extractor: waiting on a writable's back-pressure (file
 * system errors become ScErrors with fsFailure, shared/errors.ts).
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
