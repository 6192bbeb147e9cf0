/**
 * age (age-encryption.org/v1) on node:crypto, streaming.
 *
 * Header: X25519 recipient stanzas (HKDF-SHA256, ChaCha20-Poly1305 key wrap), header HMAC,
 * base64 without padding wrapped at 64 columns, written and parsed to the spec. Payload: a
 * 16-byte nonce, then the STREAM construction: 64 KiB plaintext chunks sealed with
 * ChaCha20-Poly1305 under HKDF(fileKey, salt = nonce, info = "payload"), nonce = 11-byte
 * big-endian counter and a last-chunk flag byte. OpenSSL does the ChaCha20-Poly1305 and
 * X25519 work, which is what makes multi-GB bundles practical (see STACK.md).
 *
 * Supported: native X25519 recipients (`age1…`) and identities (`AGE-SECRET-KEY-1…`).
 * Not supported (rejected with SC_ERR_BAD_KEY / SC_ERR_DECRYPT): passphrase (scrypt), plugin,
 * post-quantum hybrid and SSH recipients, and ASCII-armored files.
 */
import {
  createCipheriv,
  createDecipheriv,
  createHmac,
  createPrivateKey,
  createPublicKey,
  diffieHellman,
  generateKeyPairSync,
  hkdfSync,
  type KeyObject,
  randomBytes,
  timingSafeEqual,
} from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { Transform, type TransformCallback } from 'node:stream';
import { bech32 } from '@scure/base';
import { generateX25519Identity, identityToRecipient } from 'age-encryption';
import { type ScError, scError } from '../errors.js';

const VERSION_LINE = 'age-encryption.org/v1';
/** Plaintext bytes per payload chunk (spec: 64 KiB). */
export const AGE_CHUNK_SIZE = 64 * 1024;
const TAG_SIZE = 16;
const CT_CHUNK_SIZE = AGE_CHUNK_SIZE + TAG_SIZE;
const FILE_KEY_SIZE = 16;
const NONCE_SIZE = 16;
const X25519_INFO = 'age-encryption.org/v1/X25519';
/** A header larger than this is refused (real headers are a few hundred bytes per recipient). */
const MAX_HEADER_SIZE = 64 * 1024;
const BECH32_LIMIT = 1023;
const PKCS8_X25519_PREFIX = Buffer.from('302e020100300506032b656e04220420', 'hex');
const SPKI_X25519_PREFIX = Buffer.from('302a300506032b656e032100', 'hex');
const ZERO_NONCE = Buffer.alloc(12);
const B64_RE = /^[A-Za-z0-9+/]*$/;
const ARG_RE = /^[\x21-\x7e]+$/;

/** A parsed `age1…` X25519 recipient. */
export interface AgeRecipient {
  /** Canonical (lowercase) `age1…` text. */
  readonly text: string;
  /** The raw 32-byte X25519 public key. */
  readonly publicKey: Buffer;
  readonly keyObject: KeyObject;
}

/** A parsed `AGE-SECRET-KEY-1…` X25519 identity. Never log it. */
export interface AgeIdentity {
  /** The matching `age1…` recipient. */
  readonly recipient: string;
  /** The raw 32-byte X25519 public key. */
  readonly publicKey: Buffer;
  readonly privateKey: KeyObject;
}

interface Stanza {
  type: string;
  args: string[];
  body: Buffer;
}

function b64(buf: Uint8Array): string {
  return Buffer.from(buf).toString('base64').replace(/=+$/, '');
}

/** Strict base64 without padding: canonical encodings only. Returns null when malformed. */
function unb64(s: string): Buffer | null {
  if (!B64_RE.test(s) || s.length % 4 === 1) return null;
  const buf = Buffer.from(s, 'base64');
  return b64(buf) === s ? buf : null;
}

function hkdf(ikm: Uint8Array, salt: Uint8Array, info: string): Buffer {
  return Buffer.from(hkdfSync('sha256', ikm, salt, info, 32));
}

function seal(key: Buffer, nonce: Buffer, plaintext: Uint8Array): Buffer {
  const c = createCipheriv('chacha20-poly1305', key, nonce, { authTagLength: TAG_SIZE });
  const ct = c.update(plaintext);
  c.final();
  return Buffer.concat([ct, c.getAuthTag()]);
}

