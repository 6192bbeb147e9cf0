/**
 * The sha256 of a download's partial file (shared/fetch-pull.ts, fetchBlob): what the digest
 * check at the end compares.
 *
 * Small blobs are hashed inline, from the bytes as they are written. Large ones are hashed on a
 * thread of its own that reads back what was written: on the download's thread, sha256 was the
 * largest cost of receiving a blob (0.43 s of a 1.3 s fetch of 572 MiB over loopback), and in
 * the overlapped fetch + unpack that thread also extracts the tar. Either way the hash covers
 * the file's first bytes in order, and only bytes whose write completed count as written.
 */
import { createHash, type Hash } from 'node:crypto';
import { Worker } from 'node:worker_threads';

/** Blob size from which the partial file is hashed on a thread of its own. */
export const HASH_THREAD_MIN_BYTES = 64 << 20;

/** The running sha256 of a partial file's first bytes. */
export interface PartialHash {
  /** True when it reads the file back itself (`add` is then a no-op). */
  readonly readsFile: boolean;
  /** The bytes being written next, right after those already added (hashed here when inline). */
  add(bufs: readonly Buffer[]): void;
  /** The file's first `end` bytes are written (read back and hashed when on a thread). */
  written(end: number): void;
  /**
   * The file was emptied. Only after `digest()` settled or before anything was written: a read
   * still pending on the thread would meet the shorter file and fail the hash.
   */
  reset(): void;
  /** Hex sha256 of everything added or written so far. Rejects when the thread failed (a read error). */
  digest(): Promise<string>;
  /** Stops the thread: once it resolves, nothing reads the file any more. */
  close(): Promise<void>;
}

/** The hash for a partial file of a `size`-byte blob open as `fd`: on a thread from `threadMinBytes` up. */
export function partialHash(fd: number, size: number, threadMinBytes = HASH_THREAD_MIN_BYTES): PartialHash {
  return size >= threadMinBytes ? new ThreadHash(fd) : new InlineHash();
}

class InlineHash implements PartialHash {
  readonly readsFile = false;
  #h: Hash = createHash('sha256');

  add(bufs: readonly Buffer[]): void {
    for (const b of bufs) this.#h.update(b);
  }

  written(): void {}

  reset(): void {
    this.#h = createHash('sha256');
  }

  async digest(): Promise<string> {
    return this.#h.copy().digest('hex');
  }

  async close(): Promise<void> {}
}

/**
 * The thread: `{end}` hashes the file from where it is up to `end` (pread, 4 MiB at a time),
 * `{reset}` starts over, `{digest}` answers `{digest, at}`; after a failed read every digest
 * answers `{error}`. Messages are handled in order, so a digest covers every `end` sent before it.
 */
const THREAD_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const { readSync } = require('node:fs');
const { createHash } = require('node:crypto');
const buf = Buffer.allocUnsafeSlow(4 << 20);
let h = createHash('sha256');
let at = 0;
let failed = null;
parentPort.on('message', (m) => {
  if (m.reset) {
    h = createHash('sha256');
    at = 0;
  } else if (typeof m.end === 'number') {
    try {
      while (!failed && at < m.end) {
        const n = readSync(workerData.fd, buf, 0, Math.min(buf.length, m.end - at), at);
        if (n === 0) throw new Error('the file ends at ' + at + ' bytes, before ' + m.end);
        h.update(buf.subarray(0, n));
        at += n;
      }
    } catch (err) {
      failed ??= String((err && err.message) || err);
    }
  } else if (m.digest) {
    parentPort.postMessage(failed ? { error: failed } : { digest: h.copy().digest('hex'), at });
  }
});
`;

class ThreadHash implements PartialHash {
  readonly readsFile = true;
  readonly #worker: Worker;
  /** The end of each digest asked for and not answered yet, in order. */
  readonly #waiting: { end: number; resolve: (d: string) => void; reject: (e: Error) => void }[] = [];
  #end = 0;
  #failed: Error | null = null;

  constructor(fd: number) {
    // execArgv: [] keeps a TypeScript loader given to this process (--import tsx) out of the thread.
    this.#worker = new Worker(THREAD_SOURCE, { eval: true, execArgv: [], workerData: { fd } });
    this.#worker.on('message', (m: { digest?: string; at?: number; error?: string }) => {
      const w = this.#waiting.shift();
      if (!w) return;
      if (m.error !== undefined) w.reject(new Error(`hashing the partial file: ${m.error}`));
      else if (m.at !== w.end) w.reject(new Error(`hashing the partial file: ${m.at} bytes hashed, ${w.end} written`));
      else w.resolve(m.digest ?? '');
    });
    this.#worker.once('error', (err) => this.#fail(err));
    this.#worker.once('exit', (code) => this.#fail(new Error(`exited (${code})`)));
  }

  #fail(err: Error): void {
    this.#failed ??= new Error(`hashing thread: ${err.message}`);
    for (const w of this.#waiting.splice(0)) w.reject(this.#failed);
  }

  add(): void {}

  written(end: number): void {
    if (end <= this.#end) return;
    this.#end = end;
    this.#worker.postMessage({ end });
  }

  reset(): void {
    this.#end = 0;
    this.#worker.postMessage({ reset: true });
  }

  digest(): Promise<string> {
    if (this.#failed) return Promise.reject(this.#failed);
    return new Promise((resolve, reject) => {
      this.#waiting.push({ end: this.#end, resolve, reject });
      this.#worker.postMessage({ digest: true });
    });
  }

  async close(): Promise<void> {
    this.#worker.removeAllListeners('exit');
    await this.#worker.terminate();
    this.#fail(new Error('closed'));
  }
}
