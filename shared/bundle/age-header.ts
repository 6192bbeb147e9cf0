/**
 * The age header: X25519 recipient stanzas wrapping the file key, the header MAC, and the
 * header's text (base64 without padding, wrapped at 64 columns) written and parsed to the spec;
 * then the payload key derived from the file key and the nonce after the header.
 */
import { createHmac, generateKeyPairSync, timingSafeEqual } from 'node:crypto';
import { type ScError, scError } from '../errors.js';
import { type AgeIdentity, type AgeRecipient, parseIdentity, publicKeyObject, rawPublic, x25519 } from './age-keys.js';
import { hkdf, open, seal, TAG_SIZE } from './age-primitives.js';

const VERSION_LINE = 'age-encryption.org/v1';
/** Bytes of the file key, and of the nonce between the header and the payload. */
export const FILE_KEY_SIZE = 16;
export const NONCE_SIZE = 16;
const X25519_INFO = 'age-encryption.org/v1/X25519';
/** A header larger than this is refused (real headers are a few hundred bytes per recipient). */
const MAX_HEADER_SIZE = 64 * 1024;
const ZERO_NONCE = Buffer.alloc(12);
const B64_RE = /^[A-Za-z0-9+/]*$/;
const ARG_RE = /^[\x21-\x7e]+$/;

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

/** Wraps `fileKey` to the X25519 recipient `r`: one header stanza. */
export function wrapFileKey(fileKey: Buffer, r: AgeRecipient): Stanza {
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

/** The header text for `stanzas`, MAC line included, as written before the nonce. */
export function encodeHeader(fileKey: Buffer, stanzas: Stanza[]): Buffer {
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
export function payloadOf(buf: Buffer, ids: AgeIdentity[]): AgePayload | null {
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
