/**
 * Sending blob bodies: from a stream (`sendStream`) or from a complete file at offsets
 * (`sendFileRange`), through bounded, reused read buffers (`ReadBuffer`, one arena per process)
 * and a writer that waits for the socket (`ChunkWriter`). Origin and stage answer blobs with them
 * (shared/http/read-api.ts `OpenBlob.send`); a stage's fills read behind their edge through the
 * same buffers (services/stage/fill-stream.ts).
 */
import { type FileHandle, open } from 'node:fs/promises';
import type { ServerResponse } from 'node:http';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { scError } from '../errors.js';

/**
 * Streams `open()` into `res` and ends it, counting bytes. Before the first byte a failure is
 * thrown (the error handler answers it); after, `res` is destroyed. Resolves with the bytes written.
 */
export async function sendStream(res: ServerResponse, open: () => Readable | Promise<Readable>, onBytes?: (n: number) => void): Promise<number> {
  let sent = 0;
  try {
    const src = await open();
    src.on('data', (c: Buffer | string) => {
      sent += c.length;
      onBytes?.(c.length);
    });
    await pipeline(src, res);
  } catch (err) {
    if (!res.headersSent) throw err;
    res.destroy();
  }
  return sent;
}

/**
 * Memory for blob bodies: every reader (a response being sent from a file) reads into one
 * buffer of its own, reused chunk after chunk, and sends it only once the socket took the
 * previous one. The buffer is READ_MAX while few readers share the process and halves as more
 * do, so that all of them together hold about READ_BUDGET (never below READ_MIN each): peak
 * memory stays flat in object size, and in client count up to READ_BUDGET / READ_MIN readers.
 * Large chunks keep the CPU per byte low (fewer reads, writes and wake-ups per GiB).
 *
 * The buffers are pieces of one arena of READ_BUDGET bytes (ReadArena), not buffers of their
 * own: a reader's buffer is resized every time the number of readers crosses a power of two,
 * and a dropped buffer of its own stayed in memory until a major GC (up to 45 MiB of them at a
 * time with 100 readers, measured). Past READ_BUDGET / READ_MIN readers, or when the arena is
 * too cut up for a piece, a reader gets a READ_MIN buffer of its own.
 */
const READ_MAX = 1 << 20;
const READ_MIN = 64 << 10;
/** The arena's size: 8 MiB (16 MiB cost the stage 8 MiB of peak RSS for no measurable CPU per GiB; README). */
export const READ_BUDGET = 8 << 20;
const PAGE = 4096;
/** Piece sizes: READ_MIN << order, for order 0 to TOP (READ_MAX). */
const TOP = Math.log2(READ_MAX / READ_MIN);
let activeReaders = 0;

/** Bytes of the read buffer of one reader while `readers` readers are active. */
export function readChunkBytes(readers: number): number {
  let n = READ_MAX;
  while (n > READ_MIN && n * readers > READ_BUDGET) n >>= 1;
  return n;
}

/**
 * READ_BUDGET bytes, allocated at the first read and kept for the life of the process, cut into
 * power-of-two pieces from READ_MIN to READ_MAX (a buddy allocator: a piece is split in halves
 * to make a smaller one, and joins its free other half again when given back).
 */
class ReadArena {
  #mem: Buffer | null = null;
  /** Offsets of the free pieces of each order. */
  readonly #free: Set<number>[] = Array.from({ length: TOP + 1 }, () => new Set<number>());

