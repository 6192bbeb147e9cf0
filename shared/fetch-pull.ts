/**
 * One blob request of the host to one source (the inner loop of fetchBlob, shared/fetch-blob.ts):
 * the ranged request of shared/fetch-range.ts (its rules are the stage's too) appended to the
 * partial file in batched writes that overlap the network, the disk and sha256, with the stall
 * checks (shared/fetch-stall.ts), and the partial file's own bookkeeping.
 */
import type { FileHandle } from 'node:fs/promises';
import type { Digest } from './digest.js';
import { isScError } from './errors.js';
import type { PartialHash } from './fetch-hash.js';
import { fetchRange, type RangeSink, SinkFailure } from './fetch-range.js';
import { UNSERVED_CODES, unserved, watchStall } from './fetch-stall.js';

/** Downloaded bytes are written to disk in batches of about this many bytes. */
const WRITE_BATCH = 1 << 20;
/**
 * Every this many bytes written, the partial file's data is flushed to disk in the background
 * (fdatasync, not awaited by the download): the disk writes while the network and the CPU work,
 * instead of all at once in the fsync before the rename.
 */
const FLUSH_EVERY = 64 << 20;

/** A local failure (disk): never retried on another source. The sink failure of fetchRange. */
export const LocalFailure = SinkFailure;
/** A local failure (disk). */
export type LocalFailure = SinkFailure;

/** The partial file of one fetchBlob and what is known about its bytes. */
export interface DownloadState {
  fh: FileHandle;
  /** The sha256 of the partial file's first `have` bytes (fetch-hash.ts). */
  hash: PartialHash;
  /** Verified-length prefix of the partial file that the hash covers. */
  have: number;
  /** Highest `have` reached in this epoch (progress measure). */
  hwm: number;
  /** Source of each contiguous piece, in file order; 'partial' for bytes from an earlier run. */
  pieces: string[];
  downloaded: number;
  /** Times the partial file was emptied (its bytes before that are gone). */
  restarts: number;
  /** Bytes written when the last background flush started, and that flush while it runs. */
  flushedAt?: number;
  flushing?: Promise<void> | null;
  /**
   * The first failure of a background flush. Linux reports a write-back error once per open
   * file, so the final fsync may not see it again: fetchBlob throws it before the rename.
   */
  flushError?: unknown;
}

/** Starts a background flush of the partial file when FLUSH_EVERY bytes were written since the last one. */
function flushBehind(st: DownloadState): void {
  if (st.flushing || st.have - (st.flushedAt ?? 0) < FLUSH_EVERY) return;
  st.flushedAt = st.have;
  st.flushing = st.fh.datasync().then(
    () => {
      st.flushing = null;
    },
    (err: unknown) => {
      st.flushError ??= err;
      st.flushing = null;
    },
  );
}

