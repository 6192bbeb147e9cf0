/**
 * A tiny read-API server (same paths as origin and stage) with fault injection, for the fetch
 * and get tests: a real HTTP server on 127.0.0.1 port 0 that can delay or fail /healthz, cut or
 * stall a blob body after N bytes, ignore Range, and serve any file under any digest (tampering).
 */
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { createServer, type ServerResponse } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import express from 'express';
import { type Digest, digestFile, parseDigest, sha256Of } from '../../shared/digest.js';
import { scError } from '../../shared/errors.js';
import { errorHandler, type Listening, listen } from '../../shared/http.js';
import { sendFileRange, startBlobReply } from '../../shared/http/read-api.js';
import { silentLogger } from '../../shared/log.js';
import { type Manifest, signManifest, type UnsignedManifest } from '../../shared/manifest.js';

/** Behaviour knobs; change them between requests. */
export interface Faults {
  /** Delay before answering /healthz, ms. */
  healthDelayMs?: number;
  /** Status for /healthz (default 200 with {"ok":true}). */
  healthStatus?: number;
  /** Send this many body bytes per blob response, then drop the connection. */
  cutAfter?: number;
  /** Send this many body bytes per blob response, then hang (until the server closes). */
  stallAfter?: number;
  /** Answer every blob request with the full 200, ignoring Range. */
  ignoreRange?: boolean;
  /**
   * Send this many body bytes per blob response, then freeze like a link gone silent without a
   * FIN: that response stalls, and every later request (/healthz included) is accepted and never
   * answered, until the faults change or the server closes. Blob requests are still recorded.
   */
  freezeAfter?: number;
  /** Send the blob body in pieces of `bytes`, one every `everyMs` (a busy source: slow, but alive). */
  trickle?: { bytes: number; everyMs: number };
}

export interface ReadServer extends Listening {
  faults: Faults;
  /** True once a `freezeAfter` response reached its limit (cleared when `faults` is replaced). */
  readonly frozen: boolean;
  /** Every blob request seen: method and Range header. */
  blobRequests: { method: string; range?: string }[];
  /** Serves the file at `path` as blob `digest` (its real digest unless given: tampering). */
  addBlob(path: string, digest?: Digest): Promise<Digest>;
  /** Serves `m` at /v1/bundles/<name>/<version> (any JSON, unchecked). */
  setManifest(name: string, version: string, m: unknown): void;
}

/** Starts a read-API server on 127.0.0.1:0. */
export async function startReadServer(faults: Faults = {}): Promise<ReadServer> {
  const blobs = new Map<Digest, { path: string; size: number }>();
  const manifests = new Map<string, unknown>();
  const blobRequests: ReadServer['blobRequests'] = [];
  const app = express();
  const state = { faults, frozen: false };

  app.get('/healthz', async (req, res) => {
    const f = state.faults;
    if (state.frozen) return; // never answered; the client's deadline or close() ends it
    if (f.healthDelayMs) {
      // Wait, unless the client goes away first (so no timer outlives the test).
      await new Promise<void>((r) => {
        const t = setTimeout(r, f.healthDelayMs);
        res.once('close', () => {
          clearTimeout(t);
          r();
        });
      });
      if (res.destroyed || req.destroyed) return;
    }
    const status = f.healthStatus ?? 200;
    res.status(status).json({ ok: status === 200 });
  });
  app.get('/v1/bundles/:name/:version', (req, res) => {
    const m = manifests.get(`${req.params.name}@${req.params.version}`);
    if (m === undefined) throw scError('SC_ERR_MANIFEST_NOT_FOUND');
    res.json(m);
  });
  app.get('/v1/blobs/:ref', async (req, res) => {
    const f = state.faults;
    blobRequests.push({ method: req.method, range: req.headers.range });
    if (state.frozen) return;
    const digest = parseDigest(req.params.ref);
    const b = blobs.get(digest);
    if (!b) throw scError('SC_ERR_BLOB_NOT_FOUND');
    if (f.ignoreRange) delete req.headers.range;
    const limit = f.cutAfter ?? f.stallAfter ?? f.freezeAfter;
    const r = startBlobReply(req, res, digest, b.size);
    if (r === 'not-modified') return;
    if (limit === undefined && !f.trickle) {
      if (req.method === 'HEAD') res.end();
      else await sendFileRange(res, b.path, r.start, r.end);
      return;
    }
    const end = limit === undefined ? r.end : Math.min(r.end, r.start + limit - 1);
    if (end >= r.start) {
      const piece = f.trickle ? { highWaterMark: f.trickle.bytes } : {};
      let first = true;
      for await (const chunk of createReadStream(b.path, { start: r.start, end, ...piece })) {
        if (f.trickle && !first && !(await pause(f.trickle.everyMs, res))) return;
        first = false;
        await new Promise<void>((resolve, reject) => res.write(chunk, (err) => (err ? reject(err) : resolve())));
      }
    }
    if (end >= r.end) res.end();
    else if (f.cutAfter !== undefined) res.socket?.destroy();
    else if (f.freezeAfter !== undefined) state.frozen = true;
    // else: stall with the response open; close() ends it.
  });
  app.use(errorHandler(silentLogger));

  const l = await listen(createServer(app), '127.0.0.1', 0);
  return {
    ...l,
    get faults() {
      return state.faults;
    },
    set faults(v: Faults) {
      state.faults = v;
      state.frozen = false;
    },
    get frozen() {
      return state.frozen;
    },
    blobRequests,
    async addBlob(path, digest) {
      const { size } = await stat(path);
      const d = digest ?? (await digestFile(path)).digest;
      blobs.set(d, { path, size });
      return d;
    },
    setManifest(name, version, m) {
      manifests.set(`${name}@${version}`, m);
    },
  };
}

