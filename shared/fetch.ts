/**
 * Host-side fetching over the read API (ARCHITECTURE.md, "HTTP read API"), used by the CLI
 * (`stagecoach get`) and by the agent's fetch step:
 *
 * - `probeSources`, `selectSources` (shared/fetch-sources.ts, re-exported): which stages answer
 *   /healthz and the candidate order (healthy stages by RTT, then degraded, then unhealthy, then origin);
 * - `fetchManifest`: the first manifest that parses and verifies against the trusted keys;
 * - `fetchBlob`: a resumable, multi-source, digest-verified download into a file.
 *
 * A source is a base URL (`http://stage-a:7071`, or with a path prefix). Origin and stages are
 * indistinguishable here: they serve the same read API.
 */
import { createHash, type Hash, type KeyObject } from 'node:crypto';
import { constants as fsc } from 'node:fs';
import { type FileHandle, open, rename, stat, unlink } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { Readable } from 'node:stream';
import got, { type Request as GotRequest } from 'got';
import { type Digest, digestFile, parseDigest } from './digest.js';
import { type ErrorCode, fromErrorBody, isScError, ScError, scError, toScError } from './errors.js';
import { type Manifest, manifestDigest, parseManifest, verifyManifest } from './manifest.js';
import { parseName, parseVersion } from './names.js';
import { checkSource, describeError as describe, normalizeAll, normalizeSource, withOrigin } from './fetch-sources.js';
import { gotTls, tlsError } from './tls.js';

/** Largest manifest or error body read from a source, in bytes. */
const MAX_SMALL_BODY = 1 << 20;
/** Downloaded bytes are written to disk in batches of about this many bytes. */
const WRITE_BATCH = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Sources: shared/fetch-sources.ts (probing and ranking), re-exported here for callers.

export {
  checkSource,
  normalizeSource,
  type ProbeOptions,
  type ProbeResult,
  probeSources,
  type SelectedSources,
  type SelectOptions,
  selectSources,
} from './fetch-sources.js';

// ---------------------------------------------------------------------------------------------
// Manifests

