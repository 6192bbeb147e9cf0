/**
 * Blobs over the read API: `fetchBlob`, a resumable, multi-source, digest-verified download into
 * a file (the passes over the candidates, origin as the last resort, the digest check). One
 * request is shared/fetch-pull.ts, over shared/fetch-range.ts. Used through shared/fetch.ts.
 */
import { constants as fsc } from 'node:fs';
import { type FileHandle, open, rename, stat, unlink } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { type Digest, digestFile, parseDigest } from './digest.js';
import { fsFailure, isScError, type ScError, scError, toScError } from './errors.js';
import { type PartialHash, partialHash } from './fetch-hash.js';
import { abortableSleep, abortError, throwIfAborted } from './fetch-http.js';
import { adoptPartial, type DownloadState, LocalFailure, pull, truncateAll } from './fetch-pull.js';
import { describeError as describe, normalizeAll, normalizeSource, withOrigin } from './fetch-sources.js';
import { unserved } from './fetch-stall.js';

/** Progress of a blob download. */
export interface FetchProgress {
  /** Bytes of the blob received so far, resumed bytes included (the disk may lag by up to 1 MiB). */
  bytes: number;
  /** The blob size. */
  size: number;
  /** The source currently being read, or null before the first request. */
  source: string | null;
  /**
   * Bytes written to `out + '.partial'` so far: its first `written` bytes stay as they are until
   * `restarts` changes (a reader may follow the file up to here). They are verified only when
   * the fetch resolves.
   */
  written: number;
  /** Times the partial file was emptied (a digest mismatch starts over): the bytes written before are gone. */
  restarts: number;
}

/** Options for fetchBlob. */
export interface FetchBlobOptions {
  /** Candidates in order (see selectSources: its `stages`). */
  sources: readonly string[];
  /**
   * The last resort: tried only once `sources` are used up (every one failed `retries` + 1 passes
   * in a row without progress, or in one pass answered 404 or could not serve (see
   * `stallCheckMs`; a 502/503 SC_ERR_UPSTREAM, SC_ERR_NO_UPSTREAM or SC_ERR_UNAVAILABLE), or was
   * dropped for bad bytes), or when there are none; from then on it comes first, the stages
   * behind it. A stage that is merely slow keeps its hosts; origin serves one copy per colo, not
   * one per host.
   */
  origin?: string;
  digest: string;
  /** Expected size in bytes. */
  size: number;
  /** Destination path. The download goes to `out + '.partial'` first. */
  out: string;
  /** Called once at the start and for every chunk received. Must not throw. */
  onProgress?: (p: FetchProgress) => void;
  signal?: AbortSignal;
  /** A source that sends nothing for this long (connect, headers or body) is abandoned, in ms. Default 30000. */
  idleTimeoutMs?: number;
  /**
   * After this long without a byte (connect, headers or body), the source's /healthz is checked
   * (within `probeTimeoutMs`), then again every `stallCheckMs` while it stays silent. A source
   * whose check is refused, fails (an HTTP error, a reset) or says `degraded` is left at once (it
   * cannot serve now). A check that times out means busy, not down, as does a healthy answer: the
   * request is kept until `idleTimeoutMs`, whose expiry is an ordinary failure (the next candidate
   * goes on; the source is asked again in the next pass, and origin joins only once `retries` + 1
   * passes made no progress). In ms; default 3000; 0, or not below `idleTimeoutMs`, turns the
   * checks off.
   */
  stallCheckMs?: number;
  /** Deadline of one stall check, in ms. Default 2000. */
  probeTimeoutMs?: number;
  /** Extra passes over the candidate list after a pass that made no progress. Default 3. */
  retries?: number;
  /** Pause before the second pass, doubled on each further pass (capped at 16×), in ms. Default 500. */
  backoffMs?: number;
  /** Delete an existing `out` whose content differs, then fetch (default false: SC_ERR_FILE_EXISTS). */
  overwrite?: boolean;
  /**
   * Blob size from which the partial file is hashed on a thread of its own, reading back what was
   * written, instead of on this one (default HASH_THREAD_MIN_BYTES, 64 MiB; see shared/fetch-hash.ts).
   */
  hashThreadMinBytes?: number;
  /** Sleep used for backoff; injectable for tests. Must reject when `signal` aborts. */
  sleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
}

