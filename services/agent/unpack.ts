/**
 * Unpacking a bundle file on the host, using two cores: a worker thread reads and age-decrypts
 * the blob (the costliest stage), while this thread decompresses and extracts with the shared
 * codec's safe tar (shared/bundle). The result is the same as `unpackBundle` from the file,
 * with the same errors; only the decryption moves to another thread. Unencrypted and small
 * bundles are unpacked in this thread.
 *
 * The caller has checked the blob against its signed digest before calling (never unpack
 * what did not verify).
 */
import { createReadStream } from 'node:fs';
import { PassThrough, pipeline, Readable, type Transform } from 'node:stream';
import { Worker } from 'node:worker_threads';
import { decompressStream, type ExtractResult, safeExtract, unpackBundle } from '../../shared/bundle/index.js';
import { type ErrorCode, ERRORS, scError } from '../../shared/errors.js';
import type { Manifest } from '../../shared/manifest.js';

/**
 * Smaller blobs are unpacked in this thread: starting a worker (about 0.6 s when it must load
 * tsx) costs more than it saves, and an in-process fleet of many small sim hosts should not
 * start a thread per install. Measured on 2 cores, a 768 MiB bundle unpacks about 20 % faster
 * with the worker.
 */
const WORKER_MIN_BYTES = 256 << 20;

/** Bytes of decrypted data allowed in flight between the threads. */
const CREDIT = 8 << 20;

/** Starts the worker; under tsx (TypeScript sources) the worker registers tsx itself. */
function startWorker(file: string, identities: string[]): Worker {
  const url = new URL(import.meta.url.endsWith('.ts') ? './unpack-worker.ts' : './unpack-worker.js', import.meta.url);
  if (!import.meta.url.endsWith('.ts')) return new Worker(url, { workerData: { file, identities } });
  const api = import.meta.resolve('tsx/esm/api');
  const code = `import(${JSON.stringify(api)}).then((m) => { m.register(); return import(${JSON.stringify(url.href)}); })`;
  return new Worker(code, { eval: true, workerData: { file, identities } });
}

/**
 * Unpacks the bundle file `file` described by `blob` into `dir`. `meter` makes a pass-through
 * Transform placed before decompression (progress: it sees the decrypted bytes);
 * `workerMinBytes` is the blob size from which a worker decrypts (default 256 MiB). Rejects like
 * unpackBundle (SC_ERR_DECRYPT, SC_ERR_BAD_ARCHIVE, SC_ERR_UNSAFE_ARCHIVE, …); `signal` aborts.
 */
export async function unpackFile(
  file: string,
  blob: Manifest['blob'],
  opts: { dir: string; identities: string[]; signal?: AbortSignal; meter?: () => Transform; workerMinBytes?: number },
): Promise<ExtractResult> {
  const meter = opts.meter?.() ?? new PassThrough();
  if (blob.encryption !== 'age' || blob.size < (opts.workerMinBytes ?? WORKER_MIN_BYTES)) {
    const src = createReadStream(file, { highWaterMark: 1 << 20, signal: opts.signal });
    return unpackBundle(pipeline(src, meter, () => {}), { dir: opts.dir, compression: blob.compression, encryption: blob.encryption, identities: opts.identities });
  }
  const worker = startWorker(file, opts.identities);
  let ended = false;
  // Credit granted to the worker and not yet received back as data: at most CREDIT bytes.
  let inflight = 0;
  const plain = new Readable({
    highWaterMark: CREDIT,
    read() {
      if (inflight < CREDIT / 2) {
        worker.postMessage({ credit: CREDIT - inflight });
        inflight = CREDIT;
      }
    },
    destroy(err, cb) {
      if (!ended) void worker.terminate();
      cb(err);
    },
  });
  worker.on('message', (m: { chunk?: ArrayBuffer; end?: boolean; error?: { code: string; message: string } }) => {
    if (m.chunk) {
      inflight -= m.chunk.byteLength;
      plain.push(Buffer.from(m.chunk));
    }
    else if (m.end) {
      ended = true;
      plain.push(null);
      void worker.terminate();
    } else if (m.error) {
      const code = (m.error.code in ERRORS ? m.error.code : 'SC_ERR_INTERNAL') as ErrorCode;
      plain.destroy(scError(code, m.error.message));
    }
  });
  worker.once('error', (err) => plain.destroy(scError('SC_ERR_INTERNAL', `unpack worker: ${err.message}`)));
  const onAbort = () => plain.destroy(scError('SC_ERR_UNAVAILABLE', 'unpack aborted'));
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    return await safeExtract(pipeline(plain, meter, decompressStream(blob.compression), () => {}), opts.dir);
  } finally {
    opts.signal?.removeEventListener('abort', onAbort);
    plain.destroy();
    await worker.terminate().catch(() => 0);
  }
}