/** Options for fetchManifest. */
export interface FetchManifestOptions {
  /** Appended as the last source when not already in the list. */
  origin?: string;
  /** Deadline per source for the whole manifest exchange, in ms (default 10000). */
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** A verified manifest and where it came from. */
export interface FetchedManifest {
  manifest: Manifest;
  /** The source that served it. */
  source: string;
  /** Id of the trusted key whose signature verified. */
  keyId: string;
  /** sha256 of the manifest's canonical JSON. */
  manifestDigest: Digest;
}

/** Order in which per-source failures are reported when every source failed: security first. */
const MANIFEST_ERROR_PRIORITY: ErrorCode[] = ['SC_ERR_BAD_SIGNATURE', 'SC_ERR_UNTRUSTED_KEY', 'SC_ERR_BAD_MANIFEST', 'SC_ERR_TLS', 'SC_ERR_MANIFEST_NOT_FOUND'];

/**
 * Fetches `name@version` from the first source whose answer parses (parseManifest), names the
 * requested bundle, and verifies against `trusted`. A source that fails in any way (including a
 * bad signature: a stage may be corrupt) is passed over for the next one. When all fail, the
 * most serious failure is thrown: SC_ERR_BAD_SIGNATURE, then SC_ERR_UNTRUSTED_KEY, then
 * SC_ERR_BAD_MANIFEST, then SC_ERR_TLS, then SC_ERR_MANIFEST_NOT_FOUND, else SC_ERR_UPSTREAM (details list every
 * source's failure). Throws SC_ERR_BAD_NAME / SC_ERR_BAD_VERSION for malformed input,
 * SC_ERR_BAD_CONFIG without trusted keys, SC_ERR_NO_UPSTREAM without sources.
 */
export async function fetchManifest(
  sources: readonly string[],
  name: string,
  version: string,
  trusted: readonly KeyObject[],
  opts: FetchManifestOptions = {},
): Promise<FetchedManifest> {
  parseName(name);
  parseVersion(version);
  if (trusted.length === 0) throw scError('SC_ERR_BAD_CONFIG', 'no trusted public keys: refusing to accept any manifest');
  const list = withOrigin(sources, opts.origin);
  if (list.length === 0) throw scError('SC_ERR_NO_UPSTREAM', 'no source to fetch the manifest from');
  const failures: { source: string; error: ScError }[] = [];
  for (const source of list) {
    throwIfAborted(opts.signal);
    try {
      const body = await getSmall(`${source}/v1/bundles/${name}/${version}`, opts.timeoutMs ?? 10_000, opts.signal);
      if (body.status === 404) throw scError('SC_ERR_MANIFEST_NOT_FOUND', `${name}@${version} not found at ${source}`);
      if (body.status !== 200) throw errorFromBody(body.status, body.data);
      let json: unknown;
      try {
        json = JSON.parse(body.data.toString('utf8'));
      } catch {
        throw scError('SC_ERR_BAD_MANIFEST', `${source} answered with something that is not JSON`);
      }
      const manifest = parseManifest(json);
      if (manifest.name !== name || manifest.version !== version) {
        throw scError('SC_ERR_BAD_MANIFEST', `${source} answered ${manifest.name}@${manifest.version} for ${name}@${version}`);
      }
      const keyId = verifyManifest(manifest, [...trusted]);
      return { manifest, source, keyId, manifestDigest: manifestDigest(manifest) };
    } catch (err) {
      if (opts.signal?.aborted) throw abortError(opts.signal);
      failures.push({ source, error: tlsError(err, source) ?? toScError(err) });
    }
  }
  const details = { sources: failures.map((f) => ({ source: f.source, code: f.error.code, message: f.error.message })) };
  for (const code of MANIFEST_ERROR_PRIORITY) {
    const f = failures.find((x) => x.error.code === code);
    if (f) throw scError(code, `${f.error.message} (from ${f.source}; ${failures.length} source(s) tried)`, { ...f.error.details, ...details });
  }
  throw scError('SC_ERR_UPSTREAM', `no source served ${name}@${version}: ${failures.map((f) => `${f.source}: ${f.error.message}`).join('; ')}`, details);
}

// ---------------------------------------------------------------------------------------------
// Blobs

/** Progress of a blob download. */
export interface FetchProgress {
  /** Bytes of the blob received so far, resumed bytes included (the disk may lag by up to 1 MiB). */
  bytes: number;
  /** The blob size. */
  size: number;
  /** The source currently being read, or null before the first request. */
  source: string | null;
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
   * whose check fails or says `degraded` is left at once (it cannot serve now); a healthy one
   * keeps the request until `idleTimeoutMs` (busy is not down). In ms; default 3000; 0, or not
   * below `idleTimeoutMs`, turns the checks off.
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

/** A local failure (disk): never retried on another source. */
class LocalFailure extends Error {
  constructor(readonly inner: unknown) {
    super((inner as Error)?.message ?? String(inner));
  }
}

interface DownloadState {
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

/**
 * Downloads blob `digest` of `size` bytes into `out`, trying `sources` in order.
 *
 * - `out` already holding the right bytes → nothing is fetched (`alreadyPresent`).
 * - Bytes go to `out + '.partial'`; an existing partial is re-hashed and continued.
 * - On an error or a stall mid-body the download continues from the next candidate with
 *   `Range: bytes=<have>-` (the 206 Content-Range start and total are checked; a 200 answer means
 *   starting over from 0 with that source). After a full pass without progress it waits
 *   (backoff) and wraps around, at most `retries` times in a row. Then `origin` joins, first in
 *   the passes that follow with the stages behind it (at once when every stage of a pass
 *   answered 404 or could not serve, or none is left), and the count starts again. A source that
 *   cannot serve is left at once: an answer 502/503 with SC_ERR_UPSTREAM, SC_ERR_NO_UPSTREAM or
 *   SC_ERR_UNAVAILABLE (a degraded stage's miss), or a silence of `stallCheckMs` after which its
 *   /healthz fails or says degraded.
 * - sha256 is computed while writing. When the size is reached, the digest is checked: on a
 *   mismatch the partial is deleted; if one source supplied the whole file it is dropped and the
 *   download starts over from the others, else it starts over once from all of them; when
 *   nothing is left, SC_ERR_DIGEST_MISMATCH. Only a verified file is fsynced and renamed to `out`.
 *
 * Throws: SC_ERR_BAD_DIGEST / SC_ERR_BAD_REQUEST for bad input, SC_ERR_FILE_EXISTS (out differs,
 * no `overwrite`), SC_ERR_NO_UPSTREAM (no candidates), SC_ERR_DIGEST_MISMATCH, SC_ERR_BLOB_NOT_FOUND
 * (every source answered 404), SC_ERR_UPSTREAM (sources failed; details list them; the partial is
 * kept for a later resume), SC_ERR_TIMEOUT / SC_ERR_UNAVAILABLE when `signal` aborts, SC_ERR_INTERNAL
 * for local disk errors. One fetch per `out` at a time: concurrent calls for the same `out` are
 * not coordinated.
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
  const st: DownloadState = { fh, hash: createHash('sha256'), have: 0, hwm: 0, pieces: [], downloaded: 0 };
  let done = false;
  let discard = false;
  try {
    const resumedFrom = await adoptPartial(st, size);
    if (st.have === 0 && candidates.length === 0 && size > 0) throw scError('SC_ERR_NO_UPSTREAM', 'no source to fetch the blob from');
    const progress = (source: string | null, pending = 0) => opts.onProgress?.({ bytes: st.have + pending, size, source });
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
            if (err instanceof LocalFailure) throw scError('SC_ERR_INTERNAL', `writing ${partial}: ${err.message}`, { path: partial }, err.inner);
            if (signal?.aborted) throw abortError(signal);
            const e = tlsError(err, source) ?? toScError(err);
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
      const actual: Digest = `sha256:${st.hash.copy().digest('hex')}`;
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
    if (err instanceof LocalFailure) throw scError('SC_ERR_INTERNAL', `writing ${partial}: ${err.message}`, { path: partial }, err.inner);
    throw err;
  } finally {
    if (!done) {
      await fh.close().catch(() => undefined);
      // Keep a partial worth resuming; an empty one, or one found corrupt, goes.
      if (discard || st.have === 0) await unlink(partial).catch(() => undefined);
    }
  }
}

/** Re-hashes what an earlier run left in the partial file; returns how many bytes are reused. */
async function adoptPartial(st: DownloadState, size: number): Promise<number> {
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

async function truncateAll(st: DownloadState): Promise<void> {
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

interface PullArgs {
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
async function pull(st: DownloadState, a: PullArgs): Promise<void> {
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

/** Codes with which a source (a stage) says it cannot serve now: its upstreams failed or it is closing. */
const UNSERVED_CODES: ReadonlySet<ErrorCode> = new Set(['SC_ERR_UPSTREAM', 'SC_ERR_NO_UPSTREAM', 'SC_ERR_UNAVAILABLE']);

/** Errors meaning "this source cannot serve now" (not "it is slow"): fail over at once, and let origin join. */
const unserved = new WeakSet<object>();

/**
 * The stall checks of one request (see `FetchBlobOptions.stallCheckMs`): `activity()` on every
 * sign of life; after `stallCheckMs` without one, the source's /healthz is checked, and a failed
 * or degraded answer destroys `req` and sets `error` (in `unserved`; got wraps what destroys it). One check at a time; an answer
 * that arrives after new bytes is ignored. `stop()` ends it (and a check in flight).
 */
function watchStall(req: GotRequest, a: PullArgs): { activity(): void; stop(): void; readonly error: ScError | null } {
  const every = a.stallCheckMs;
  if (!(every > 0 && every < a.idleTimeoutMs)) return { activity() {}, stop() {}, error: null };
  let error: ScError | null = null;
  let last = performance.now();
  let timer: NodeJS.Timeout | undefined;
  let checking: AbortController | null = null;
  let stopped = false;
  const schedule = (ms: number) => {
    timer = setTimeout(tick, ms);
  };
  const tick = () => {
    const quiet = performance.now() - last;
    if (quiet < every) return schedule(every - quiet);
    const seen = last;
    checking = new AbortController();
    void checkSource(a.source, { timeoutMs: a.probeTimeoutMs, signal: checking.signal }).then((r) => {
      checking = null;
      if (stopped || req.destroyed) return;
      if (last !== seen || (r.healthy && !r.degraded)) return schedule(every);
      const why = r.degraded ? 'it reports degraded (no upstream answers)' : `its /healthz failed (${r.error ?? 'unhealthy'})`;
      const e = scError(r.degraded ? 'SC_ERR_NO_UPSTREAM' : 'SC_ERR_UNAVAILABLE', `${a.source}: nothing received for ${Math.round(performance.now() - seen)} ms and ${why}`);
      unserved.add(e);
      error = e;
      req.destroy(e);
    });
  };
  schedule(every);
  return {
    activity() {
      last = performance.now();
    },
    stop() {
      stopped = true;
      clearTimeout(timer);
      checking?.abort();
    },
    get error() {
      return error;
    },
  };
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

// ---------------------------------------------------------------------------------------------
// Small helpers

function responseOf(req: GotRequest): Promise<{ statusCode: number; headers: Record<string, string | string[] | undefined> }> {
  return new Promise((resolveP, reject) => {
    const onResponse = (res: { statusCode: number; headers: Record<string, string | string[] | undefined> }) => {
      req.off('error', onError);
      resolveP(res);
    };
    const onError = (err: unknown) => {
      req.off('response', onResponse);
      reject(err);
    };
    req.once('response', onResponse);
    req.once('error', onError);
  });
}

/** Reads a whole body, failing with SC_ERR_TOO_LARGE beyond `max` bytes. */
async function readBounded(src: Readable, max: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  let n = 0;
  for await (const c of src as AsyncIterable<Buffer>) {
    n += c.length;
    if (n > max) {
      src.destroy();
      throw scError('SC_ERR_TOO_LARGE', `response body larger than ${max} bytes`);
    }
    parts.push(c);
  }
  return Buffer.concat(parts);
}

/** GET of a small document with a whole-exchange deadline. */
async function getSmall(url: string, timeoutMs: number, signal?: AbortSignal): Promise<{ status: number; data: Buffer }> {
  const req = got.stream(url, { ...gotTls(),
    retry: { limit: 0 },
    throwHttpErrors: false,
    followRedirect: false,
    headers: { accept: 'application/json', 'user-agent': 'stagecoach-fetch' },
    timeout: { request: timeoutMs },
    signal,
  });
  try {
    const res = await responseOf(req);
    return { status: res.statusCode, data: await readBounded(req, MAX_SMALL_BODY) };
  } catch (err) {
    if (isScError(err)) throw err;
    throw tlsError(err, url) ?? scError((err as { code?: string })?.code === 'ETIMEDOUT' ? 'SC_ERR_TIMEOUT' : 'SC_ERR_UPSTREAM', `${url}: ${describe(err)}`);
  } finally {
    if (!req.destroyed) req.destroy();
  }
}

function errorFromBody(status: number, data: Buffer, source?: string): ScError {
  let body: unknown;
  try {
    body = JSON.parse(data.toString('utf8'));
  } catch {
    body = undefined;
  }
  const e = fromErrorBody(status, body);
  return source ? scError(e.code, `${source}: ${e.message}`, e.details) : e;
}

function abortError(signal: AbortSignal): ScError {
  const r = signal.reason as { name?: string } | undefined;
  if (r instanceof ScError) return r;
  if (r?.name === 'TimeoutError') return scError('SC_ERR_TIMEOUT', 'fetch timed out');
  return scError('SC_ERR_UNAVAILABLE', 'fetch aborted');
}

function throwIfAborted(signal?: AbortSignal): void {
  if (signal?.aborted) throw abortError(signal);
}

function abortableSleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolveP, reject) => {
    if (signal?.aborted) return reject(abortError(signal));
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolveP();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(abortError(signal!));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
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
