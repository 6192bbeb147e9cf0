/**
 * Fetch and unpack in one pass: the bundle is decrypted, decompressed and untarred while its
 * bytes arrive, and the result counts only once the whole blob matched its signed sha256.
 *
 * fetchBlob (shared/fetch-blob.ts) downloads into `out + '.partial'`, hashing what it writes; the
 * unpack worker (shared/bundle/unpack-file.ts) follows that file up to the bytes written. Every
 * rule of the download (sources, Range resume, failover, digest check, rename only when
 * verified) is fetchBlob's, unchanged. The unpack is only a reader behind it:
 * - the tree is a result only when fetchBlob resolved (the file verified) and the partial file
 *   was never emptied while the unpack read it;
 * - when the partial was emptied (a source's bytes failed the digest and the download started
 *   over) or the overlapped unpack failed, `reset` empties the target and the verified file is
 *   unpacked again, once, on its own (its error is then the bundle's own);
 * - when the fetch fails, the unpack is stopped and `reset` empties the target: nothing unpacked
 *   from unverified bytes is left (by this process: a caller that can be killed midway unpacks
 *   into a place that says so, as `get --unpack` does).
 * Bundles the worker does not unpack (unencrypted, not zstd, small) are fetched, then unpacked.
 */
import { resolve } from 'node:path';
import type { ExtractResult } from './bundle/tar.js';
import { type UnpackFileOptions, unpackFile, unpacksInWorker, WriteMark } from './bundle/unpack-file.js';
import { scError } from './errors.js';
import { type FetchBlobOptions, type FetchBlobResult, fetchBlob } from './fetch-blob.js';
import type { Manifest } from './manifest.js';

/** What fetchAndUnpack did. */
export interface FetchUnpackResult {
  fetched: FetchBlobResult;
  unpacked: ExtractResult;
  /** True when the tree came from the overlapped pass; false when it was unpacked after the fetch. */
  overlapped: boolean;
}

/**
 * Fetches blob `blob` (fetchBlob with `fetch`) and unpacks it into `unpack.dir`, overlapped (see
 * the module doc). `reset` must empty `unpack.dir`; it runs before a second unpack and after a
 * failure once the overlapped unpack wrote into it. Rejects with fetchBlob's errors, or
 * unpackFile's for a verified file that does not unpack.
 */
export async function fetchAndUnpack(
  fetch: FetchBlobOptions,
  blob: Manifest['blob'],
  unpack: Omit<UnpackFileOptions, 'verified' | 'follow'>,
  reset: () => Promise<void>,
): Promise<FetchUnpackResult> {
  if (fetch.digest !== blob.digest || fetch.size !== blob.size) throw scError('SC_ERR_BAD_REQUEST', 'fetchAndUnpack: the fetch is not for this blob');
  // A failure's own error is the one reported; `reset` failing on top of it is not.
  const resetAfterFailure = () => reset().catch(() => {});
  if (!unpacksInWorker(blob, unpack.workerMinBytes)) {
    const fetched = await fetchBlob(fetch);
    try {
      return { fetched, unpacked: await unpackFile(fetched.path, blob, { ...unpack, verified: true }), overlapped: false };
    } catch (err) {
      await resetAfterFailure();
      throw err;
    }
  }
  const partial = `${resolve(fetch.out)}.partial`;
  const mark = new WriteMark();
  const stop = new AbortController();
  const signal = unpack.signal ? AbortSignal.any([unpack.signal, stop.signal]) : stop.signal;
  let unpacking: Promise<ExtractResult> | null = null;
  let startedAt = -1;
  let restarts = -1;
  const fetching = fetchBlob({
    ...fetch,
    onProgress: (p) => {
      fetch.onProgress?.(p);
      restarts = p.restarts;
      if (unpacking === null) {
        // The first report comes once the partial file is open (and any earlier partial adopted).
        startedAt = p.restarts;
        unpacking = unpackFile(partial, blob, { ...unpack, signal, verified: true, follow: mark });
        unpacking.catch(() => {}); // awaited below; a failure meanwhile is not unhandled
      }
      if (p.restarts !== startedAt) stop.abort();
      else mark.raise(p.written);
    },
  });
  let fetched: FetchBlobResult;
  try {
    fetched = await fetching;
  } catch (err) {
    stop.abort();
    if (unpacking) {
      await (unpacking as Promise<ExtractResult>).catch(() => {});
      await resetAfterFailure();
    }
    throw err;
  }
  if (unpacking && restarts === startedAt && !stop.signal.aborted) {
    mark.raise(blob.size);
    try {
      return { fetched, unpacked: await unpacking, overlapped: true };
    } catch (err) {
      if (unpack.signal?.aborted) {
        await resetAfterFailure();
        throw err;
      }
      // Unpacked again below from the verified file: its error, if any, is the bundle's own.
    }
  }
  stop.abort();
  if (unpacking) {
    await (unpacking as Promise<ExtractResult>).catch(() => {});
    await reset();
  }
  try {
    return { fetched, unpacked: await unpackFile(fetched.path, blob, { ...unpack, verified: true }), overlapped: false };
  } catch (err) {
    await resetAfterFailure();
    throw err;
  }
}
