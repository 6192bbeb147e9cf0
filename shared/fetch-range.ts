/**
 * One ranged blob request: `GET /v1/blobs/<digest>` to one source, asking for what the caller's
 * sink does not hold yet (`Range: bytes=<held>-` when it holds something), its answer checked
 * and its body handed to the sink. Both blob downloaders make their requests here, so both obey
 * the same rules: the host's (shared/fetch-pull.ts, under fetchBlob's passes over the stages with
 * origin as the last resort) and the stage's upstream fill (services/stage/upstreams.ts, under
 * fetchInto's retries, backoff and failover). Those policy loops stay with their callers.
 *
 * The request: got stream, no retry (the callers' loops are the only retry logic), no redirect,
 * no decompression, `Accept-Encoding: identity`, the caller's User-Agent and agents.
 *
 * The rules. `size` is the blob size the caller knows, if any (the host knows it from the
 * manifest; a stage learns it from its first answer); `held` is the sink's offset.
 * - 404: SC_ERR_BLOB_NOT_FOUND.
 * - 416: SC_ERR_SIZE_MISMATCH when its Content-Range (`bytes *` then `/<total>`) names a total
 *   other than `size`; else SC_ERR_BAD_RANGE (the source refused the resume point; a stage that does not
 *   know the size yet then forgets what it holds).
 * - Any other status but 200 and 206: the ScError its JSON error body carries (errorFromBody:
 *   SC_ERR_UPSTREAM for a 5xx without a known code, SC_ERR_BAD_REQUEST for other statuses).
 * - 200 or 206 with an ETag other than `"<digest>"` (a `W/` prefix ignored), or with a
 *   Content-Encoding other than identity: SC_ERR_UPSTREAM.
 * - 206: `Content-Range: bytes <from>-<to>/<total>` with from = held, from ≤ to, and `*` as a
 *   total accepted; a Content-Length must then be to - from + 1. Else SC_ERR_UPSTREAM.
 * - The blob size is the 206 total, else the 200 Content-Length, else `size`; none of them:
 *   SC_ERR_UPSTREAM. An announced size other than `size`: SC_ERR_SIZE_MISMATCH. A range that
 *   ends at or past the blob's end (to ≥ size): SC_ERR_UPSTREAM.
 * - A 200 to a Range request (the source ignored it): its first `held` bytes are received and
 *   dropped, the rest continues the sink. Restarting would cost the same on the network plus a
 *   rewrite of the held bytes; skipping is safe because both callers check the whole blob's
 *   sha256 before using it. A 200 for a blob shorter than what is held: SC_ERR_BAD_RANGE.
 * - Body: a chunk that would reach past the announced end is not handed to the sink and fails
 *   the attempt with SC_ERR_SIZE_MISMATCH (the bytes before it are kept). A body that ends
 *   before the blob's last byte (a cut, a short body, a 206 for less than was asked) fails with
 *   SC_ERR_UPSTREAM once the sink holds every byte received.
 * - Silence (no answer, no byte) for `idleTimeoutMs` on the caller's clock: SC_ERR_TIMEOUT.
 * - `signal` aborts: abortError(signal) (its ScError reason, SC_ERR_TIMEOUT for a timeout,
 *   else SC_ERR_UNAVAILABLE). `end(e)` given to the `started` hook: exactly `e`.
 * - Any other failure: SC_ERR_TLS for certificate problems (tlsError), SC_ERR_TIMEOUT for a
 *   socket timeout, the code of an error that carries one of ours, else SC_ERR_UPSTREAM naming
 *   the source.
 * Every failure is an ScError, except the sink's own: those come out as a SinkFailure (a local
 * problem, which no other source would fix).
 */
import type { Agent as HttpAgent } from 'node:http';
import type { Agent as HttpsAgent } from 'node:https';
import got, { type Request as GotRequest } from 'got';
import { type Clock, realClock } from './clock.js';
import type { Digest } from './digest.js';
import { ERRORS, type ErrorCode, isScError, type ScError, scError } from './errors.js';
import { abortError, errorFromBody, readBounded, responseOf, throwIfAborted } from './fetch-http.js';
import { describeError as describe } from './fetch-sources.js';
import { gotTls, tlsError } from './tls.js';

