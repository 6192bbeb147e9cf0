/**
 * Worker thread of unpack-file.ts: reads the STREAM payload of an age + zstd bundle file, decrypts
 * it chunk by chunk and decompresses it, and posts the tar bytes to the parent in 1 MiB
 * transferred buffers, at most `MAX_INFLIGHT` unacknowledged at a time (backpressure).
 *
 * Two options make it the middle of an overlapped pipeline:
 * - `hash`: the sha256 of the file's first `size` bytes (header included) is computed from the
 *   very bytes it decrypts (on a third thread that shares the read buffers, see Hasher), and
 *   sent with the end message, so the parent checks the digest of exactly what was unpacked
 *   without a second pass over the file;
 * - `follow`: the file is still being written (a download or a copy); the worker reads only below
 *   the mark the parent sends (`{avail: n}`), and waits for it to rise.
 *
 * Plain JavaScript on purpose: it needs no TypeScript loader, so it starts in ~70 ms instead of
 * ~700 ms under tsx. It imports nothing of ours. The parent (unpack.ts) has already parsed the
 * header and checked its MAC with shared/bundle/age.ts (`openAgePayload`) and hands over the
 * payload key and offset; this file applies the same STREAM rules as age.ts's decryptStream
 * (64 KiB chunks, 11-byte big-endian counter + last-chunk flag nonces, the last chunk is the one
 * that ends the file, an empty last chunk only when it is the only one), and releases a
 * chunk's plaintext only after its tag verified. The interop and unit tests hold both to the
 * same behaviour.
 *
 * workerData: `{fd, size, payloadKey (Uint8Array), payloadOffset, hash?, follow?, avail?}`: `fd` is
 * the parent's open file (threads share the descriptor table; the parent closes it).
 * Messages out: `{chunk: ArrayBuffer, decrypted}` (transferred; `decrypted` = payload plaintext
 * bytes authenticated since the previous message), `{end: true, decrypted, digest?}` (digest
 * `sha256:<hex>` with `hash`), `{error: {code, message}}` with code SC_ERR_DECRYPT,
 * SC_ERR_BAD_ARCHIVE or SC_ERR_INTERNAL.
 * Messages in: `{ack: n}`: n chunks were consumed; `{avail: n}` (follow): the first n bytes of the
 * file are written; `{back: ArrayBuffer}` (transferred): a posted buffer the parent is done with,
 * filled again instead of a new one. Without them every posted MiB is new memory for both
 * threads, and V8 runs a full collection for each 64 MiB of it (about 30 for a 1.7 GiB tar).
 */
import { createDecipheriv } from 'node:crypto';
import { fstatSync, readSync } from 'node:fs';
import { createRequire } from 'node:module';
import { parentPort, Worker, workerData } from 'node:worker_threads';

const binding = createRequire(import.meta.url)('zstd-napi/binding');

const CHUNK = 64 * 1024;
const TAG = 16;
const CT_CHUNK = CHUNK + TAG;
/** Ciphertext chunks read per read(2): 4 MiB. */
const READ_CHUNKS = 64;
/** Size of a posted buffer. */
const OUT_SIZE = 1 << 20;
/** Posted buffers the parent has not acknowledged yet, at most. */
const MAX_INFLIGHT = 8;
/** Buffers handed back by the parent (`{back}`) kept for reuse, at most. */
const MAX_SPARE = MAX_INFLIGHT + 4;
/** Read buffers with `hash`: the hashing thread may be this many reads behind, less one. */
const HASH_BUFFERS = 3;

/**
 * The hashing thread (`hash`): sha256 of the read buffers, in the order they are handed over,
 * off this thread, which decrypts and decompresses. Messages in: `{i, len}` (hash the first
 * `len` bytes of shared buffer `i`), `{digest: true}`; out: `{ack: i}` (buffer `i` may be
 * refilled), `{digest}`.
 */