/** Opens a ChaCha20-Poly1305 box; null when authentication fails. */
function open(key: Buffer, nonce: Buffer, box: Buffer): Buffer | null {
  if (box.length < TAG_SIZE) return null;
  const d = createDecipheriv('chacha20-poly1305', key, nonce, { authTagLength: TAG_SIZE });
  d.setAuthTag(box.subarray(box.length - TAG_SIZE));
  const pt = d.update(box.subarray(0, box.length - TAG_SIZE));
  try {
    d.final();
  } catch {
    return null;
  }
  return pt;
}

function rawPublic(key: KeyObject): Buffer {
  const der = key.export({ type: 'spki', format: 'der' });
  return Buffer.from(der.subarray(der.length - 32));
}

function publicKeyObject(raw: Uint8Array): KeyObject {
  return createPublicKey({ key: Buffer.concat([SPKI_X25519_PREFIX, raw]), format: 'der', type: 'spki' });
}

function x25519(privateKey: KeyObject, publicKey: KeyObject): Buffer | null {
  try {
    const s = diffieHellman({ privateKey, publicKey });
    return s.every((b) => b === 0) ? null : s;
  } catch {
    // OpenSSL refuses an all-zero shared secret (low-order point).
    return null;
  }
}

function decodeBech32(s: string, prefix: string): Uint8Array | null {
  if (s !== s.toLowerCase() && s !== s.toUpperCase()) return null;
  try {
    const d = bech32.decode(s.toLowerCase() as `${string}1${string}`, BECH32_LIMIT);
    if (d.prefix !== prefix) return null;
    const data = bech32.fromWords(d.words);
    return data.length === 32 ? data : null;
  } catch {
    return null;
  }
}

/** Parses an `age1…` X25519 recipient; throws SC_ERR_BAD_KEY. */
export function parseRecipient(s: string): AgeRecipient {
  const t = String(s).trim();
  const raw = t.toLowerCase().startsWith('age1') ? decodeBech32(t, 'age') : null;
  if (!raw) {
    const hint = /^age1(pq|tag)/i.test(t) ? ' (post-quantum and tag recipients are not supported)' : '';
    throw scError('SC_ERR_BAD_KEY', `not an age X25519 recipient (age1…)${hint}`, { recipient: t.slice(0, 100) });
  }
  const publicKey = Buffer.from(raw);
  return { text: t.toLowerCase(), publicKey, keyObject: publicKeyObject(publicKey) };
}

/** Parses an `AGE-SECRET-KEY-1…` X25519 identity; throws SC_ERR_BAD_KEY (never echoing the key). */
export function parseIdentity(s: string): AgeIdentity {
  const t = String(s).trim();
  const raw = t.toUpperCase().startsWith('AGE-SECRET-KEY-1') ? decodeBech32(t, 'age-secret-key-') : null;
  if (!raw) {
    const hint = t.toUpperCase().startsWith('AGE-SECRET-KEY-PQ-') ? ' (post-quantum identities are not supported)' : '';
    throw scError('SC_ERR_BAD_KEY', `not an age X25519 identity (AGE-SECRET-KEY-1…)${hint}`);
  }
  const privateKey = createPrivateKey({ key: Buffer.concat([PKCS8_X25519_PREFIX, raw]), format: 'der', type: 'pkcs8' });
  const publicKey = rawPublic(createPublicKey(privateKey));
  return { recipient: bech32.encode('age', bech32.toWords(publicKey), BECH32_LIMIT), publicKey, privateKey };
}

/** Keeps the non-empty, non-comment lines of an age key file. */
function keyLines(text: string): string[] {
  return text
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'));
}