/** Re-hashes what an earlier run left in the partial file; returns how many bytes are reused. */
export async function adoptPartial(st: DownloadState, size: number): Promise<number> {
  const { size: len } = await st.fh.stat();
  if (len === 0) return 0;
  if (len > size) {
    await truncateAll(st);
    return 0;
  }
  let pos = len;
  if (!st.hash.readsFile) {
    const buf = Buffer.allocUnsafe(Math.min(WRITE_BATCH, len));
    pos = 0;
    while (pos < len) {
      const { bytesRead } = await st.fh.read(buf, 0, Math.min(buf.length, len - pos), pos);
      if (bytesRead === 0) break;
      st.hash.add([buf.subarray(0, bytesRead)]);
      pos += bytesRead;
    }
  }
  st.hash.written(pos);
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
  st.hash.reset();
  st.restarts++;
  st.flushedAt = 0;
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
 * One request to one source, appending to the partial file from `st.have` (fetchRange's rules).
 * Resolves once the partial holds the whole blob (the caller checks its digest); throws on any
 * failure, after keeping every byte received so far: an ScError (in `unserved` when the source
 * cannot serve now: a 502/503 with one of UNSERVED_CODES, or a failed stall check), or a
 * LocalFailure for the disk.
 */
export async function pull(st: DownloadState, a: PullArgs): Promise<void> {
  let stall = null as ReturnType<typeof watchStall> | null;
  let status = 0;
  try {
    await fetchRange(fileSink(st, a), {
      source: a.source,
      digest: a.digest,
      size: a.size,
      idleTimeoutMs: a.idleTimeoutMs,
      userAgent: 'stagecoach-fetch',
      signal: a.signal,
      hooks: {
        started: (req) => {
          stall = watchStall(req, a);
        },
        answered: (s) => {
          status = s;
          stall?.activity();
        },
        chunk: (n) => {
          st.downloaded += n;
          stall?.activity();
        },
      },
    });
  } catch (err) {
    if (err instanceof SinkFailure) throw err;
    // The stall check's own error (in `unserved`), not the copy fetchRange made of it.
    const e = stall?.error ?? err;
    if ((status === 502 || status === 503) && isScError(e) && UNSERVED_CODES.has(e.code)) unserved.add(e);
    throw e;
  } finally {
    stall?.stop();
  }
}

/**
 * Writes `bufs` at `pos`, going on after a short write: the next write then fails with the
 * reason (ENOSPC for a full disk, EFBIG), which the caller reports.
 */
async function writeAll(fh: FileHandle, bufs: Buffer[], pos: number): Promise<void> {
  let rest = bufs;
  for (;;) {
    const { bytesWritten } = await fh.writev(rest, pos);
    pos += bytesWritten;
    let skip = bytesWritten;
    while (rest.length > 0 && skip >= rest[0].length) {
      skip -= rest[0].length;
      rest = rest.slice(1);
    }
    if (rest.length === 0) return;
    if (bytesWritten === 0) throw new Error(`nothing written at byte ${pos}`);
    rest = [rest[0].subarray(skip), ...rest.slice(1)];
  }
}

/**
 * The partial file as fetchRange's sink: chunks are gathered into batches of WRITE_BATCH bytes,
 * and one batch write is in flight while the next batch is received and the previous one hashed,
 * so the network, the disk and sha256 overlap; `st.have` counts only bytes whose write completed.
 */
function fileSink(st: DownloadState, a: PullArgs): RangeSink {
  let batch: Buffer[] = [];
  let batchLen = 0;
  let writing: Promise<void> | null = null;
  let writingLen = 0;
  // The first failed write. Every later flush throws it instead of writing: `st.have` did not
  // move past the failed batch, so the next batch would land at that batch's offset.
  let failed: LocalFailure | null = null;
  const settle = async () => {
    const w = writing;
    writing = null;
    if (w) {
      await w.catch((err: unknown) => {
        failed ??= LocalFailure.of(err);
      });
    }
    if (failed) throw failed;
  };
  const flush = async () => {
    await settle();
    if (batchLen === 0) return;
    const bufs = batch;
    const n = batchLen;
    batch = [];
    batchLen = 0;
    writingLen = n;
    const w = writeAll(st.fh, bufs, st.have).then(
      () => {
        writingLen = 0;
        st.have += n;
        st.hash.written(st.have);
        if (st.have > st.hwm) st.hwm = st.have;
        if (st.pieces[st.pieces.length - 1] !== a.source) st.pieces.push(a.source);
        flushBehind(st);
        a.progress(a.source);
      },
      (err) => {
        throw new LocalFailure(err);
      },
    );
    // Awaited by the next settle(); this only keeps a failure from being reported as unhandled meanwhile.
    w.catch(() => {});
    writing = w;
    // Hashed while the write runs (inline), or read back once it completed (on a thread). A
    // failed write fails the whole fetch (LocalFailure), and a later run re-hashes what is on
    // disk (adoptPartial), so the hash never vouches for bytes that are not in the file.
    st.hash.add(bufs);
  };
  return {
    offset: () => st.have,
    write(chunk) {
      batch.push(chunk);
      batchLen += chunk.length;
      if (batchLen >= WRITE_BATCH) return flush();
      a.progress(a.source, writingLen + batchLen);
    },
    async flush() {
      await flush();
      await settle();
    },
  };
}