/** Largest error body read from a source, in bytes. */
const MAX_ERROR_BODY = 64 * 1024;

/** Where the body of a blob answer goes: a prefix of the blob, extended at its end. */
export interface RangeSink {
  /** Bytes of the blob already held (a prefix): the request asks for the rest, from here. */
  offset(): number;
  /**
   * The answer passed the checks: the blob is `size` bytes. May throw (the attempt then fails
   * with a SinkFailure), and may drop what is held (offset() then returns 0).
   */
  begin?(size: number): void | Promise<void>;
  /** Appends `chunk` at the end of what is held; a returned promise is awaited before the next chunk (backpressure). */
  write(chunk: Buffer): void | Promise<void>;
  /** Called once after the last write, whatever the outcome: resolves when every byte written is held. */
  flush?(): Promise<void>;
}

/** What the callers learn of one attempt as it runs (for stall checks, health and metrics). Hooks must not throw. */
export interface RangeHooks {
  /** The request is made. `end(e)` ends the attempt, which then fails with exactly `e`. */
  started?(request: GotRequest, end: (e: ScError) => void): void;
  /** The source answered (status line and headers), before any check. */
  answered?(status: number, headers: Record<string, string | string[] | undefined>): void;
  /**
   * The request failed before any answer (refused, reset, timed out, ended): `err` is what failed
   * it, a socket error with its own code (ECONNREFUSED, …). Not called when `signal` aborted.
   */
  unanswered?(err: unknown): void;
  /** A body chunk of `bytes` arrived (dropped bytes included). */
  chunk?(bytes: number): void;
}

/** One ranged request. */
export interface RangeRequest {
  /** Base URL of the source (origin or a stage), without a trailing slash. */
  source: string;
  digest: Digest;
  /** The blob size, when the caller knows it. */
  size: number | null;
  /** An attempt that receives nothing (connect, headers or body) for this long fails with SC_ERR_TIMEOUT, in ms. */
  idleTimeoutMs: number;
  userAgent: string;
  /** The clock of the idle timer (default: the real one). */
  clock?: Clock;
  signal?: AbortSignal;
  /** Connection pools (default: got's). */
  agent?: { http?: HttpAgent; https?: HttpsAgent };
  hooks?: RangeHooks;
}

/** A completed attempt: the sink now holds the whole blob. */
export interface RangeResult {
  /** The blob size. */
  size: number;
  status: 200 | 206;
}

/** The sink failed (a local problem). `inner` is what it threw. */
export class SinkFailure extends Error {
  constructor(readonly inner: unknown) {
    super((inner as Error)?.message ?? String(inner));
  }

  /** `err` as a SinkFailure (itself if it is one). */
  static of(err: unknown): SinkFailure {
    return err instanceof SinkFailure ? err : new SinkFailure(err);
  }
}

type Headers = Record<string, string | string[] | undefined>;

/**
 * Makes one ranged request for blob `r.digest` from `r.source` into `sink` (see the rules
 * above). Resolves once the sink holds the whole blob; throws an ScError (or a SinkFailure) on
 * anything else, after the sink got every byte received that the rules let through.
 */
