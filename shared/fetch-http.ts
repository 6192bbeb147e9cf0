/**
 * Request helpers shared by the host-side fetch modules (shared/fetch.ts and its fetch-*.ts
 * parts): a got stream's response, bounded bodies, small GETs, error bodies, and aborts.
 */
import type { Readable } from 'node:stream';
import got, { type Request as GotRequest } from 'got';
import { fromErrorBody, isScError, ScError, scError } from './errors.js';
import { describeError as describe } from './fetch-sources.js';
import { gotTls, tlsError } from './tls.js';

/** Largest manifest or error body read from a source, in bytes. */
const MAX_SMALL_BODY = 1 << 20;

/** Resolves with the response head of `req`, or rejects with the error it emits first. */
export function responseOf(req: GotRequest): Promise<{ statusCode: number; headers: Record<string, string | string[] | undefined> }> {
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
export async function readBounded(src: Readable, max: number): Promise<Buffer> {
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
export async function getSmall(url: string, timeoutMs: number, signal?: AbortSignal): Promise<{ status: number; data: Buffer }> {
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

/** The ScError that an error answer's JSON body carries (fromErrorBody), its message prefixed with `source` when given. */
export function errorFromBody(status: number, data: Buffer, source?: string): ScError {
  let body: unknown;
  try {
    body = JSON.parse(data.toString('utf8'));
  } catch {
    body = undefined;
  }
  const e = fromErrorBody(status, body);
  return source ? scError(e.code, `${source}: ${e.message}`, e.details) : e;
}

/** The error for an aborted `signal`: its ScError reason, SC_ERR_TIMEOUT for AbortSignal.timeout, else SC_ERR_UNAVAILABLE. */
export function abortError(signal: AbortSignal): ScError {
  const r = signal.reason as { name?: string } | undefined;
  if (r instanceof ScError) return r;
  if (r?.name === 'TimeoutError') return scError('SC_ERR_TIMEOUT', 'fetch timed out');
  return scError('SC_ERR_UNAVAILABLE', 'fetch aborted');
}

/** Throws abortError(signal) when `signal` has aborted. */
export function throwIfAborted(signal?: AbortSignal): void {
  if (signal?.aborted) throw abortError(signal);
}

/** Waits `ms`; rejects with abortError(signal) when `signal` aborts first. */
export function abortableSleep(ms: number, signal?: AbortSignal): Promise<void> {
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
