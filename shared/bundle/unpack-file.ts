/**
 * Unpacking a bundle file, using two cores: a worker thread (unpack-worker.mjs) reads,
 * age-decrypts and zstd-decompresses the blob, while this thread extracts the tar with the
 * codec's safe tar. The result is the same as `unpackBundle` from the file, with the same
 * errors. Unencrypted, non-zstd and small bundles are unpacked in this thread.
 *
 * The blob's sha256 is checked against the signed digest in the same pass (the worker hashes the
 * bytes it decrypts) unless the caller vouches for the bytes (`verified`). A tree unpacked from
 * bytes that fail the check is not a result: the call fails with SC_ERR_DIGEST_MISMATCH and the
 * caller wipes what was written (the target is never bootable before the call succeeded).
 *
 * `follow` unpacks a file while it is being written (a download or a copy that hashes what it
 * writes, shared/fetch-unpack.ts, the agent's install-base): the worker reads only below the
 * writer's mark.
 *
 * The age header is parsed and its MAC checked here (age.ts); the worker gets only the payload
 * key. The worker is plain JavaScript and starts without the TypeScript loader.
 */
import { closeSync, createReadStream, existsSync, fstatSync, openSync, read } from 'node:fs';
import { PassThrough, pipeline, Readable, type Transform, Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { type Digest, digestFile } from '../digest.js';
import { type ErrorCode, ERRORS, isScError, type ScError, scError } from '../errors.js';
import type { Manifest } from '../manifest.js';
import { AGE_MAX_HEAD, openAgePayload } from './age.js';
import { DEFAULT_MAX_UNPACKED_BYTES, unpackBundle } from './index.js';
import { type ExtractResult, safeExtract } from './tar.js';

/**
 * Smaller blobs are unpacked in this thread: an in-process fleet of many small sim hosts should
 * not start a thread per install, and below this the worker's start (~70 ms) is not won back.
 */
const WORKER_MIN_BYTES = 64 << 20;

const WORKER_FILE = fileURLToPath(new URL('./unpack-worker.mjs', import.meta.url));
/** A build that did not ship the worker file unpacks in this thread (slower, same result). */
const HAVE_WORKER = existsSync(WORKER_FILE);

/** Zero bytes fed to the meter in the worker path: it counts, it does not look. */
const ZERO = Buffer.alloc(1 << 20);

/**
 * How many of a file's first bytes its writer has put on disk. Only rises; `watch` listeners
 * hear every rise.
 */
export class WriteMark {
  #bytes = 0;
  #listeners = new Set<(n: number) => void>();

  get bytes(): number {
    return this.#bytes;
  }

  /** Raises the mark to `n` (a lower `n` is ignored). */
  raise(n: number): void {
    if (n <= this.#bytes) return;
    this.#bytes = n;
    for (const fn of this.#listeners) fn(n);
  }

  /** Calls `fn` on every rise; returns the function that stops it. */
  watch(fn: (n: number) => void): () => void {
    this.#listeners.add(fn);
    return () => this.#listeners.delete(fn);
  }

  /** Resolves once at least `n` bytes are written; rejects with SC_ERR_UNAVAILABLE when `signal` aborts. */
  reached(n: number, signal?: AbortSignal): Promise<void> {
    if (this.#bytes >= n) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const done = (err?: ScError) => {
        stop();
        signal?.removeEventListener('abort', onAbort);
        if (err) reject(err);
        else resolve();
      };
      const onAbort = () => done(scError('SC_ERR_UNAVAILABLE', 'unpack aborted'));
      const stop = this.watch((b) => {
        if (b >= n) done();
      });
      if (signal?.aborted) onAbort();
      else signal?.addEventListener('abort', onAbort, { once: true });
    });
  }
}

/** True when `blob` is unpacked by the worker (age + zstd, at least `workerMinBytes`): the only path that can `follow`. */
export function unpacksInWorker(blob: Manifest['blob'], workerMinBytes = WORKER_MIN_BYTES): boolean {
  return HAVE_WORKER && blob.encryption === 'age' && blob.compression === 'zstd' && blob.size >= workerMinBytes;
}

/** Options of unpackFile. */
export interface UnpackFileOptions {
  dir: string;
  identities: string[];
  signal?: AbortSignal;
  /**
   * Makes a pass-through Transform that counts the decrypted (still compressed) bytes, for
   * progress: in the single-thread path it sits before decompression; in the worker path it is
   * fed zero-filled buffers of the lengths the worker decrypted, in step with the data
   * extracted, and its output is discarded (so it must count, not inspect). An error thrown by
   * the meter fails the unpack.
   */
  meter?: () => Transform;
  /** Blob size from which the worker decrypts and decompresses (default 64 MiB; age + zstd only). */
  workerMinBytes?: number;
  /** Bound of the plaintext tar for manifests without `unpackedSize` (default DEFAULT_MAX_UNPACKED_BYTES). */
  maxUnpackedBytes?: number;
  /** The caller checks the bytes against `blob.digest` (a writer that hashes what it writes): no check here. */
  verified?: boolean;
  /** The file is being written up to this mark (worker path only, see unpacksInWorker). */
  follow?: WriteMark;
}

function mismatch(blob: Manifest['blob'], actual: string): ScError {
  return scError('SC_ERR_DIGEST_MISMATCH', `the bundle file does not match its signed digest ${blob.digest}`, { expected: blob.digest, actual });
}

/** Reads the age header of the open file `fd`; returns the payload key and offset. Throws SC_ERR_DECRYPT / SC_ERR_BAD_KEY. */
async function readPayload(fd: number, size: number, identities: string[], follow?: WriteMark, signal?: AbortSignal): Promise<{ payloadKey: Buffer; payloadOffset: number }> {
  await follow?.reached(Math.min(AGE_MAX_HEAD, size), signal);
  const head = Buffer.alloc(AGE_MAX_HEAD);
  const bytesRead = await new Promise<number>((res, rej) => read(fd, head, 0, head.length, 0, (err, n) => (err ? rej(err) : res(n))));
  const p = openAgePayload(head.subarray(0, bytesRead), identities);
  if (!p) throw scError('SC_ERR_DECRYPT', 'age file truncated in its header');
  return p;
}

/**
 * Unpacks the bundle file `file` (a path, or a descriptor open for reading that stays the
 * caller's: worker path only) described by `blob` into `dir` and checks its digest (see the
 * module doc and UnpackFileOptions). The plaintext tar may not exceed `blob.unpackedSize`
 * (signed in the manifest), or `maxUnpackedBytes` for manifests without it: past it,
 * SC_ERR_BUNDLE_TOO_LARGE. Rejects like unpackBundle (SC_ERR_DECRYPT, SC_ERR_BAD_ARCHIVE,
 * SC_ERR_UNSAFE_ARCHIVE, SC_ERR_NO_SPACE, …), but with SC_ERR_DIGEST_MISMATCH whenever the file
 * fails its digest (checked here); `signal` aborts (SC_ERR_UNAVAILABLE). On any failure `dir`
 * may hold part of a tree: the caller removes it.
 */
export async function unpackFile(file: string | number, blob: Manifest['blob'], opts: UnpackFileOptions): Promise<ExtractResult> {
  const maxBytes = blob.unpackedSize ?? opts.maxUnpackedBytes ?? DEFAULT_MAX_UNPACKED_BYTES;
  const meter = opts.meter?.() ?? new PassThrough();
  if (!unpacksInWorker(blob, opts.workerMinBytes)) {
    if (opts.follow || typeof file === 'number') throw scError('SC_ERR_INTERNAL', 'only the worker path unpacks a file while it is written, or from a descriptor');
    // Small or single-thread bundles: hashed first, then unpacked (a second pass over a small file).
    if (!opts.verified) {
      const d = await digestFile(file);
      if (d.digest !== blob.digest || d.size !== blob.size) throw mismatch(blob, d.digest);
    }
    const src = createReadStream(file, { highWaterMark: 1 << 20, signal: opts.signal });
    return unpackBundle(pipeline(src, meter, () => {}), {
      dir: opts.dir,
      compression: blob.compression,
      encryption: blob.encryption,
      identities: opts.identities,
      maxUnpackedBytes: maxBytes,
    });
  }
  try {
    const r = await unpackInWorker(file, blob, meter, maxBytes, opts);
    if (!opts.verified && (r.digest !== blob.digest || r.size !== blob.size)) throw mismatch(blob, r.digest ?? 'none');
    return r.result;
  } catch (err) {
    // Bytes that fail their digest also fail to decrypt or parse: say which, from the file itself.
    if (!opts.verified && !opts.follow && typeof file === 'string' && isScError(err) && err.code !== 'SC_ERR_DIGEST_MISMATCH' && err.code !== 'SC_ERR_UNAVAILABLE') {
      const d = await digestFile(file).catch(() => null);
      if (d && d.digest !== blob.digest) throw mismatch(blob, d.digest);
    }
    throw err;
  }
}

async function unpackInWorker(
  file: string | number,
  blob: Manifest['blob'],
  meter: Transform,
  maxBytes: number,
  opts: UnpackFileOptions,
): Promise<{ result: ExtractResult; digest?: Digest; size: number }> {
  if (opts.signal?.aborted) throw scError('SC_ERR_UNAVAILABLE', 'unpack aborted');
  if (typeof file === 'number') return extractInWorker(file, blob, meter, maxBytes, opts);
  // Opened before the first await: a file being written may be renamed by its writer meanwhile.
  let fd: number;
  try {
    fd = openSync(file, 'r');
  } catch (err) {
    throw scError('SC_ERR_INTERNAL', `cannot open ${file}: ${(err as Error).message}`);
  }
  try {
    return await extractInWorker(fd, blob, meter, maxBytes, opts);
  } finally {
    closeSync(fd);
  }
}

async function extractInWorker(
  fd: number,
  blob: Manifest['blob'],
  meter: Transform,
  maxBytes: number,
  opts: UnpackFileOptions,
): Promise<{ result: ExtractResult; digest?: Digest; size: number }> {
  const { payloadKey, payloadOffset } = await readPayload(fd, blob.size, opts.identities, opts.follow, opts.signal);
  // An abort while the header was read: the listener below would never fire, and a following worker would wait forever.
  if (opts.signal?.aborted) throw scError('SC_ERR_UNAVAILABLE', 'unpack aborted');
  const follow = opts.follow;
  // execArgv: [] keeps a TypeScript loader given to this process (--import tsx) out of the worker.
  const worker = new Worker(WORKER_FILE, {
    execArgv: [],
    workerData: { fd, size: blob.size, payloadKey, payloadOffset, hash: !opts.verified, follow: follow !== undefined, avail: follow?.bytes ?? 0 },
  });
  const unwatch = follow?.watch((n) => worker.postMessage({ avail: n }));
  let ended = false;
  let digest: Digest | undefined;
  // Chunks received and not yet acknowledged: acknowledged when the extractor asks for more.
  let unacked = 0;
  // Posted buffers the extractor has not released yet, with where each ends in the tar stream.
  // A released one goes back to the worker (transferred), which fills it again: this thread then
  // holds a few MiB of the worker's buffers at a time, instead of a new MiB per post left to the
  // garbage collector (a full collection per 64 MiB of them). A buffer given back too early would
  // show: transferring detaches it, and a detached chunk reads as empty (a short file fails).
  const held: { ab: ArrayBuffer; end: number }[] = [];
  let received = 0;
  const released = (offset: number) => {
    while (held.length > 0 && held[0].end <= offset) {
      const { ab } = held.shift()!;
      worker.postMessage({ back: ab }, [ab]);
    }
  };
  // Object mode: each posted buffer is handed on as it is. In byte mode the extractor's reads
  // would concatenate the buffered chunks into fresh buffers (a copy of every byte, and GC).
  const plain = new Readable({
    objectMode: true,
    highWaterMark: 4,
    read() {
      if (unacked > 0) {
        worker.postMessage({ ack: unacked });
        unacked = 0;
      }
    },
  });
  // The meter's output is drained; its errors (e.g. a crash point) fail the unpack.
  meter.pipe(new Writable({ write: (_c, _e, cb) => cb() }));
  meter.on('error', (err) => plain.destroy(isScError(err) ? err : scError('SC_ERR_INTERNAL', `unpack meter: ${err.message}`)));
  const count = (n: number) => {
    for (let left = n; left > 0; left -= ZERO.length) meter.write(ZERO.subarray(0, Math.min(left, ZERO.length)));
  };
  worker.on('message', (m: { chunk?: ArrayBuffer; decrypted?: number; end?: boolean; digest?: Digest; error?: { code: string; message: string } }) => {
    if (plain.destroyed) return;
    if (m.chunk) {
      unacked++;
      count(m.decrypted ?? 0);
      received += m.chunk.byteLength;
      held.push({ ab: m.chunk, end: received });
      plain.push(Buffer.from(m.chunk));
    } else if (m.end) {
      ended = true;
      digest = m.digest;
      count(m.decrypted ?? 0);
      meter.end();
      plain.push(null);
    } else if (m.error) {
      const code = (m.error.code in ERRORS ? m.error.code : 'SC_ERR_INTERNAL') as ErrorCode;
      plain.destroy(scError(code, m.error.message));
    }
  });
  worker.once('error', (err) => plain.destroy(scError('SC_ERR_INTERNAL', `unpack worker: ${err.message}`)));
  worker.once('exit', (code) => {
    if (!ended) plain.destroy(scError('SC_ERR_INTERNAL', `unpack worker exited (${code}) before the end`));
  });
  const onAbort = () => plain.destroy(scError('SC_ERR_UNAVAILABLE', 'unpack aborted'));
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  if (opts.signal?.aborted) onAbort();
  try {
    const result = await safeExtract(plain, opts.dir, { maxBytes, released });
    // The digest covers the first `size` bytes: a finished file must also be exactly that long.
    return { result, digest, size: opts.follow ? blob.size : fstatSync(fd).size };
  } finally {
    unwatch?.();
    opts.signal?.removeEventListener('abort', onAbort);
    plain.destroy();
    if (!meter.writableEnded) meter.end();
    await worker.terminate().catch(() => 0);
  }
}
