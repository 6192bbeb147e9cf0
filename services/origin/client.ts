/**
 * Typed clients for the origin. `ReadClient` speaks the read API that origin and every stage
 * share (ARCHITECTURE.md, "HTTP read API"), so it works against either; `OriginClient` adds the
 * token-protected writes. Every failure is an ScError: error bodies keep their server-side
 * code (`fromErrorBody`), network failures are SC_ERR_UNAVAILABLE, timeouts SC_ERR_TIMEOUT.
 */
import { createReadStream } from 'node:fs';
import type { Readable } from 'node:stream';
import got, { type OptionsInit, type Response } from 'got';
import { type Digest, parseDigest } from '../../shared/digest.js';
import { fromErrorBody, isScError, ScError, scError } from '../../shared/errors.js';
import { type Manifest, manifestDigest, parseManifest } from '../../shared/manifest.js';
import { parseName, parseVersion } from '../../shared/names.js';
import type { BundleEntry, GcReport, RemovedManifest } from './store.js';
import { gotTls, tlsError } from '../../shared/tls.js';

export type { BundleEntry, GcReport, RemovedManifest };

/** `GET /v1/trusted-keys`: the release key ids whose signatures the origin accepts. */
export interface TrustedKeys {
  /** False when the origin was started without trust keys (then it accepts any signature). */
  enforced: boolean;
  keyIds: string[];
}

/** Default grace period of a garbage collection (`POST /v1/admin/gc`): blobs written in the last hour are kept. */
export const DEFAULT_GC_GRACE_SEC = 3600;

/** Response header that carries a manifest's content fingerprint (origin only). */
export const FINGERPRINT_HEADER = 'stagecoach-content-fingerprint';

/** Client options. */
export interface ClientOptions {
  /** Bearer token for writes (never logged, never part of an error). */
  token?: string;
  /** Deadline in ms for small JSON requests, and the idle limit for blob transfers. Default 30 000. */
  timeoutMs?: number;
  /** Retries for idempotent reads on network errors and 5xx. Default 1. */
  retries?: number;
}

/** The `/healthz` answer. */
export interface Health {
  ok: boolean;
  [k: string]: unknown;
}

/** A manifest with what the server told about it. */
export interface ManifestRecord {
  manifest: Manifest;
  /** sha256 of the manifest's canonical JSON, computed locally. */
  manifestDigest: Digest;
  /** Origin-side content fingerprint, when the server has one (origin only). */
  fingerprint?: Digest;
}

