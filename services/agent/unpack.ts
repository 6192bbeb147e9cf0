/**
 * Unpacking a bundle file on the host, using two cores: a worker thread (unpack-worker.mjs)
 * reads, age-decrypts and zstd-decompresses the blob, while this thread extracts the tar with
 * the shared codec's safe tar (shared/bundle). The result is the same as `unpackBundle` from the
 * file, with the same errors. Unencrypted, non-zstd and small bundles are unpacked in this
 * thread.
 *
 * The age header is parsed and its MAC checked here (shared/bundle/age.ts); the worker gets only
 * the payload key. The worker is plain JavaScript and starts without the TypeScript loader.
 *
 * The caller has checked the blob against its signed digest before calling (never unpack
 * what did not verify); nothing here hashes the file again.
 */
import { createReadStream, existsSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { PassThrough, pipeline, Readable, type Transform, Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { AGE_MAX_HEAD, DEFAULT_MAX_UNPACKED_BYTES, type ExtractResult, openAgePayload, safeExtract, unpackBundle } from '../../shared/bundle/index.js';
import { type ErrorCode, ERRORS, isScError, scError } from '../../shared/errors.js';
import type { Manifest } from '../../shared/manifest.js';

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

/** Reads the age header of `file`; returns the payload key and offset. Throws SC_ERR_DECRYPT / SC_ERR_BAD_KEY. */
async function readPayload(file: string, identities: string[]): Promise<{ payloadKey: Buffer; payloadOffset: number }> {
  const fh = await open(file, 'r');
  try {
    const head = Buffer.alloc(AGE_MAX_HEAD);
    const { bytesRead } = await fh.read(head, 0, head.length, 0);
    const p = openAgePayload(head.subarray(0, bytesRead), identities);
    if (!p) throw scError('SC_ERR_DECRYPT', 'age file truncated in its header');
    return p;
  } finally {
    await fh.close();
  }
}

/**
 * Unpacks the bundle file `file` described by `blob` into `dir`. `meter` makes a pass-through
 * Transform that counts the decrypted (still compressed) bytes, for progress: in the
 * single-thread path it sits before decompression; in the worker path it is fed zero-filled
 * buffers of the lengths the worker decrypted, in step with the data extracted, and its output
 * is discarded (so it must count, not inspect). An error thrown by the meter fails the unpack.
 * `workerMinBytes` is the blob size from which a worker decrypts and decompresses (default
 * 64 MiB; age + zstd bundles only). The plaintext tar may not exceed `blob.unpackedSize` (signed
 * in the manifest), or `maxUnpackedBytes` (default DEFAULT_MAX_UNPACKED_BYTES) for manifests
 * without it: past it, SC_ERR_BUNDLE_TOO_LARGE. Rejects like unpackBundle (SC_ERR_DECRYPT,
 * SC_ERR_BAD_ARCHIVE, SC_ERR_UNSAFE_ARCHIVE, SC_ERR_NO_SPACE, …); `signal` aborts
 * (SC_ERR_UNAVAILABLE).
 */
export async function unpackFile(
  file: string,
  blob: Manifest['blob'],
  opts: { dir: string; identities: string[]; signal?: AbortSignal; meter?: () => Transform; workerMinBytes?: number; maxUnpackedBytes?: number },
): Promise<ExtractResult> {
  const maxBytes = blob.unpackedSize ?? opts.maxUnpackedBytes ?? DEFAULT_MAX_UNPACKED_BYTES;
  const meter = opts.meter?.() ?? new PassThrough();
  if (!HAVE_WORKER || blob.encryption !== 'age' || blob.compression !== 'zstd' || blob.size < (opts.workerMinBytes ?? WORKER_MIN_BYTES)) {
    const src = createReadStream(file, { highWaterMark: 1 << 20, signal: opts.signal });
    return unpackBundle(pipeline(src, meter, () => {}), {
      dir: opts.dir,
      compression: blob.compression,
      encryption: blob.encryption,
      identities: opts.identities,
      maxUnpackedBytes: maxBytes,
    });
  }
  if (opts.signal?.aborted) throw scError('SC_ERR_UNAVAILABLE', 'unpack aborted');
  const { payloadKey, payloadOffset } = await readPayload(file, opts.identities);
  // execArgv: [] keeps a TypeScript loader given to this process (--import tsx) out of the worker.
  const worker = new Worker(WORKER_FILE, { execArgv: [], workerData: { file, size: blob.size, payloadKey, payloadOffset } });
  let ended = false;
  // Chunks received and not yet acknowledged: acknowledged when the extractor asks for more.
  let unacked = 0;
  const plain = new Readable({
    highWaterMark: 4 << 20,
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
  worker.on('message', (m: { chunk?: ArrayBuffer; decrypted?: number; end?: boolean; error?: { code: string; message: string } }) => {
    if (plain.destroyed) return;
    if (m.chunk) {
      unacked++;
      count(m.decrypted ?? 0);
      plain.push(Buffer.from(m.chunk));
    } else if (m.end) {
      ended = true;
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
  try {
    return await safeExtract(plain, opts.dir, { maxBytes });
  } finally {
    opts.signal?.removeEventListener('abort', onAbort);
    plain.destroy();
    if (!meter.writableEnded) meter.end();
    await worker.terminate().catch(() => 0);
  }
}