async function readKeyFile(path: string): Promise<string> {
  try {
    return await readFile(path, 'utf8');
  } catch (err) {
    throw scError('SC_ERR_BAD_CONFIG', `cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

/**
 * Reads an age recipients file (one `age1…` per line, `#` comments and blank lines ignored).
 * Returns canonical recipient strings. Throws SC_ERR_BAD_CONFIG when unreadable or empty,
 * SC_ERR_BAD_KEY on a malformed line.
 */
export async function readRecipientsFile(path: string): Promise<string[]> {
  const lines = keyLines(await readKeyFile(path));
  if (lines.length === 0) throw scError('SC_ERR_BAD_CONFIG', `no recipients in ${path}`);
  return lines.map((l) => parseRecipient(l).text);
}

/**
 * Reads an age identity file (as written by `age-keygen` or `stagecoach keys gen`: `#` comments,
 * one `AGE-SECRET-KEY-1…` per line). Throws SC_ERR_BAD_CONFIG when unreadable or empty,
 * SC_ERR_BAD_KEY on a malformed line.
 */
export async function readIdentityFile(path: string): Promise<string[]> {
  const lines = keyLines(await readKeyFile(path));
  if (lines.length === 0) throw scError('SC_ERR_BAD_CONFIG', `no identities in ${path}`);
  for (const l of lines) parseIdentity(l);
  return lines;
}

/** Generates a fresh X25519 identity and its recipient. */
export async function generateAgeIdentity(): Promise<{ identity: string; recipient: string }> {
  const identity = await generateX25519Identity();
  const recipient = await identityToRecipient(identity);
  if (parseIdentity(identity).recipient !== recipient) throw scError('SC_ERR_INTERNAL', 'age identity does not match its recipient');
  return { identity, recipient };
}

function wrapFileKey(fileKey: Buffer, r: AgeRecipient): Stanza {
  const eph = generateKeyPairSync('x25519');
  const share = rawPublic(eph.publicKey);
  const shared = x25519(eph.privateKey, r.keyObject);
  if (!shared) throw scError('SC_ERR_BAD_KEY', 'age recipient is a low-order point', { recipient: r.text });
  const key = hkdf(shared, Buffer.concat([share, r.publicKey]), X25519_INFO);
  return { type: 'X25519', args: [b64(share)], body: seal(key, ZERO_NONCE, fileKey) };
}

function unwrapFileKey(stanzas: Stanza[], ids: AgeIdentity[]): Buffer | null {
  for (const s of stanzas) {
    if (s.type !== 'X25519') continue;
    const share = s.args.length === 1 ? unb64(s.args[0]) : null;
    if (share?.length !== 32 || s.body.length !== FILE_KEY_SIZE + TAG_SIZE) {
      throw scError('SC_ERR_DECRYPT', 'malformed X25519 stanza in age header');
    }
    const shareKey = publicKeyObject(share);
    for (const id of ids) {
      const shared = x25519(id.privateKey, shareKey);
      if (!shared) throw scError('SC_ERR_DECRYPT', 'X25519 stanza has a low-order share');
      const key = hkdf(shared, Buffer.concat([share, id.publicKey]), X25519_INFO);
      const fileKey = open(key, ZERO_NONCE, s.body);
      if (fileKey) return fileKey;
    }
  }
  return null;
}

function headerMac(fileKey: Buffer, macInput: Buffer | string): Buffer {
  return createHmac('sha256', hkdf(fileKey, Buffer.alloc(0), 'header'))
    .update(macInput)
    .digest();
}

function encodeHeader(fileKey: Buffer, stanzas: Stanza[]): Buffer {
  let h = `${VERSION_LINE}\n`;
  for (const s of stanzas) {
    h += `-> ${[s.type, ...s.args].join(' ')}\n`;
    const body = b64(s.body);
    for (let i = 0; i <= body.length; i += 64) h += `${body.slice(i, i + 64)}\n`;
  }
  h += '---';
  return Buffer.from(`${h} ${b64(headerMac(fileKey, h))}\n`, 'latin1');
}

/**
 * Parses a complete header at the start of `buf`. Returns null when more bytes are needed;
 * throws SC_ERR_DECRYPT when malformed.
 */
function parseHeader(buf: Buffer): { stanzas: Stanza[]; macInput: Buffer; mac: Buffer; length: number } | null {
  const bad = (why: string): ScError => scError('SC_ERR_DECRYPT', `malformed age header: ${why}`);
  const prefix = Math.min(buf.length, VERSION_LINE.length + 1);
  if (buf.subarray(0, prefix).toString('latin1') !== `${VERSION_LINE}\n`.slice(0, prefix)) {
    if (buf.subarray(0, 10).toString('latin1').startsWith('-----BEGIN')) throw bad('ASCII-armored files are not supported');
    throw bad('not an age-encryption.org/v1 file');
  }
  const macAt = buf.indexOf('\n---', 0, 'latin1');
  const end = macAt < 0 ? -1 : buf.indexOf(0x0a, macAt + 1);
  if (end < 0) {
    if (buf.length > MAX_HEADER_SIZE) throw bad('header too large');
    return null;
  }
  if (end + 1 > MAX_HEADER_SIZE) throw bad('header too large');
  const text = buf.subarray(0, end + 1);
  for (const b of text) if (b !== 0x0a && (b < 0x20 || b > 0x7e)) throw bad('non-ASCII byte');
  const lines = text.toString('latin1').split('\n');
  lines.pop(); // the text ends with \n
  const stanzas: Stanza[] = [];
  let i = 1;
  while (i < lines.length - 1) {
    const line = lines[i++];
    if (!line.startsWith('-> ')) throw bad('expected a stanza');
    const [type, ...args] = line.slice(3).split(' ');
    if (!type || ![type, ...args].every((a) => ARG_RE.test(a))) throw bad('bad stanza arguments');
    let body = '';
    for (;;) {
      if (i >= lines.length - 1) throw bad('unterminated stanza body');
      const l = lines[i++];
      if (l.length > 64 || !B64_RE.test(l)) throw bad('bad stanza body line');
      body += l;
      if (l.length < 64) break;
    }
    const decoded = unb64(body);
    if (!decoded) throw bad('bad base64 in stanza body');
    stanzas.push({ type, args, body: decoded });
  }
  const macLine = lines[lines.length - 1];
  const mac = macLine.startsWith('--- ') ? unb64(macLine.slice(4)) : null;
  if (mac?.length !== 32) throw bad('bad MAC line');
  if (stanzas.length === 0) throw bad('no recipient stanzas');
  return { stanzas, macInput: buf.subarray(0, macAt + 4), mac, length: end + 1 };
}

/** Header, MAC and nonce at the start of `buf` → payload key and offset; null when more bytes are needed. */
function payloadOf(buf: Buffer, ids: AgeIdentity[]): AgePayload | null {
  const h = parseHeader(buf);
  if (!h || buf.length < h.length + NONCE_SIZE) return null;
  const fileKey = unwrapFileKey(h.stanzas, ids);
  if (!fileKey) throw scError('SC_ERR_DECRYPT', 'no identity matched any of the recipients');
  if (!timingSafeEqual(headerMac(fileKey, h.macInput), h.mac)) throw scError('SC_ERR_DECRYPT', 'age header MAC mismatch');
  return { payloadKey: hkdf(fileKey, buf.subarray(h.length, h.length + NONCE_SIZE), 'payload'), payloadOffset: h.length + NONCE_SIZE };
}

/** Where an age file's STREAM payload starts and the key it is sealed with. Never log the key. */
export interface AgePayload {
  /** 32-byte ChaCha20-Poly1305 key of the payload chunks. */
  payloadKey: Buffer;
  /** Byte offset of the first payload chunk (after the header and the 16-byte nonce). */
  payloadOffset: number;
}

/** Largest header + nonce `openAgePayload` accepts: read this many bytes of a file to be sure to hold them. */
export const AGE_MAX_HEAD = MAX_HEADER_SIZE + NONCE_SIZE;

/**
 * Reads the header of the age file starting at `head` with any of `identities`: verifies the
 * header MAC and returns the payload key and offset, so a caller can decrypt the payload chunks
 * itself (e.g. in another thread) under the same STREAM rules as `decryptStream`. Returns null
 * when `head` is shorter than header + nonce. Throws SC_ERR_BAD_KEY (identities) or
 * SC_ERR_DECRYPT (malformed header, no matching identity, MAC mismatch).
 */
export function openAgePayload(head: Buffer, identities: string[]): AgePayload | null {
  if (!Array.isArray(identities) || identities.length === 0) throw scError('SC_ERR_BAD_KEY', 'age decryption needs at least one identity');
  return payloadOf(head, identities.map(parseIdentity));
}

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
