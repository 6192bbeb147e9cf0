/**
 * The store's write lock and upload pins: what keeps garbage collection from racing the writes
 * of FsBlobStore (see services/origin/gc.ts for the safety argument).
 *
 * - `exclusive(fn)`: one holder at a time, in arrival order. Manifest writes and removals, the
 *   "is this blob already stored?" check of an upload, and the sweep of a collection take it.
 * - `pin(digest)`: taken synchronously when an upload of `digest` starts and given back when it
 *   ends (stored, refused or failed). A pinned digest is never swept.
 * One guard per store instance: like the store, it assumes one process owns the data directory.
 */
import type { Digest } from '../../shared/digest.js';

/** The lock and pins of one store. */
export class StoreGuard {
  #tail: Promise<unknown> = Promise.resolve();
  readonly #pins = new Map<Digest, number>();

  /**
   * Runs `fn` once every earlier holder is done; resolves or rejects as `fn` does. `fn` must
   * not call `exclusive` itself (that would wait for itself forever).
   */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#tail.then(fn);
    this.#tail = run.catch(() => undefined);
    return run;
  }

  /** Pins `digest` until the returned function is called (calling it again does nothing). */
  pin(digest: Digest): () => void {
    this.#pins.set(digest, (this.#pins.get(digest) ?? 0) + 1);
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const n = (this.#pins.get(digest) ?? 1) - 1;
      if (n <= 0) this.#pins.delete(digest);
      else this.#pins.set(digest, n);
    };
  }

  /** True while an upload of `digest` is in progress. */
  pinned(digest: Digest): boolean {
    return this.#pins.has(digest);
  }
}
