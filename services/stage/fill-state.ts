/**
 * One blob's fill as the fetch-once table and its readers see it (the Fill object): its named
 * outcome, the bytes written so far, the in-memory tail, the progress signals and the file
 * handle shared by every reader. FetchOnce (fill.ts) drives it; streamFill (fill-stream.ts)
 * reads it.
 */
import type { FileHandle } from 'node:fs/promises';
import type { Digest } from '../../shared/digest.js';
import { type ScError, scError } from '../../shared/errors.js';
import type { CacheEntry } from './cache.js';

/** The named outcomes of a fill. */
export type FillState = 'filling' | 'committed' | 'failed' | 'gone';

/** What GET /v1/fills shows for one fill. Times are ISO 8601. */
export interface FillInfo {
  digest: Digest;
  state: FillState;
  bytes: number;
  size: number | null;
  source: string | null;
  sources: string[];
  resumes: number;
  passThrough: boolean;
  startedAt: string;
  finishedAt: string | null;
  error?: { code: string; message: string };
}

/**
 * The most recent bytes of a fill stay referenced in memory (the upstream's own chunks, no
 * copy), so readers following the edge of a fill share them instead of each reading the file.
 * Bounded per fill, independent of object size and client count.
 */
const RING_BYTES = 2 * 1024 * 1024;
/** Progress is signalled at once after this many new bytes, else within NOTIFY_MS. */
const NOTIFY_BYTES = 1024 * 1024;
const NOTIFY_MS = 10;

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

/** One running (or finished) fetch of one blob. Created only by `FetchOnce`. */
export class Fill {
  readonly digest: Digest;
  state: FillState = 'filling';
  /** Blob size in bytes, once an upstream told it. */
  size: number | null = null;
  /** Bytes written to the file, from offset 0. Always a prefix of what the upstream sent. */
  filled = 0;
  sources: string[] = [];
  resumes = 0;
  passThrough = false;
  error?: ScError;
  readonly startedAt: number;
  finishedAt: number | null = null;

  #fh: FileHandle | null = null;
  #fhReady = deferred();
  #path: string;
  #holders = 1; // the fill itself
  #change = deferred();
  #sized = deferred();
  #done = deferred();
  #notified = 0;
  #notifyTimer: NodeJS.Timeout | null = null;
  /** The budget entry while the blob is (to be) cached. */
  entry: CacheEntry | null = null;

  constructor(digest: Digest, path: string, now: number) {
    this.digest = digest;
    this.#path = path;
    this.startedAt = now;
  }

  /** True once the sha256 matched (readers may send their held-back final byte). */
  verified = false;
  #ring: { pos: number; buf: Buffer }[] = [];
  #ringBytes = 0;

  /** @internal Records a chunk just written at `pos` in the in-memory tail. */
  remember(pos: number, buf: Buffer): void {
    this.#ring.push({ pos, buf });
    this.#ringBytes += buf.length;
    while (this.#ring.length > 1 && this.#ringBytes - this.#ring[0].buf.length >= RING_BYTES) {
      this.#ringBytes -= this.#ring.shift()!.buf.length;
    }
  }

  /** @internal Drops the in-memory tail. */
  forget(): void {
    this.#ring = [];
    this.#ringBytes = 0;
  }

  /** Up to `n` bytes at `pos` from the in-memory tail (no copy), or null when not there. */
  fromTail(pos: number, n: number): Buffer | null {
    const r = this.#ring;
    if (r.length === 0 || pos < r[0].pos) return null;
    for (let i = r.length - 1; i >= 0; i--) {
      const c = r[i];
      if (pos >= c.pos) {
        const off = pos - c.pos;
        if (off >= c.buf.length) return null;
        return c.buf.subarray(off, off + Math.min(n, c.buf.length - off));
      }
    }
    return null;
  }

  /** Resolves when the size is known or the fill ended (check `state`). Never rejects. */
  ready(): Promise<void> {
    return this.#sized.promise;
  }

  /** Resolves when the fill reaches an outcome. Never rejects. */
  done(): Promise<void> {
    return this.#done.promise;
  }

  /** Resolves at the next progress or state change. */
  changed(): Promise<void> {
    return this.#change.promise;
  }

  /** Takes a hold on the fill's file handle (for reading); pair with `release`. */
  acquire(): void {
    this.#holders++;
  }

  /** Drops a hold; the file handle closes (and a pass-through file is deleted) at the last one. */
  release(): void {
    if (--this.#holders === 0) void this.#closeFile();
  }

  /** Reads up to `n` bytes at `pos` into `buf`; only valid for bytes below `filled`. */
  async read(buf: Buffer, n: number, pos: number): Promise<number> {
    const fh = this.#fh ?? (await this.#waitFile());
    const { bytesRead } = await fh.read(buf, 0, n, pos);
    return bytesRead;
  }

  /** A snapshot for GET /v1/fills. */
  info(): FillInfo {
    return {
      digest: this.digest,
      state: this.state,
      bytes: this.filled,
      size: this.size,
      source: this.sources.at(-1) ?? null,
      sources: [...this.sources],
      resumes: this.resumes,
      passThrough: this.passThrough,
      startedAt: new Date(this.startedAt).toISOString(),
      finishedAt: this.finishedAt === null ? null : new Date(this.finishedAt).toISOString(),
      ...(this.error ? { error: { code: this.error.code, message: this.error.message } } : {}),
    };
  }

  // ---- used by FetchOnce ----

  /** @internal */ get path(): string {
    return this.#path;
  }
  /** @internal */ set path(p: string) {
    this.#path = p;
  }
  /** @internal */ setFile(fh: FileHandle): void {
    this.#fh = fh;
    this.#fhReady.resolve();
  }
  /** @internal */ get file(): FileHandle | null {
    return this.#fh;
  }
  /** @internal */ sized(): void {
    this.#sized.resolve();
  }

  /** @internal Signals progress; immediate for big steps, else coalesced within NOTIFY_MS. */
  progress(force = false): void {
    if (force || this.filled - this.#notified >= NOTIFY_BYTES) {
      this.#fire();
      return;
    }
    if (!this.#notifyTimer) {
      this.#notifyTimer = setTimeout(() => this.#fire(), NOTIFY_MS);
    }
  }

  /** @internal Ends the fill with an outcome. */
  finish(state: Exclude<FillState, 'filling'>, now: number, error?: ScError): void {
    this.state = state;
    this.forget();
    this.error = error;
    this.finishedAt = now;
    this.#sized.resolve();
    this.#fire();
    this.#done.resolve();
    this.#fhReady.resolve();
  }

  #fire(): void {
    if (this.#notifyTimer) {
      clearTimeout(this.#notifyTimer);
      this.#notifyTimer = null;
    }
    this.#notified = this.filled;
    const d = this.#change;
    this.#change = deferred();
    d.resolve();
  }

  async #waitFile(): Promise<FileHandle> {
    await this.#fhReady.promise;
    if (!this.#fh) throw scError('SC_ERR_INTERNAL', 'fill has no file');
    return this.#fh;
  }

  /** @internal Hook run when the last holder is gone (set by FetchOnce). */
  onClosed: () => Promise<void> = async () => {};

  async #closeFile(): Promise<void> {
    const fh = this.#fh;
    this.#fh = null;
    await fh?.close().catch(() => {});
    await this.onClosed();
  }
}
