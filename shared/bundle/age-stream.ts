/**
 * The age payload cipher, streaming: the STREAM construction over 64 KiB plaintext chunks, as
 * an encrypting and a decrypting Transform (the header is written and read through
 * age-header.ts).
 */
import { randomBytes } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';
import { scError } from '../errors.js';
import { encodeHeader, FILE_KEY_SIZE, NONCE_SIZE, payloadOf, wrapFileKey } from './age-header.js';
import { type AgeIdentity, type AgeRecipient, parseIdentity, parseRecipient } from './age-keys.js';
import { hkdf, open, seal, TAG_SIZE } from './age-primitives.js';

/** Plaintext bytes per payload chunk (spec: 64 KiB). */
export const AGE_CHUNK_SIZE = 64 * 1024;
const CT_CHUNK_SIZE = AGE_CHUNK_SIZE + TAG_SIZE;

function chunkNonce(counter: number, last: boolean): Buffer {
  const n = Buffer.alloc(12);
  n.writeUIntBE(counter, 5, 6);
  if (last) n[11] = 1;
  return n;
}

/** Encrypting Transform: plaintext in, age file out. */
class AgeEncryptStream extends Transform {
  readonly #recipients: AgeRecipient[];
  #key?: Buffer;
  readonly #buf = Buffer.allocUnsafe(AGE_CHUNK_SIZE);
  #fill = 0;
  #counter = 0;

  constructor(recipients: string[]) {
    super();
    if (!Array.isArray(recipients) || recipients.length === 0) throw scError('SC_ERR_BAD_KEY', 'age encryption needs at least one recipient');
    this.#recipients = recipients.map(parseRecipient);
  }

  #start(): void {
    if (this.#key) return;
    const fileKey = randomBytes(FILE_KEY_SIZE);
    const header = encodeHeader(
      fileKey,
      this.#recipients.map((r) => wrapFileKey(fileKey, r)),
    );
    const nonce = randomBytes(NONCE_SIZE);
    this.#key = hkdf(fileKey, nonce, 'payload');
    this.push(Buffer.concat([header, nonce]));
  }

  #seal(plain: Buffer, last: boolean): void {
    this.push(seal(this.#key!, chunkNonce(this.#counter++, last), plain));
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    try {
      this.#start();
      let off = 0;
      while (off < chunk.length) {
        if (this.#fill === AGE_CHUNK_SIZE) {
          // More plaintext follows, so the buffered full chunk is not the last one.
          this.#seal(this.#buf, false);
          this.#fill = 0;
        }
        if (this.#fill === 0 && chunk.length - off > AGE_CHUNK_SIZE) {
          this.#seal(chunk.subarray(off, off + AGE_CHUNK_SIZE), false);
          off += AGE_CHUNK_SIZE;
          continue;
        }
        const n = Math.min(AGE_CHUNK_SIZE - this.#fill, chunk.length - off);
        chunk.copy(this.#buf, this.#fill, off, off + n);
        this.#fill += n;
        off += n;
      }
      cb();
    } catch (err) {
      cb(err as Error);
    }
  }

  override _flush(cb: TransformCallback): void {
    try {
      this.#start();
      this.#seal(this.#buf.subarray(0, this.#fill), true);
      cb();
    } catch (err) {
      cb(err as Error);
    }
  }
}

/** Decrypting Transform: age file in, plaintext out. */
class AgeDecryptStream extends Transform {
  readonly #ids: AgeIdentity[];
  #head: Buffer | null = Buffer.alloc(0);
  #key?: Buffer;
  #queue: Buffer[] = [];
  #queued = 0;
  #counter = 0;

  constructor(identities: string[]) {
    super();
    if (!Array.isArray(identities) || identities.length === 0) throw scError('SC_ERR_BAD_KEY', 'age decryption needs at least one identity');
    this.#ids = identities.map(parseIdentity);
  }

  /** Consumes the header and nonce from #head; returns the payload bytes after them, or null. */
  #readHeader(): Buffer | null {
    const buf = this.#head!;
    const p = payloadOf(buf, this.#ids);
    if (!p) return null;
    this.#key = p.payloadKey;
    this.#head = null;
    return buf.subarray(p.payloadOffset);
  }

  #take(n: number): Buffer {
    let out: Buffer;
    const first = this.#queue[0];
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.#queue.shift();
      else this.#queue[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let filled = 0;
      while (filled < n) {
        const b = this.#queue[0];
        const k = Math.min(b.length, n - filled);
        b.copy(out, filled, 0, k);
        filled += k;
        if (k === b.length) this.#queue.shift();
        else this.#queue[0] = b.subarray(k);
      }
    }
    this.#queued -= n;
    return out;
  }

  #open(box: Buffer, last: boolean): Buffer {
    const pt = open(this.#key!, chunkNonce(this.#counter, last), box);
    if (!pt) {
      throw scError(
        'SC_ERR_DECRYPT',
        last ? `age payload chunk ${this.#counter} failed authentication (tampered or truncated)` : `age payload chunk ${this.#counter} failed authentication`,
      );
    }
    this.#counter++;
    return pt;
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    try {
      let data: Buffer | null = chunk;
      if (this.#head) {
        this.#head = this.#head.length ? Buffer.concat([this.#head, chunk]) : chunk;
        data = this.#readHeader();
        if (!data) {
          cb();
          return;
        }
      }
      if (data.length) {
        this.#queue.push(data);
        this.#queued += data.length;
      }
      // A full chunk is known not to be the last one only once a byte after it has arrived.
      while (this.#queued > CT_CHUNK_SIZE) this.push(this.#open(this.#take(CT_CHUNK_SIZE), false));
      cb();
    } catch (err) {
      cb(err as Error);
    }
  }

  override _flush(cb: TransformCallback): void {
    try {
      if (this.#head) throw scError('SC_ERR_DECRYPT', 'age file truncated in its header');
      if (this.#queued < TAG_SIZE) throw scError('SC_ERR_DECRYPT', 'age payload truncated');
      const pt = this.#open(this.#take(this.#queued), true);
      if (pt.length === 0 && this.#counter > 1) throw scError('SC_ERR_DECRYPT', 'age payload ends with an empty chunk');
      cb(null, pt);
    } catch (err) {
      cb(err as Error);
    }
  }
}

/**
 * A Transform that encrypts to `recipients` (`age1…`). The output is a standard age file
 * (binary, not armored). Throws SC_ERR_BAD_KEY synchronously for an empty list or a malformed
 * recipient.
 */
export function encryptStream(recipients: string[]): Transform {
  return new AgeEncryptStream(recipients);
}

/**
 * A Transform that decrypts an age file with any of `identities` (`AGE-SECRET-KEY-1…`).
 * Throws SC_ERR_BAD_KEY synchronously for an empty list or a malformed identity. The stream
 * fails with SC_ERR_DECRYPT when no identity matches, the header or any chunk was tampered
 * with, or the file is truncated (a truncated file never ends cleanly). Plaintext of
 * authenticated chunks is emitted before the end is verified, as the STREAM construction
 * allows: consumers must treat the output as valid only once the stream has ended.
 */
export function decryptStream(identities: string[]): Transform {
  return new AgeDecryptStream(identities);
}