/** A completed, verified download. */
export interface FetchBlobResult {
  /** The file, now holding exactly the blob. */
  path: string;
  digest: Digest;
  size: number;
  /** Sources that contributed bytes to the final file, in order. Empty when `out` was already there. */
  sources: string[];
  /** Bytes taken from a `.partial` left by an earlier run. */
  resumedFrom: number;
  /** Bytes received over the network by this call (including bytes later discarded). */
  downloaded: number;
  /** True when `out` already held the blob and nothing was fetched. */
  alreadyPresent: boolean;
}

/**
 * Downloads blob `digest` of `size` bytes into `out`, trying `sources` in order.
 *
 * - `out` already holding the right bytes → nothing is fetched (`alreadyPresent`).
 * - Bytes go to `out + '.partial'`; an existing partial is re-hashed and continued.
 * - On an error or a stall mid-body the download continues from the next candidate with
 *   `Range: bytes=<have>-`. Each request follows the rules of shared/fetch-range.ts, the same as
 *   a stage's upstream fill (status, Content-Range, ETag, Content-Encoding, size; a 200 to a Range
 *   request continues after the bytes held). After a full pass without progress it waits
 *   (backoff) and wraps around, at most `retries` times in a row. Then `origin` joins, first in
 *   the passes that follow with the stages behind it (at once when every stage of a pass
 *   answered 404 or could not serve, or none is left), and the count starts again. A source that
 *   cannot serve is left at once: an answer 502/503 with SC_ERR_UPSTREAM, SC_ERR_NO_UPSTREAM or
 *   SC_ERR_UNAVAILABLE (a degraded stage's miss), or a silence of `stallCheckMs` after which its
 *   /healthz is refused, fails or says degraded. A check that times out means busy, not down:
 *   the source keeps the request until `idleTimeoutMs`, like any stalled source.
 * - sha256 is computed while writing. When the size is reached, the digest is checked: on a
 *   mismatch the partial is deleted; if one source supplied the whole file it is dropped and the
 *   download starts over from the others, else it starts over once from all of them; when
 *   nothing is left, SC_ERR_DIGEST_MISMATCH. Only a verified file is fsynced and renamed to `out`.
 *
 * Throws: SC_ERR_BAD_DIGEST / SC_ERR_BAD_REQUEST for bad input, SC_ERR_FILE_EXISTS (out differs,
 * no `overwrite`), SC_ERR_NO_UPSTREAM (no candidates), SC_ERR_DIGEST_MISMATCH, SC_ERR_BLOB_NOT_FOUND
 * (every source answered 404), SC_ERR_UPSTREAM (sources failed; details list them; the partial is
 * kept for a later resume), SC_ERR_TIMEOUT / SC_ERR_UNAVAILABLE when `signal` aborts,
 * SC_ERR_NO_SPACE when the disk is full, SC_ERR_INTERNAL for other local disk errors (both with
 * `details.errno` and `details.path`; the partial keeps what was written, all of it the blob's
 * own bytes). One fetch per `out` at a time: concurrent calls for the same `out` are not
 * coordinated.
 */