  /** A piece of `bytes` (a power of two, READ_MIN to READ_MAX), or null when none is free. */
  take(bytes: number): Buffer | null {
    if (!this.#mem) {
      // Pieces start half a page into the allocation. A large allocation begins 16 bytes past a
      // page boundary (glibc's mmap chunks), so pieces there sat 16 bytes (mod 4 KiB) from the
      // page-cache pages copied into them: the kernel's copy_to_user ran into 4K aliasing and
      // the warm CPU per GiB went from 0.7 to 1.1 s (perf: _copy_to_iter 15% -> 49%).
      this.#mem = Buffer.allocUnsafeSlow(READ_BUDGET + PAGE).subarray(PAGE / 2, PAGE / 2 + READ_BUDGET);
      for (let off = 0; off < READ_BUDGET; off += READ_MAX) this.#free[TOP].add(off);
    }
    const k = Math.log2(bytes / READ_MIN);
    let j = k;
    while (j <= TOP && this.#free[j].size === 0) j++;
    if (j > TOP) return null;
    const off = this.#free[j].values().next().value as number;
    this.#free[j].delete(off);
    // Split down to the size asked for: the low half is used, the high half is free.
    while (j > k) {
      j--;
      this.#free[j].add(off + (READ_MIN << j));
    }
    return this.#mem.subarray(off, off + bytes);
  }

  /** Gives back a piece `take` returned; it joins its free buddies. */
  give(piece: Buffer): void {
    const mem = this.#mem;
    if (!mem || piece.buffer !== mem.buffer) throw new Error('not a piece of the read arena');
    let off = piece.byteOffset - mem.byteOffset;
    let k = Math.log2(piece.length / READ_MIN);
    while (k < TOP && this.#free[k].delete(off ^ (READ_MIN << k))) {
      off &= ~(READ_MIN << k);
      k++;
    }
    this.#free[k].add(off);
  }

  /** Free bytes (READ_BUDGET before the first read). */
  get freeBytes(): number {
    if (!this.#mem) return READ_BUDGET;
    let n = 0;
    for (let k = 0; k <= TOP; k++) n += this.#free[k].size * (READ_MIN << k);
    return n;
  }
}

const arena = new ReadArena();

/**
 * One reader's share of the body-buffer budget (see READ_BUDGET). `buffer()` gives the buffer
 * for the next read (the same one, unless the number of readers moved enough to resize it);
 * call `close()` exactly once when the reader is done.
 */
export class ReadBuffer {
  #buf: Buffer | null = null;
  /** Whether #buf is a piece of the arena (else a buffer of its own). */
  #piece = false;
  #open = true;

  constructor() {
    activeReaders++;
  }

  /** The buffer to read the next chunk into; valid until the next call. */
  buffer(): Buffer {
    const want = readChunkBytes(activeReaders);
    if (this.#buf?.length === want) return this.#buf;
    this.#drop();
    for (let n = want; n >= READ_MIN && !this.#buf; n >>= 1) this.#buf = arena.take(n);
    this.#piece = this.#buf !== null;
    this.#buf ??= Buffer.allocUnsafeSlow(READ_MIN);
    return this.#buf;
  }

  /** Gives the share back. Idempotent. */
  close(): void {
    if (!this.#open) return;
    this.#open = false;
    activeReaders--;
    this.#drop();
  }

  #drop(): void {
    if (this.#buf && this.#piece) arena.give(this.#buf);
    this.#buf = null;
    this.#piece = false;
  }
}

/** Readers counted by `ReadBuffer` right now (for tests and diagnostics). */
export function readBufferReaders(): number {
  return activeReaders;
}

/** Free bytes of the read arena: READ_BUDGET whenever no reader holds a piece (tests, diagnostics). */
export function readArenaFreeBytes(): number {
  return arena.freeBytes;
}

/**
 * Writes into `res` chunk by chunk, each resolving once the socket took it (so its buffer may be
 * reused) or `res` closed. One `close` listener for the whole body, not one per chunk.
 */
export class ChunkWriter {
  #res: ServerResponse;
  #waiting: (() => void) | null = null;
  #closed = false;
  #onClose = () => {
    this.#closed = true;
    this.#wake();
  };

  constructor(res: ServerResponse) {
    this.#res = res;
    res.once('close', this.#onClose);
  }

  /** True once the response closed (client gone, or destroyed). */
  get closed(): boolean {
    return this.#closed || this.#res.destroyed;
  }

  /** Writes `chunk`; resolves when it was handed to the socket, or when `res` closed. */
  write(chunk: Buffer): Promise<void> {
    return new Promise<void>((resolve) => {
      if (this.closed) {
        resolve();
        return;
      }
      this.#waiting = resolve;
      this.#res.write(chunk, () => this.#wake());
    });
  }

  /** Drops the close listener. */
  dispose(): void {
    this.#res.off('close', this.#onClose);
    this.#wake();
  }

  #wake(): void {
    const w = this.#waiting;
    this.#waiting = null;
    w?.();
  }
}

/**
 * `OpenBlob.send` for a complete blob file: bytes [start, end] of `path`, read at offsets into
 * one reused buffer (ReadBuffer) and written to `res`, the next read starting only once the
 * socket took the last chunk. A failure before the first byte (the file cannot be opened) is
 * thrown; after, `res` is destroyed. Resolves with the bytes written.
 */
export async function sendFileRange(res: ServerResponse, path: string, start: number, end: number, onBytes?: (n: number) => void): Promise<number> {
  if (end < start) {
    res.end();
    return 0;
  }
  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    if (!res.headersSent) throw err;
    res.destroy();
    return 0;
  }
  const rb = new ReadBuffer();
  const out = new ChunkWriter(res);
  let pos = start;
  try {
    while (pos <= end && !out.closed) {
      const buf = rb.buffer();
      const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, end + 1 - pos), pos);
      if (bytesRead <= 0) throw scError('SC_ERR_INTERNAL', `short read at ${pos} of a blob file`);
      if (out.closed) break;
      await out.write(bytesRead === buf.length ? buf : buf.subarray(0, bytesRead));
      pos += bytesRead;
      onBytes?.(bytesRead);
    }
    if (!out.closed) res.end();
  } catch (err) {
    if (!res.headersSent) throw err;
    res.destroy();
  } finally {
    out.dispose();
    rb.close();
    await fh.close().catch(() => {});
  }
  return pos - start;
}