export async function fetchRange(sink: RangeSink, r: RangeRequest): Promise<RangeResult> {
  throwIfAborted(r.signal);
  const clock = r.clock ?? realClock;
  const src = r.source;
  const held = sink.offset();
  const headers: Record<string, string> = { 'accept-encoding': 'identity', 'user-agent': r.userAgent };
  if (held > 0) headers.range = `bytes=${held}-`;
  const req = got.stream(`${src}/v1/blobs/${r.digest}`, {
    ...gotTls(),
    headers,
    retry: { limit: 0 },
    throwHttpErrors: false,
    decompress: false,
    followRedirect: false,
    ...(r.agent ? { agent: r.agent } : {}),
  });
  let ended: ScError | null = null;
  const end = (e: ScError) => {
    if (req.destroyed) return;
    ended = e;
    req.destroy(e);
  };
  let timer: unknown;
  const arm = () => {
    clock.clearTimeout(timer);
    timer = clock.setTimeout(() => end(scError('SC_ERR_TIMEOUT', `${src}: nothing received for ${r.idleTimeoutMs} ms`)), r.idleTimeoutMs);
  };
  // Failures surface through responseOf / the body iterator; this listener only keeps an error
  // emitted between two awaits from becoming an uncaught exception.
  req.on('error', () => {});
  const onAbort = () => end(abortError(r.signal!));
  r.signal?.addEventListener('abort', onAbort, { once: true });
  let sinkOpen = false;
  try {
    arm();
    r.hooks?.started?.(req, end);
    const res = await responseOf(req).catch((err: unknown) => {
      if (!r.signal?.aborted) r.hooks?.unanswered?.(ended ?? err);
      throw err;
    });
    arm();
    r.hooks?.answered?.(res.statusCode, res.headers);
    const a = await checkAnswer(req, res.statusCode, res.headers, r, held);
    try {
      await sink.begin?.(a.size);
    } catch (err) {
      throw SinkFailure.of(err);
    }
    // The sink may have dropped what it held (it held more than the blob): a 200 then fills it
    // from 0; a 206 no longer continues it.
    let pos = sink.offset();
    if (a.status === 206 && pos !== a.from) throw scError('SC_ERR_BAD_RANGE', `${src}: the range from ${a.from} no longer continues the ${pos} bytes held`);
    if (pos > a.size) throw scError('SC_ERR_BAD_RANGE', `${src}: the blob is ${a.size} bytes, fewer than the ${pos} held`);
    sinkOpen = true;
    let at = a.from; // blob offset of the next body byte
    for await (const raw of req as AsyncIterable<Buffer>) {
      arm();
      r.hooks?.chunk?.(raw.length);
      let chunk = raw;
      if (at < pos) {
        const drop = Math.min(pos - at, chunk.length);
        at += drop;
        chunk = chunk.subarray(drop);
      }
      if (chunk.length === 0) continue;
      if (at + chunk.length > a.end + 1) throw scError('SC_ERR_SIZE_MISMATCH', `${src}: sent more than the ${a.end + 1 - a.from} bytes announced`);
      try {
        const w = sink.write(chunk);
        if (w) await w;
      } catch (err) {
        throw SinkFailure.of(err);
      }
      at += chunk.length;
      pos += chunk.length;
    }
    sinkOpen = false;
    await flush(sink);
    if (pos < a.size) throw scError('SC_ERR_UPSTREAM', `${src}: the answer ended early, at byte ${pos} of ${a.size}`, { have: pos, size: a.size });
    return { size: a.size, status: a.status };
  } catch (err) {
    if (sinkOpen) await flush(sink);
    throw err instanceof SinkFailure ? err : attemptError(ended ?? err, src);
  } finally {
    clock.clearTimeout(timer);
    r.signal?.removeEventListener('abort', onAbort);
    if (!req.destroyed) req.destroy();
  }
}

/** Flushes the sink; its failure is a SinkFailure. */
async function flush(sink: RangeSink): Promise<void> {
  try {
    await sink.flush?.();
  } catch (err) {
    throw SinkFailure.of(err);
  }
}

