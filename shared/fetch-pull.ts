/**
 * One blob request to one source (the inner loop of fetchBlob, shared/fetch-blob.ts): a Range
 * GET appended to the partial file, with the idle timeout and the stall checks
 * (shared/fetch-stall.ts), and the partial file's own bookkeeping.
 */
import { createHash, type Hash } from 'node:crypto';
import type { FileHandle } from 'node:fs/promises';
import got, { type Request as GotRequest } from 'got';
import type { Digest } from './digest.js';
import { scError } from './errors.js';
import { abortError, errorFromBody, readBounded, responseOf } from './fetch-http.js';
import { UNSERVED_CODES, unserved, watchStall } from './fetch-stall.js';
import { gotTls } from './tls.js';

/** Downloaded bytes are written to disk in batches of about this many bytes. */
const WRITE_BATCH = 1 << 20;

/** A local failure (disk): never retried on another source. */
export class LocalFailure extends Error {
  constructor(readonly inner: unknown) {
    super((inner as Error)?.message ?? String(inner));
  }
}

/** The partial file of one fetchBlob and what is known about its bytes. */
export interface DownloadState {
  fh: FileHandle;
  hash: Hash;
  /** Verified-length prefix of the partial file that the hash covers. */
  have: number;
  /** Highest `have` reached in this epoch (progress measure). */
  hwm: number;
  /** Source of each contiguous piece, in file order; 'partial' for bytes from an earlier run. */
  pieces: string[];
  downloaded: number;
}

/** Re-hashes what an earlier run left in the partial file; returns how many bytes are reused. */
export async function adoptPartial(st: DownloadState, size: number): Promise<number> {
  const { size: len } = await st.fh.stat();
  if (len === 0) return 0;
  if (len > size) {
    await truncateAll(st);
    return 0;
  }
  const buf = Buffer.allocUnsafe(Math.min(WRITE_BATCH, len));
  let pos = 0;
  while (pos < len) {
    const { bytesRead } = await st.fh.read(buf, 0, Math.min(buf.length, len - pos), pos);
    if (bytesRead === 0) break;
    st.hash.update(buf.subarray(0, bytesRead));
    pos += bytesRead;
  }
  st.have = pos;
  st.hwm = pos;
  st.pieces = ['partial'];
  return pos;
}

/** Empties the partial file and resets `st` to nothing (a failure is a LocalFailure). */
export async function truncateAll(st: DownloadState): Promise<void> {
  try {
    await st.fh.truncate(0);
  } catch (err) {
    throw new LocalFailure(err);
  }
  st.hash = createHash('sha256');
  st.have = 0;
  st.hwm = 0;
  st.pieces = [];
}

/** Arguments of one pull: the source, the blob, and fetchBlob's timeouts (see FetchBlobOptions). */
export interface PullArgs {
  source: string;
  digest: Digest;
  size: number;
  idleTimeoutMs: number;
  stallCheckMs: number;
  probeTimeoutMs: number;
  signal?: AbortSignal;
  /** Reports progress; `pending` is received bytes not yet written. */
  progress: (source: string, pending?: number) => void;
}

/**
 * One request to one source, appending to the partial file from `st.have`. Returns when the
 * response ended (the caller checks whether the blob is complete); throws on any failure, after
 * keeping every byte received so far.
 */