export async function fetchBlob(opts: FetchBlobOptions): Promise<FetchBlobResult> {
  const digest = parseDigest(opts.digest);
  const size = opts.size;
  if (!Number.isSafeInteger(size) || size < 0) throw scError('SC_ERR_BAD_REQUEST', `invalid blob size ${String(size)}`);
  const out = resolve(opts.out);
  const partial = `${out}.partial`;
  const idleTimeoutMs = opts.idleTimeoutMs ?? 30_000;
  const stallCheckMs = opts.stallCheckMs ?? 3000;
  const probeTimeoutMs = opts.probeTimeoutMs ?? 2000;
  const retries = opts.retries ?? 3;
  const backoffMs = opts.backoffMs ?? 500;
  const sleep = opts.sleep ?? abortableSleep;
  const signal = opts.signal;
  throwIfAborted(signal);

  const existing = await statOrNull(out);
  if (existing) {
    if (!existing.isFile()) throw scError('SC_ERR_FILE_EXISTS', `${out} exists and is not a regular file`);
    if (existing.size === size && (await digestFile(out)).digest === digest) {
      return { path: out, digest, size, sources: [], resumedFrom: 0, downloaded: 0, alreadyPresent: true };
    }
    if (!opts.overwrite) throw scError('SC_ERR_FILE_EXISTS', `${out} exists with other content`, { path: out });
    // It fails its digest: it goes now, so that no failure below can leave it looking valid.
    await unlink(out).catch((err) => {
      throw scError('SC_ERR_INTERNAL', `cannot remove ${out}: ${describe(err)}`, { path: out }, err);
    });
  }
  const originUrl = opts.origin === undefined ? undefined : normalizeSource(opts.origin);
  const stagesOnly = normalizeAll(opts.sources).filter((u) => u !== originUrl);
  // Origin joins the candidates only when the stages are used up (see `origin` above).
  let candidates = stagesOnly.length === 0 && originUrl ? [originUrl] : stagesOnly;
  const allCandidates = withOrigin(stagesOnly, originUrl);
  const toLastResort = (): boolean => {
    if (!originUrl || candidates.includes(originUrl)) return false;
    candidates = [originUrl, ...candidates];
    return true;
  };
  const partialStat = await statOrNull(partial);
  if (partialStat && !partialStat.isFile()) throw scError('SC_ERR_FILE_EXISTS', `${partial} exists and is not a regular file`);

  let fh: FileHandle;
  try {
    fh = await open(partial, fsc.O_RDWR | fsc.O_CREAT, 0o644);
  } catch (err) {
    throw scError('SC_ERR_INTERNAL', `cannot open ${partial}: ${describe(err)}`, { path: partial }, err);
  }
  let hash: PartialHash;
  try {
    hash = partialHash(fh.fd, size, opts.hashThreadMinBytes);
  } catch (err) {
    await fh.close().catch(() => undefined);
    throw scError('SC_ERR_INTERNAL', `cannot start hashing ${partial}: ${describe(err)}`, { path: partial }, err);
  }
  const st: DownloadState = { fh, hash, have: 0, hwm: 0, pieces: [], downloaded: 0, restarts: 0 };
  let done = false;
  let discard = false;
  try {
    const resumedFrom = await adoptPartial(st, size);
    if (st.have === 0 && candidates.length === 0 && size > 0) throw scError('SC_ERR_NO_UPSTREAM', 'no source to fetch the blob from');
    const progress = (source: string | null, pending = 0) => opts.onProgress?.({ bytes: st.have + pending, size, source, written: st.have, restarts: st.restarts });
    progress(null);

    const excluded = new Set<string>();
    const failures: { source: string; error: ScError }[] = [];
    let idlePasses = 0;
    let restarts = 0;
    let contributed: string[] = [];
    for (;;) {
      if (st.have < size) {
        const before = st.hwm;
        // True while every source of this pass answered 404 or could not serve (origin is then asked at once).
        let unservedPass = true;
        // True once a source of this pass said it cannot serve: then origin joins even if that source had made progress before.
        let cannotServe = false;
        for (const source of candidates) {
          if (st.have >= size) break;
          if (excluded.has(source)) continue;
          throwIfAborted(signal);
          try {
            await pull(st, { source, digest, size, idleTimeoutMs, stallCheckMs, probeTimeoutMs, signal, progress });
          } catch (err) {
            if (err instanceof LocalFailure) throw fsFailure(err.inner, `writing ${partial}`, partial);
            if (signal?.aborted) throw abortError(signal);
            const e = toScError(err); // pull fails with ScErrors (fetchRange's rules)
            failures.push({ source, error: e });
            if (unserved.has(err as object)) cannotServe = true;
            else if (e.code !== 'SC_ERR_BLOB_NOT_FOUND') unservedPass = false;
            if (failures.length > 50) failures.shift();
          }
        }
        if (st.have < size) {
          idlePasses = st.hwm > before ? 0 : idlePasses + 1;
          const live = candidates.filter((c) => !excluded.has(c));
          if ((idlePasses > retries || live.length === 0 || (unservedPass && (st.hwm === before || cannotServe))) && toLastResort()) {
            idlePasses = 0;
            continue;
          }
          if (idlePasses > retries || live.length === 0) throw allFailed(digest, failures, candidates.length === 0);
          if (idlePasses > 0) await sleep(backoffMs * 2 ** Math.min(idlePasses - 1, 4), signal).catch(() => throwIfAborted(signal));
          continue;
        }
      }
      // The partial holds `size` bytes: check them.
      const hex = await st.hash.digest().catch((err: unknown) => {
        throw new LocalFailure(err);
      });
      const actual: Digest = `sha256:${hex}`;
      contributed = [...new Set(st.pieces)];
      if (actual === digest) break;
      const mismatch = scError('SC_ERR_DIGEST_MISMATCH', `blob ${digest} from ${contributed.join(', ')} hashed to ${actual}`, {
        expected: digest,
        actual,
        sources: contributed,
      });
      await truncateAll(st);
      if (contributed.length === 1 && contributed[0] !== 'partial') excluded.add(contributed[0]);
      restarts++;
      failures.push({ source: contributed.join(','), error: mismatch });
      if (candidates.every((c) => excluded.has(c))) toLastResort();
      if (restarts > allCandidates.length || candidates.every((c) => excluded.has(c))) throw mismatch;
    }
    await st.flushing;
    if (st.flushError) throw new LocalFailure(st.flushError);
    await st.hash.close();
    await fh.sync();
    await fh.close();
    await rename(partial, out);
    done = true;
    await syncDir(dirname(out));
    return {
      path: out,
      digest,
      size,
      sources: contributed.filter((s) => s !== 'partial'),
      resumedFrom,
      downloaded: st.downloaded,
      alreadyPresent: false,
    };
  } catch (err) {
    if (isScError(err, 'SC_ERR_DIGEST_MISMATCH')) discard = true;
    if (err instanceof LocalFailure) throw fsFailure(err.inner, `writing ${partial}`, partial);
    throw err;
  } finally {
    if (!done) {
      // The hashing thread reads through this descriptor: it stops before the descriptor closes.
      await st.hash.close().catch(() => undefined);
      await fh.close().catch(() => undefined);
      // Keep a partial worth resuming; an empty one, or one found corrupt, goes.
      if (discard || st.have === 0) await unlink(partial).catch(() => undefined);
    }
  }
}