/** The checks of one answer (see the rules above): the blob size and the body's first and last blob offsets. */
async function checkAnswer(req: GotRequest, status: number, h: Headers, r: RangeRequest, held: number): Promise<{ status: 200 | 206; size: number; from: number; end: number }> {
  const src = r.source;
  if (status !== 200 && status !== 206) {
    const body = await readBounded(req, MAX_ERROR_BODY).catch(() => Buffer.alloc(0));
    if (status === 404) throw scError('SC_ERR_BLOB_NOT_FOUND', `${src}: blob ${r.digest} not found`);
    if (status === 416) {
      const m = /^bytes \*\/(\d+)$/.exec(one(h['content-range']));
      const total = m ? Number(m[1]) : null;
      if (total !== null && r.size !== null && total !== r.size) {
        throw scError('SC_ERR_SIZE_MISMATCH', `${src}: blob is ${total} bytes, expected ${r.size}`, { size: total, expected: r.size });
      }
      throw scError('SC_ERR_BAD_RANGE', `${src}: refused the range from ${held}`, total === null ? undefined : { size: total });
    }
    throw errorFromBody(status, body, src);
  }
  const etag = h.etag === undefined ? undefined : one(h.etag).replace(/^W\//, '');
  if (etag !== undefined && etag !== `"${r.digest}"`) throw scError('SC_ERR_UPSTREAM', `${src}: ETag ${etag.slice(0, 80)} is not "${r.digest}"`);
  const enc = h['content-encoding'];
  if (enc !== undefined && one(enc) !== 'identity') throw scError('SC_ERR_UPSTREAM', `${src}: unexpected Content-Encoding ${one(enc).slice(0, 40)}`);
  const lenText = h['content-length'];
  const len = lenText === undefined ? undefined : Number(lenText);
  if (len !== undefined && !(Number.isSafeInteger(len) && len >= 0)) throw scError('SC_ERR_UPSTREAM', `${src}: bad Content-Length ${one(lenText).slice(0, 40)}`);
  let size: number | null;
  let from = 0;
  let to: number | null = null;
  if (status === 206) {
    const cr = one(h['content-range']);
    const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(cr);
    if (!m) throw scError('SC_ERR_UPSTREAM', `${src}: 206 without a valid Content-Range (${cr.slice(0, 80)})`);
    [from, to] = [Number(m[1]), Number(m[2])];
    size = m[3] === '*' ? r.size : Number(m[3]);
    if (m[3] !== '*') announced(r, size!);
    if (from !== held) throw scError('SC_ERR_UPSTREAM', `${src}: asked for bytes from ${held}, got a range from ${from}`);
    if (to < from) throw scError('SC_ERR_UPSTREAM', `${src}: bad Content-Range ${cr.slice(0, 80)}`);
    if (len !== undefined && len !== to - from + 1) throw scError('SC_ERR_UPSTREAM', `${src}: Content-Length ${len} does not match Content-Range ${cr.slice(0, 80)}`);
  } else {
    size = len ?? r.size;
    if (len !== undefined) announced(r, len);
  }
  if (size === null || !Number.isSafeInteger(size)) throw scError('SC_ERR_UPSTREAM', `${src}: the answer gives no blob size`);
  if (to !== null && to >= size) throw scError('SC_ERR_UPSTREAM', `${src}: range ${from}-${to} is past the end of a ${size}-byte blob`);
  return { status, size, from, end: to ?? size - 1 };
}

/** Throws SC_ERR_SIZE_MISMATCH when an announced blob size contradicts the known one. */
function announced(r: RangeRequest, size: number): void {
  if (r.size !== null && size !== r.size) throw scError('SC_ERR_SIZE_MISMATCH', `${r.source}: blob is ${size} bytes, expected ${r.size}`, { size, expected: r.size });
}

function one(v: string | string[] | undefined): string {
  return Array.isArray(v) ? v.join(', ') : (v ?? '');
}

/** Any failure of an attempt as an ScError (see the last rule above). */
export function attemptError(err: unknown, source: string): ScError {
  if (isScError(err)) return err;
  const tls = tlsError(err, source);
  if (tls) return tls;
  const code = (err as { code?: unknown })?.code;
  if (code === 'ETIMEDOUT') return scError('SC_ERR_TIMEOUT', `${source}: ${describe(err)}`, undefined, err);
  // got wraps the errors it is destroyed with: keep their code.
  if (typeof code === 'string' && code in ERRORS) return scError(code as ErrorCode, (err as Error).message, undefined, err);
  return scError('SC_ERR_UPSTREAM', `${source}: ${describe(err)}`, undefined, err);
}