function parseBaseUrl(url: string): string {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw scError('SC_ERR_BAD_CONFIG', `not a URL: ${JSON.stringify(url.slice(0, 200))}`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw scError('SC_ERR_BAD_CONFIG', `expected an http(s) URL, got ${u.protocol}`);
  if (u.search || u.hash || u.username || u.password) throw scError('SC_ERR_BAD_CONFIG', 'a base URL has no query, fragment or credentials');
  return u.href.replace(/\/+$/, '');
}

/** Maps a got/network failure to an ScError (ScErrors pass through). */
function transportError(err: unknown, url: string): ScError {
  if (err instanceof ScError) return err;
  const tls = tlsError(err, url);
  if (tls) return tls;
  const e = err as { name?: string; code?: string; message?: string };
  if (e?.name === 'TimeoutError' || e?.code === 'ETIMEDOUT') return scError('SC_ERR_TIMEOUT', `${url}: timed out`, undefined, err);
  return scError('SC_ERR_UNAVAILABLE', `cannot reach ${url}: ${e?.code ?? e?.message ?? String(err)}`, undefined, err);
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/**
 * Reads from origin or a stage. Safe to share between concurrent callers.
 * Methods throw ScError (see the module comment).
 */
export class ReadClient {
  /** Base URL without a trailing slash. */
  readonly baseUrl: string;
  protected readonly opts: Required<Pick<ClientOptions, 'timeoutMs' | 'retries'>> & ClientOptions;

  constructor(baseUrl: string, opts: ClientOptions = {}) {
    this.baseUrl = parseBaseUrl(baseUrl);
    this.opts = { timeoutMs: 30_000, retries: 1, ...opts };
  }

  /** The URL of a blob (digest validated: SC_ERR_BAD_DIGEST). */
  blobUrl(digest: string): string {
    return `${this.baseUrl}/v1/blobs/${parseDigest(digest)}`;
  }

  /** The URL of a manifest (name/version validated). */
  manifestUrl(name: string, version: string): string {
    return `${this.baseUrl}/v1/bundles/${parseName(name)}/${parseVersion(version)}`;
  }

  /** Sends a small request and returns the response with a text body; >= 400 throws the server's error. */
  protected async request(url: string, o: OptionsInit & { method?: string } = {}): Promise<Response<string>> {
    const method = (o.method ?? 'GET').toUpperCase();
    const idempotent = method === 'GET' || method === 'HEAD';
    let res: Response<string>;
    try {
      res = (await got(url, { ...gotTls(),
        throwHttpErrors: false,
        followRedirect: false,
        decompress: true,
        retry: { limit: idempotent ? this.opts.retries : 0, methods: ['GET', 'HEAD'] },
        timeout: { request: this.opts.timeoutMs },
        ...o,
        responseType: 'text',
      } as OptionsInit)) as Response<string>;
    } catch (err) {
      throw transportError(err, url);
    }
    if (res.statusCode >= 400) throw fromErrorBody(res.statusCode, parseJson(res.body));
    return res;
  }

  /** `GET /healthz`. */
  async health(): Promise<Health> {
    const res = await this.request(`${this.baseUrl}/healthz`);
    const body = parseJson(res.body) as Health | undefined;
    if (!body || typeof body.ok !== 'boolean') throw scError('SC_ERR_UPSTREAM', `${this.baseUrl}/healthz: not a health answer`);
    return body;
  }

  /** `GET /metrics`: the Prometheus text. */
  async metricsText(): Promise<string> {
    return (await this.request(`${this.baseUrl}/metrics`)).body;
  }

  /** `GET /v1/bundles`. */
  async listBundles(): Promise<BundleEntry[]> {
    const res = await this.request(`${this.baseUrl}/v1/bundles`);
    const body = parseJson(res.body);
    if (!Array.isArray(body)) throw scError('SC_ERR_UPSTREAM', `${this.baseUrl}/v1/bundles: expected a JSON list`);
    return body as BundleEntry[];
  }

  /**
   * `GET /v1/bundles/<name>/<version>`, validated with parseManifest (SC_ERR_BAD_MANIFEST).
   * Signatures are the caller's job. A missing one throws SC_ERR_MANIFEST_NOT_FOUND.
   */
  async getManifest(name: string, version: string): Promise<Manifest> {
    return (await this.getManifestRecord(name, version)).manifest;
  }

  /** Like getManifest, with the manifest digest and the origin's content fingerprint if any. */
  async getManifestRecord(name: string, version: string): Promise<ManifestRecord> {
    const res = await this.request(this.manifestUrl(name, version));
    const manifest = parseManifest(parseJson(res.body));
    if (manifest.name !== name || manifest.version !== version) {
      throw scError('SC_ERR_BAD_MANIFEST', `asked for ${name}@${version}, got ${manifest.name}@${manifest.version}`);
    }
    const fp = res.headers[FINGERPRINT_HEADER];
    let fingerprint: Digest | undefined;
    if (typeof fp === 'string') {
      try {
        fingerprint = parseDigest(fp);
      } catch {
        fingerprint = undefined;
      }
    }
    return { manifest, manifestDigest: manifestDigest(manifest), ...(fingerprint ? { fingerprint } : {}) };
  }

  /** Like getManifestRecord, but null when the version does not exist. */
  async findManifest(name: string, version: string): Promise<ManifestRecord | null> {
    const r = await this.lookupManifest(name, version);
    return r === 'removed' ? null : r;
  }

  /**
   * Like findManifest, but tells a version the origin removed (`'removed'`: it is never
   * published again with other content) from one that never existed (null). A stage, or an
   * origin that keeps no record of removals, answers null for both.
   */
  async lookupManifest(name: string, version: string): Promise<ManifestRecord | 'removed' | null> {
    try {
      return await this.getManifestRecord(name, version);
    } catch (err) {
      if (isScError(err, 'SC_ERR_MANIFEST_NOT_FOUND')) return err.details?.removed === true ? 'removed' : null;
      if (isScError(err, 'SC_ERR_NOT_FOUND')) return null;
      throw err;
    }
  }

  /** `HEAD /v1/blobs/<digest>`: the blob's size. SC_ERR_BLOB_NOT_FOUND when absent. */
  async statBlob(digest: string): Promise<{ size: number }> {
    const url = this.blobUrl(digest);
    const res = await this.request(url, { method: 'HEAD' });
    const size = Number(res.headers['content-length']);
    if (!Number.isSafeInteger(size) || size < 0) throw scError('SC_ERR_UPSTREAM', `${url}: no Content-Length`);
    return { size };
  }

  /**
   * `GET /v1/blobs/<digest>` as a stream (optionally one inclusive byte range). Resolves once
   * the response headers arrived with 200/206; the bytes are not verified here (hash them).
   * `size` is the blob's total size when the server said it.
   */
  async openBlob(digest: string, range?: { start: number; end?: number }): Promise<{ stream: Readable; status: number; size?: number }> {
    const url = this.blobUrl(digest);
    const headers: Record<string, string> = {};
    if (range) headers.range = `bytes=${range.start}-${range.end ?? ''}`;
    const stream = got.stream(url, { ...gotTls(),
      headers,
      throwHttpErrors: false,
      followRedirect: false,
      decompress: false,
      retry: { limit: 0 },
      timeout: { connect: this.opts.timeoutMs, socket: this.opts.timeoutMs },
    });
    let res: { statusCode: number; headers: Record<string, string | string[] | undefined> };
    try {
      res = await new Promise((resolve, reject) => {
        stream.once('response', resolve);
        stream.once('error', reject);
      });
    } catch (err) {
      stream.destroy();
      throw transportError(err, url);
    }
    if (res.statusCode >= 400) {
      let text = '';
      try {
        for await (const c of stream) {
          text += String(c);
          if (text.length > 65536) break;
        }
      } catch {
        /* the error status is what matters */
      }
      stream.destroy();
      throw fromErrorBody(res.statusCode, parseJson(text));
    }
    let size: number | undefined;
    const cr = res.headers['content-range'];
    if (typeof cr === 'string' && /\/(\d+)$/.test(cr)) size = Number(/\/(\d+)$/.exec(cr)![1]);
    else if (res.statusCode === 200 && res.headers['content-length'] !== undefined) size = Number(res.headers['content-length']);
    return { stream, status: res.statusCode, ...(size !== undefined ? { size } : {}) };
  }
}

/** Upload progress: bytes sent so far and the total. */
export type ProgressFn = (sent: number, total: number) => void;

/** The origin client: the read API plus token-protected writes. */
export class OriginClient extends ReadClient {
  #auth(): Record<string, string> {
    return this.opts.token ? { authorization: `Bearer ${this.opts.token}` } : {};
  }

  /**
   * `PUT /v1/blobs/<digest>`, streaming `src` (a Readable or a file path) of `size` bytes.
   * With `skipIfPresent` (default: true for a path, false for a stream), a HEAD first skips
   * the upload when the origin already holds the blob (a skipped stream is destroyed).
   * Throws SC_ERR_DIGEST_MISMATCH / SC_ERR_SIZE_MISMATCH (nothing stored), SC_ERR_UNAUTHORIZED,
   * SC_ERR_FORBIDDEN, SC_ERR_UNAVAILABLE.
   */
  async putBlob(
    src: Readable | string,
    digest: string,
    size: number,
    opts: { onProgress?: ProgressFn; skipIfPresent?: boolean } = {},
  ): Promise<{ digest: Digest; size: number; created: boolean }> {
    const d = parseDigest(digest);
    const url = this.blobUrl(d);
    if (!Number.isSafeInteger(size) || size < 0) throw scError('SC_ERR_SIZE_MISMATCH', `bad size ${size}`);
    if (opts.skipIfPresent ?? typeof src === 'string') {
      const have = await this.statBlob(d).catch((err) => {
        if (isScError(err, 'SC_ERR_BLOB_NOT_FOUND') || isScError(err, 'SC_ERR_NOT_FOUND')) return null;
        throw err;
      });
      if (have && have.size === size) {
        if (typeof src !== 'string') src.destroy();
        opts.onProgress?.(size, size);
        return { digest: d, size, created: false };
      }
    }
    const body = typeof src === 'string' ? createReadStream(src, { highWaterMark: 1 << 20 }) : src;
    let res: Response<string>;
    try {
      const p = got.put(url, { ...gotTls(),
        body,
        headers: { ...this.#auth(), 'content-type': 'application/octet-stream', 'content-length': String(size) },
        throwHttpErrors: false,
        followRedirect: false,
        retry: { limit: 0 },
        timeout: { connect: this.opts.timeoutMs, socket: this.opts.timeoutMs },
        responseType: 'text',
      });
      if (opts.onProgress) {
        const cb = opts.onProgress;
        p.on('uploadProgress', (pr: { transferred: number }) => cb(pr.transferred, size));
      }
      res = (await p) as Response<string>;
    } catch (err) {
      body.destroy();
      throw transportError(err, url);
    }
    if (res.statusCode >= 400) throw fromErrorBody(res.statusCode, parseJson(res.body));
    const out = parseJson(res.body) as { created?: boolean; size?: number } | undefined;
    return { digest: d, size: out?.size ?? size, created: res.statusCode === 201 };
  }

  /**
   * `PUT /v1/bundles/<name>/<version>`. `created` is false when the identical manifest was
   * already there. Throws SC_ERR_VERSION_EXISTS (other content at that version),
   * SC_ERR_MISSING_BLOB, SC_ERR_SIZE_MISMATCH, SC_ERR_BAD_MANIFEST, SC_ERR_UNTRUSTED_KEY,
   * SC_ERR_BAD_SIGNATURE, SC_ERR_UNAUTHORIZED, SC_ERR_FORBIDDEN.
   */
  async putManifest(m: Manifest, opts: { fingerprint?: Digest } = {}): Promise<{ manifestDigest: Digest; created: boolean }> {
    const url = this.manifestUrl(m.name, m.version);
    const headers: Record<string, string> = { ...this.#auth(), 'content-type': 'application/json' };
    if (opts.fingerprint) headers[FINGERPRINT_HEADER] = parseDigest(opts.fingerprint);
    const res = await this.request(url, { method: 'PUT', body: JSON.stringify(m), headers });
    const out = parseJson(res.body) as { manifestDigest?: string } | undefined;
    return { manifestDigest: parseDigest(out?.manifestDigest ?? manifestDigest(m)), created: res.statusCode === 201 };
  }

  /** `GET /v1/trusted-keys`. SC_ERR_BAD_PATH from an origin that predates the route. */
  async trustedKeys(): Promise<TrustedKeys> {
    const res = await this.request(`${this.baseUrl}/v1/trusted-keys`);
    const body = parseJson(res.body) as Partial<TrustedKeys> | undefined;
    if (!body || typeof body.enforced !== 'boolean' || !Array.isArray(body.keyIds)) {
      throw scError('SC_ERR_UPSTREAM', `${this.baseUrl}/v1/trusted-keys: not a trusted-key list`);
    }
    return { enforced: body.enforced, keyIds: body.keyIds.map(String) };
  }

  /**
   * Resolves when the origin would accept a manifest signed by `keyId`; throws
   * SC_ERR_UNTRUSTED_KEY (with a hint) when it would not. An origin without the trusted-key
   * route is not asked (its manifest PUT still checks the signature).
   */
  async checkSigningKey(keyId: string): Promise<void> {
    let t: TrustedKeys;
    try {
      t = await this.trustedKeys();
    } catch (err) {
      if (isScError(err, 'SC_ERR_BAD_PATH') || isScError(err, 'SC_ERR_NOT_FOUND')) return;
      throw err;
    }
    if (!t.enforced || t.keyIds.includes(keyId)) return;
    throw scError('SC_ERR_UNTRUSTED_KEY', `the origin ${this.baseUrl} does not trust signing key ${keyId}; nothing was uploaded`, {
      keyId,
      trusted: t.keyIds,
    }).withHint(`sign with a key the origin trusts (${t.keyIds.join(', ')}), or add this key's public half to the origin's --trust-key`);
  }

  /**
   * `DELETE /v1/admin/bundles/<name>/<version>` (token): removes the manifest; its blob stays
   * until a garbage collection. Throws SC_ERR_MANIFEST_NOT_FOUND, SC_ERR_UNAUTHORIZED, SC_ERR_FORBIDDEN.
   */
  async removeManifest(name: string, version: string): Promise<RemovedManifest> {
    const url = `${this.baseUrl}/v1/admin/bundles/${parseName(name)}/${parseVersion(version)}`;
    const res = await this.request(url, { method: 'DELETE', headers: this.#auth() });
    const out = parseJson(res.body) as RemovedManifest | undefined;
    if (!out || typeof out.manifestDigest !== 'string') throw scError('SC_ERR_UPSTREAM', `${url}: not a removal answer`);
    return out;
  }

  /**
   * `POST /v1/admin/gc` (token): one mark-and-sweep collection on the origin. `graceSec`
   * defaults to the origin's (one hour). Waits for the collection to end.
   */
  async collectGarbage(opts: { graceSec?: number; dryRun?: boolean } = {}): Promise<GcReport & { graceSec: number }> {
    const url = `${this.baseUrl}/v1/admin/gc`;
    const body: Record<string, unknown> = {};
    if (opts.graceSec !== undefined) body.graceSec = opts.graceSec;
    if (opts.dryRun) body.dryRun = true;
    const res = await this.request(url, {
      method: 'POST',
      body: JSON.stringify(body),
      headers: { ...this.#auth(), 'content-type': 'application/json' },
      timeout: { request: Math.max(this.opts.timeoutMs, 600_000) },
    });
    const out = parseJson(res.body) as (GcReport & { graceSec: number }) | undefined;
    if (!out || typeof out.removed?.bytes !== 'number') throw scError('SC_ERR_UPSTREAM', `${url}: not a collection report`);
    return out;
  }
}
