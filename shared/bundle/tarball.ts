/** Tarball files as bundle input: plain, gzip or zstd (by magic bytes), checked to be tar. */
import { closeSync, createReadStream, openSync, readSync } from 'node:fs';
import { pipeline, type Readable, Transform, type TransformCallback } from 'node:stream';
import { scError } from '../errors.js';
import { decompressStream, MAGIC, sniffCompression } from './compression.js';

/** True when a 512-byte block is a tar header with a valid checksum, or all zeros (empty archive). */
export function isTarBlock(block: Buffer): boolean {
  if (block.length < 512) return false;
  if (block.every((b) => b === 0)) return true;
  const field = block.subarray(148, 156).toString('latin1').replace(/[\0 ]+$/, '').trim();
  if (!/^[0-7]+$/.test(field)) return false;
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 0x20 : block[i];
  return sum === Number.parseInt(field, 8);
}

/** Passes bytes through once the first 512 have been checked to be a tar header. */
class TarHeadCheck extends Transform {
  #head: Buffer | null = Buffer.alloc(0);
  readonly what: string;

  constructor(what: string) {
    super();
    this.what = what;
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    if (!this.#head) {
      cb(null, chunk);
      return;
    }
    this.#head = Buffer.concat([this.#head, chunk]);
    if (this.#head.length < 512) {
      cb();
      return;
    }
    const head = this.#head;
    this.#head = null;
    cb(isTarBlock(head.subarray(0, 512)) ? null : scError('SC_ERR_BAD_ARCHIVE', `${this.what} is not a tar archive`), head);
  }

  override _flush(cb: TransformCallback): void {
    cb(this.#head ? scError('SC_ERR_BAD_ARCHIVE', `${this.what} is not a tar archive (too short)`) : null);
  }
}

function readHead(path: string, n: number): Buffer {
  let fd: number | undefined;
  try {
    fd = openSync(path, 'r');
    const buf = Buffer.alloc(n);
    const got = readSync(fd, buf, 0, n, 0);
    return buf.subarray(0, got);
  } catch (err) {
    throw scError('SC_ERR_BAD_REQUEST', `cannot read tarball ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

/**
 * Opens a tarball file as a plain tar stream: `.tar`, or gzip/zstd compressed (detected by
 * magic bytes, whatever the file name). Throws SC_ERR_BAD_REQUEST when unreadable and
 * SC_ERR_BAD_ARCHIVE for xz/bzip2 or a file that is not a tar; the stream fails with
 * SC_ERR_BAD_ARCHIVE when the decompressed content is not a tar or is corrupt.
 */
export function openTarball(path: string): Readable {
  const head = readHead(path, 512);
  const kind = sniffCompression(head);
  if (!kind) {
    if (head.subarray(0, 6).equals(MAGIC.xz) || head.subarray(0, 3).equals(MAGIC.bzip2)) {
      throw scError('SC_ERR_BAD_ARCHIVE', `${path}: xz and bzip2 tarballs are not supported; use .tar, .tar.gz or .tar.zst`);
    }
    if (!isTarBlock(head)) throw scError('SC_ERR_BAD_ARCHIVE', `${path} is not a tar archive`);
  }
  const file = createReadStream(path, { highWaterMark: 1 << 20 });
  const stages = kind ? [file, decompressStream(kind), new TarHeadCheck(path)] : [file, new TarHeadCheck(path)];
  return pipeline(stages, () => {}) as unknown as Readable;
}
