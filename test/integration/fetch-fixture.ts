/**
 * The fetch and get tests' view of the fault-injecting upstream (test/helpers/fault-upstream.ts):
 * `startReadServer(faults)` with faults as one object of knobs (delay or fail /healthz, cut,
 * stall or freeze a blob body after N bytes, trickle it, ignore Range) and blobs served from
 * files under any digest (tampering); plus the small fixtures those tests share.
 */
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type Digest, sha256Of } from '../../shared/digest.js';
import { type Listening, listen } from '../../shared/http.js';
import { type Manifest, signManifest, type UnsignedManifest } from '../../shared/manifest.js';
import { type BlobRequest, type Fault, startFaultUpstream } from '../helpers/fault-upstream.js';

/** Behaviour knobs; replace them between requests (`server.faults = {...}`). Each is a standing `Fault`. */
export interface Faults {
  /** Delay before answering /healthz, ms (`health-delay`). */
  healthDelayMs?: number;
  /** Status for /healthz (default 200 with {"ok":true}) (`health-status`). */
  healthStatus?: number;
  /** Send this many body bytes per blob response, then drop the connection (`cut`). */
  cutAfter?: number;
  /** Send this many body bytes per blob response, then hang (until the server closes) (`stall`). */
  stallAfter?: number;
  /** Answer every blob request with the full 200, ignoring Range (`ignore-range`). */
  ignoreRange?: boolean;
  /**
   * Send this many body bytes per blob response, then freeze like a link gone silent without a
   * FIN: that response stalls, and every later request (/healthz included) is accepted and never
   * answered, until the faults change or the server closes. Blob requests are still recorded (`freeze`).
   */
  freezeAfter?: number;
  /** Send the blob body in pieces of `bytes`, one every `everyMs` (a busy source: slow, but alive) (`trickle`). */
  trickle?: { bytes: number; everyMs: number };
}

export interface ReadServer extends Listening {
  faults: Faults;
  /** True once a `freezeAfter` response reached its limit (cleared when `faults` is replaced). */
  readonly frozen: boolean;
  /** Every blob request seen: method and Range header (and more, see `BlobRequest`). */
  blobRequests: BlobRequest[];
  /** Serves the file at `path` as blob `digest` (its real digest unless given: tampering). */
  addBlob(path: string, digest?: Digest): Promise<Digest>;
  /** Serves `m` at /v1/bundles/<name>/<version> (any JSON, unchecked). */
  setManifest(name: string, version: string, m: unknown): void;
}

/** The standing faults `f` stands for (a body limit: cut before stall before freeze). */
function toFaults(f: Faults): Fault[] {
  const out: Fault[] = [];
  if (f.healthDelayMs) out.push({ kind: 'health-delay', ms: f.healthDelayMs });
  if (f.healthStatus !== undefined) out.push({ kind: 'health-status', status: f.healthStatus });
  if (f.cutAfter !== undefined) out.push({ kind: 'cut', afterBytes: f.cutAfter });
  if (f.stallAfter !== undefined) out.push({ kind: 'stall', afterBytes: f.stallAfter });
  if (f.freezeAfter !== undefined) out.push({ kind: 'freeze', afterBytes: f.freezeAfter });
  if (f.ignoreRange) out.push({ kind: 'ignore-range' });
  if (f.trickle) out.push({ kind: 'trickle', ...f.trickle });
  return out;
}

/** Starts a read-API server on 127.0.0.1:0. */
export async function startReadServer(faults: Faults = {}): Promise<ReadServer> {
  const up = await startFaultUpstream({ faults: toFaults(faults) });
  let current = faults;
  return {
    server: up.server,
    url: up.url,
    port: up.port,
    close: up.close,
    get faults() {
      return current;
    },
    set faults(v: Faults) {
      current = v;
      up.setFaults(toFaults(v));
    },
    get frozen() {
      return up.frozen;
    },
    blobRequests: up.requests,
    addBlob: (path, digest) => up.addBlobFile(path, digest),
    setManifest: up.setManifest,
  };
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