export async function pull(st: DownloadState, a: PullArgs): Promise<void> {
  const start = st.have;
  const headers: Record<string, string> = { 'user-agent': 'stagecoach-fetch' };
  if (start > 0) headers.range = `bytes=${start}-`;
  const req = got.stream(`${a.source}/v1/blobs/${a.digest}`, { ...gotTls(),
    headers,
    retry: { limit: 0 },
    throwHttpErrors: false,
    decompress: false,
    followRedirect: false,
  });
  let timer: NodeJS.Timeout | undefined;
  const stall = watchStall(req, a);
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(() => req.destroy(scError('SC_ERR_TIMEOUT', `${a.source}: nothing received for ${a.idleTimeoutMs} ms`)), a.idleTimeoutMs);
    stall.activity();
  };
  // Failures surface through responseOf / the body iterator (stream.errored); this listener only
  // keeps an error emitted between two awaits from becoming an uncaught exception.
  req.on('error', () => {});
  const onAbort = () => req.destroy(abortError(a.signal!));
  a.signal?.addEventListener('abort', onAbort, { once: true });
  arm();
  try {
    const res = await responseOf(req);
    arm();
    const status = res.statusCode;
    const h = res.headers;
    if (status !== 200 && status !== 206) {
      const body = await readBounded(req, 64 * 1024).catch(() => Buffer.alloc(0));
      if (status === 404) throw scError('SC_ERR_BLOB_NOT_FOUND', `${a.source}: blob ${a.digest} not found`);
      if (status === 416) throw scError('SC_ERR_SIZE_MISMATCH', `${a.source}: Range ${start}- not satisfiable, its blob is smaller than ${a.size} bytes`);
      const e = errorFromBody(status, body, a.source);
      if ((status === 502 || status === 503) && UNSERVED_CODES.has(e.code)) unserved.add(e);
      throw e;
    }
    const etag = typeof h.etag === 'string' ? h.etag.replace(/^W\//, '') : undefined;
    if (etag !== undefined && etag !== `"${a.digest}"`) throw scError('SC_ERR_UPSTREAM', `${a.source}: ETag ${etag.slice(0, 80)} is not ${a.digest}`);
    const enc = h['content-encoding'];
    if (enc && enc !== 'identity') throw scError('SC_ERR_UPSTREAM', `${a.source}: unexpected Content-Encoding ${String(enc).slice(0, 40)}`);
    const len = h['content-length'] === undefined ? undefined : Number(h['content-length']);
    if (status === 206) {
      const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(String(h['content-range'] ?? ''));
      if (!m) throw scError('SC_ERR_UPSTREAM', `${a.source}: 206 without a valid Content-Range`);
      const [from, to, total] = [Number(m[1]), Number(m[2]), m[3] === '*' ? undefined : Number(m[3])];
      if (from !== start) throw scError('SC_ERR_UPSTREAM', `${a.source}: asked for bytes from ${start}, got a range from ${from}`);
      if (total !== undefined && total !== a.size) throw scError('SC_ERR_SIZE_MISMATCH', `${a.source}: blob is ${total} bytes, expected ${a.size}`);
      if (to < from || to >= a.size) throw scError('SC_ERR_UPSTREAM', `${a.source}: bad Content-Range ${from}-${to}`);
    } else {
      if (len !== undefined && len !== a.size) throw scError('SC_ERR_SIZE_MISMATCH', `${a.source}: blob is ${len} bytes, expected ${a.size}`);
      if (st.have > 0) await truncateAll(st); // a 200 to a Range request: start over with this source
    }
    await copyBody(st, req, a, arm);
    if (st.have < a.size && (status === 200 || (len !== undefined && st.have - start < len))) {
      throw scError('SC_ERR_UPSTREAM', `${a.source}: body ended early at byte ${st.have} of ${a.size}`);
    }
  } catch (err) {
    throw err instanceof LocalFailure ? err : (stall.error ?? err);
  } finally {
    clearTimeout(timer);
    stall.stop();
    a.signal?.removeEventListener('abort', onAbort);
    if (!req.destroyed) req.destroy();
  }
}

/**
 * Streams the body into the partial file in batches, hashing what was written. One batch write
 * is in flight while the next batch is received and the previous one hashed, so the network,
 * the disk and sha256 overlap; `st.have` counts only bytes whose write completed.
 */
async function copyBody(st: DownloadState, req: GotRequest, a: PullArgs, arm: () => void): Promise<void> {
  let batch: Buffer[] = [];
  let batchLen = 0;
  let writing: Promise<void> | null = null;
  let writingLen = 0;
  const settle = async () => {
    const w = writing;
    writing = null;
    if (w) await w;
  };
  const flush = async () => {
    await settle();
    if (batchLen === 0) return;
    const bufs = batch;
    const n = batchLen;
    batch = [];
    batchLen = 0;
    writingLen = n;
    const w = st.fh.writev(bufs, st.have).then(
      ({ bytesWritten }) => {
        if (bytesWritten !== n) throw new LocalFailure(new Error(`short write: ${bytesWritten} of ${n} bytes`));
        writingLen = 0;
        st.have += n;
        if (st.have > st.hwm) st.hwm = st.have;
        if (st.pieces[st.pieces.length - 1] !== a.source) st.pieces.push(a.source);
        a.progress(a.source);
      },
      (err) => {
        throw new LocalFailure(err);
      },
    );
    // Awaited by the next settle(); this only keeps a failure from being reported as unhandled meanwhile.
    w.catch(() => {});
    writing = w;
    // Hashed while the write runs. A failed write fails the whole fetch (LocalFailure), and a
    // later run re-hashes what is on disk (adoptPartial), so the hash never vouches for bytes
    // that are not in the file.
    for (const b of bufs) st.hash.update(b);
  };
  let overflow = false;
  try {
    for await (const raw of req as AsyncIterable<Buffer>) {
      arm();
      st.downloaded += raw.length;
      let chunk = raw;
      const room = a.size - st.have - writingLen - batchLen;
      if (chunk.length > room) {
        chunk = chunk.subarray(0, room);
        overflow = true;
      }
      if (chunk.length) {
        batch.push(chunk);
        batchLen += chunk.length;
      }
      if (batchLen >= WRITE_BATCH) await flush();
      else a.progress(a.source, writingLen + batchLen);
      if (overflow) break;
    }
  } catch (err) {
    await flush();
    await settle();
    throw err;
  }
  await flush();
  await settle();
  if (overflow) throw scError('SC_ERR_SIZE_MISMATCH', `${a.source}: sent more than ${a.size} bytes`);
}