const HASHER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const h = createHash('sha256');
const views = workerData.buffers.map((b) => new Uint8Array(b));
parentPort.on('message', (m) => {
  if (m.digest) parentPort.postMessage({ digest: 'sha256:' + h.digest('hex') });
  else {
    h.update(views[m.i].subarray(0, m.len));
    parentPort.postMessage({ ack: m.i });
  }
});
`;

class Failure extends Error {
  /** @param {string} code @param {string} message */
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

const port = /** @type {import('node:worker_threads').MessagePort} */ (parentPort);
const { fd, size, payloadKey, payloadOffset, hash, follow } = workerData;
const key = Buffer.from(payloadKey);

/**
 * sha256 of the bytes read, on a thread of its own (HASHER_SOURCE): on two cores, hashing here
 * made this thread the pipeline's bottleneck whenever the extractor was fast (large files). The
 * hash covers exactly the bytes decrypted: each read buffer is shared with the hashing thread,
 * handed over in read order, and refilled only once that thread has hashed it.
 */
class Hasher {
  /** @param {number} size */
  constructor(size) {
    /** @type {Buffer[]} */
    this.buffers = Array.from({ length: HASH_BUFFERS }, () => Buffer.from(new SharedArrayBuffer(size)));
    /** @type {Set<number>} buffers handed over and not hashed yet */
    this.busy = new Set();
    /** @type {(() => void) | null} */
    this.wake = null;
    /** @type {((d: string) => void) | null} */
    this.onDigest = null;
    /** @type {Error | null} */
    this.failed = null;
    this.thread = new Worker(HASHER_SOURCE, { eval: true, execArgv: [], workerData: { buffers: this.buffers.map((b) => b.buffer) } });
    this.thread.on('message', (m) => {
      if (typeof m.ack === 'number') this.busy.delete(m.ack);
      else if (typeof m.digest === 'string') this.onDigest?.(m.digest);
      this.#wakeUp();
    });
    const fail = (/** @type {Error} */ err) => {
      this.failed ??= new Failure('SC_ERR_INTERNAL', `hashing thread: ${err.message}`);
      this.#wakeUp();
    };
    this.thread.once('error', fail);
    this.thread.once('exit', (code) => fail(new Error(`exited (${code})`)));
  }

  #wakeUp() {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  /** Resolves with buffer `i` once the hashing thread is done with it. @param {number} i */
  async take(i) {
    while (this.busy.has(i)) {
      if (this.failed) throw this.failed;
      await new Promise((r) => (this.wake = r));
    }
    return this.buffers[i];
  }

  /** Hands over the first `len` bytes of buffer `i`. @param {number} i @param {number} len */
  update(i, len) {
    this.busy.add(i);
    this.thread.postMessage({ i, len });
  }

  /** The digest of everything handed over; the thread is stopped. */
  async digest() {
    /** @type {string | null} */
    let d = null;
    this.onDigest = (digest) => {
      d = digest;
    };
    this.thread.postMessage({ digest: true });
    while (d === null) {
      if (this.failed) throw this.failed;
      await new Promise((r) => (this.wake = r));
    }
    this.thread.removeAllListeners('exit');
    await this.thread.terminate();
    return d;
  }
}

let inflight = 0;
/** @type {(() => void) | null} */
let wake = null;
/** Bytes of the file that may be read: all of it, or (follow) what the parent says is written. */
let avail = follow ? (workerData.avail ?? 0) : Number.POSITIVE_INFINITY;
/** @type {(() => void) | null} */
let availWake = null;
/** @type {ArrayBuffer[]} posted buffers handed back, to be filled again */
const spare = [];
port.on('message', (m) => {
  if (m?.back instanceof ArrayBuffer && m.back.byteLength === OUT_SIZE && spare.length < MAX_SPARE) spare.push(m.back);
  if (typeof m?.ack === 'number') {
    inflight -= m.ack;
    const w = wake;
    wake = null;
    w?.();
  }
  if (typeof m?.avail === 'number') {
    avail = m.avail;
    const w = availWake;
    availWake = null;
    w?.();
  }
});

/** Resolves once the first `n` bytes of the file may be read. @param {number} n */
async function readable(n) {
  while (avail < n) await new Promise((r) => (availWake = r));
}

/** @type {Hasher | null} */
let hasher = null;
/** @type {Buffer} */
let plainBuf;
/** Reads so far: with `hash`, read `n` goes into the hasher's buffer n % HASH_BUFFERS. */
let reads = 0;

/**
 * Reads exactly `want` bytes at `pos` into a read buffer, which it returns (hashed, with `hash`);
 * a file that ends first is a truncated payload. The buffer is the caller's until the next call.
 * @param {number} want @param {number} pos
 */
async function readAt(want, pos) {
  const i = reads++ % HASH_BUFFERS;
  const buf = hasher ? await hasher.take(i) : plainBuf;
  await readable(pos + want);
  let got = 0;
  while (got < want) {
    const n = readSync(fd, buf, got, want - got, pos + got);
    if (n === 0) throw new Failure('SC_ERR_DECRYPT', 'age payload truncated while reading');
    got += n;
  }
  hasher?.update(i, want);
  return buf;
}

let out = Buffer.allocUnsafeSlow(OUT_SIZE);
let fill = 0;
let decrypted = 0;

async function post() {
  if (inflight >= MAX_INFLIGHT) await new Promise((r) => (wake = r));
  const ab = out.buffer;
  const msg = { chunk: fill === OUT_SIZE ? ab : ab.slice(0, fill), decrypted };
  decrypted = 0;
  inflight++;
  port.postMessage(msg, [msg.chunk]);
  const back = spare.pop();
  out = back ? Buffer.from(back) : Buffer.allocUnsafeSlow(OUT_SIZE);
  fill = 0;
}

const nonce = Buffer.alloc(12);
/** @param {number} counter @param {boolean} last */
function setNonce(counter, last) {
  nonce.writeUIntBE(counter, 5, 6);
  nonce[11] = last ? 1 : 0;
}

/**
 * Opens one sealed chunk; throws SC_ERR_DECRYPT when its tag does not verify.
 * @param {Buffer} box @param {number} counter @param {boolean} last
 */
function open(box, counter, last) {
  if (box.length < TAG) throw new Failure('SC_ERR_DECRYPT', `age payload chunk ${counter} failed authentication (tampered or truncated)`);
  setNonce(counter, last);
  const d = createDecipheriv('chacha20-poly1305', key, nonce, { authTagLength: TAG });
  d.setAuthTag(box.subarray(box.length - TAG));
  const pt = d.update(box.subarray(0, box.length - TAG));
  try {
    d.final();
  } catch {
    throw new Failure('SC_ERR_DECRYPT', last ? `age payload chunk ${counter} failed authentication (tampered or truncated)` : `age payload chunk ${counter} failed authentication`);
  }
  return pt;
}

const dctx = new binding.DCtx();
let inFrame = false;

/** Decompresses `src` into the output buffer, posting every full one. @param {Buffer} src */
async function decompress(src) {
  let rest = src;
  for (;;) {
    let ret;
    let produced;
    let consumed;
    try {
      [ret, produced, consumed] = dctx.decompressStream(out.subarray(fill), rest);
    } catch (err) {
      throw new Failure('SC_ERR_BAD_ARCHIVE', `zstd: ${err instanceof Error ? err.message : String(err)}`);
    }
    fill += produced;
    rest = rest.subarray(consumed);
    inFrame = ret !== 0;
    if (fill === OUT_SIZE) await post();
    else if (rest.length === 0) return;
  }
}

async function run() {
  // A file being written is as long as it will be; a finished one may be shorter (truncated).
  const length = (follow ? size : Math.min(fstatSync(fd).size, size)) - payloadOffset;
  if (length < TAG) throw new Failure('SC_ERR_DECRYPT', 'age payload truncated');
  const chunks = Math.max(1, Math.ceil(length / CT_CHUNK));
  const readSize = READ_CHUNKS * CT_CHUNK;
  if (hash) hasher = new Hasher(readSize);
  else plainBuf = Buffer.allocUnsafeSlow(readSize);
  if (hasher) await readAt(payloadOffset, 0);
  for (let first = 0; first < chunks; first += READ_CHUNKS) {
    const pos = first * CT_CHUNK;
    const want = Math.min(readSize, length - pos);
    const buf = await readAt(want, payloadOffset + pos);
    for (let off = 0, i = first; off < want; off += CT_CHUNK, i++) {
      const last = i === chunks - 1;
      const pt = open(buf.subarray(off, Math.min(off + CT_CHUNK, want)), i, last);
      if (last && pt.length === 0 && i > 0) throw new Failure('SC_ERR_DECRYPT', 'age payload ends with an empty chunk');
      decrypted += pt.length;
      await decompress(pt);
    }
  }
  if (inFrame) throw new Failure('SC_ERR_BAD_ARCHIVE', 'zstd: stream ended in the middle of a frame');
  if (fill > 0) await post();
  port.postMessage({ end: true, decrypted, ...(hasher ? { digest: await hasher.digest() } : {}) });
}

run().catch((err) => {
  const code = err instanceof Failure ? err.code : 'SC_ERR_INTERNAL';
  port.postMessage({ error: { code, message: err instanceof Error ? err.message : String(err) } });
});