function allFailed(digest: Digest, failures: { source: string; error: ScError }[], none: boolean): ScError {
  if (none) return scError('SC_ERR_NO_UPSTREAM', 'no source to fetch the blob from');
  const details = { sources: failures.slice(-20).map((f) => ({ source: f.source, code: f.error.code, message: f.error.message })) };
  if (failures.length > 0 && failures.every((f) => f.error.code === 'SC_ERR_BLOB_NOT_FOUND')) {
    return scError('SC_ERR_BLOB_NOT_FOUND', `no source has blob ${digest}`, details);
  }
  const mismatch = failures.find((f) => f.error.code === 'SC_ERR_DIGEST_MISMATCH');
  if (mismatch) return scError('SC_ERR_DIGEST_MISMATCH', mismatch.error.message, { ...mismatch.error.details, ...details });
  const last = failures[failures.length - 1];
  return scError('SC_ERR_UPSTREAM', `could not fetch blob ${digest}${last ? `; last failure: ${last.source}: ${last.error.message}` : ''}`, details);
}

async function statOrNull(path: string) {
  try {
    return await stat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw scError('SC_ERR_INTERNAL', `cannot stat ${path}: ${describe(err)}`, { path }, err);
  }
}

async function syncDir(dir: string): Promise<void> {
  const d = await open(dir, 'r').catch(() => null);
  if (!d) return;
  try {
    await d.sync();
  } catch {
    /* some filesystems refuse fsync on directories */
  } finally {
    await d.close();
  }
}