/** Waits `ms`, or until `res` closes; true when the wait ran out with `res` still open. */
function pause(ms: number, res: ServerResponse): Promise<boolean> {
  return new Promise((resolve) => {
    const t = setTimeout(() => {
      res.off('close', onClose);
      resolve(!res.destroyed);
    }, ms);
    const onClose = () => {
      clearTimeout(t);
      resolve(false);
    };
    res.once('close', onClose);
  });
}

/** A temp dir, removed by `cleanup`. */
export async function tempDir(prefix = 'sc-fetch-'): Promise<{ dir: string; cleanup(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

/** Deterministic pseudo-random bytes (xorshift), so failures are reproducible. */
export function pseudoRandom(size: number, seed = 1): Buffer {
  const b = Buffer.allocUnsafe(size);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < size; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

/** Writes `data` to `path` and returns its digest. */
export async function writeBlob(path: string, data: Buffer): Promise<Digest> {
  await writeFile(path, data);
  return sha256Of(data);
}

/** A fresh ed25519 key pair plus its PEM public key. */
export function releaseKey(): { privateKey: KeyObject; publicKey: KeyObject; publicPem: string } {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  return { privateKey, publicKey, publicPem: publicKey.export({ type: 'spki', format: 'pem' }).toString() };
}

/** A signed manifest for a blob. */
export function makeManifest(
  key: KeyObject,
  blob: { digest: Digest; size: number; compression?: 'zstd' | 'gzip' | 'none'; encryption?: 'age' | 'none' },
  name = 'rescue-os',
  version = '1.0.0',
): Manifest {
  const m: UnsignedManifest = {
    schema: 1,
    name,
    version,
    role: 'base',
    os: { id: 'debian', version: '12', family: 'linux', netFormat: 'ifupdown' },
    blob: { digest: blob.digest, size: blob.size, compression: blob.compression ?? 'none', encryption: blob.encryption ?? 'none' },
    publishedAt: new Date().toISOString(),
  };
  return signManifest(m, key);
}

/** A free port with nothing listening on it (bound, then closed). */
export async function deadPort(): Promise<number> {
  const l = await listen(createServer(), '127.0.0.1', 0);
  const port = l.port;
  await l.close();
  return port;
}

/** A sleep that returns at once and counts its calls (a fetch's backoffs). */
export function countingSleep(): { sleep: () => Promise<void>; readonly calls: number } {
  let calls = 0;
  return {
    sleep: async () => {
      calls++;
    },
    get calls() {
      return calls;
    },
  };
}

/** Where a recorded request's `Range: bytes=N-` starts (0 without one). */
export function rangeStart(r: { range?: string }): number {
  const m = /^bytes=(\d+)-$/.exec(r.range ?? '');
  return m ? Number(m[1]) : 0;
}
