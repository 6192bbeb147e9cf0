/**
 * The symmetric primitives age is built on, on node:crypto (OpenSSL): HKDF-SHA256 and
 * ChaCha20-Poly1305 sealing and opening with a 16-byte tag.
 */
import { createCipheriv, createDecipheriv, hkdfSync } from 'node:crypto';

/** Bytes of a ChaCha20-Poly1305 authentication tag. */
export const TAG_SIZE = 16;

/** HKDF-SHA256 of `ikm` with `salt` and `info`: a 32-byte key. */
export function hkdf(ikm: Uint8Array, salt: Uint8Array, info: string): Buffer {
  return Buffer.from(hkdfSync('sha256', ikm, salt, info, 32));
}

/** Seals `plaintext` with ChaCha20-Poly1305: ciphertext then tag. */
export function seal(key: Buffer, nonce: Buffer, plaintext: Uint8Array): Buffer {
  const c = createCipheriv('chacha20-poly1305', key, nonce, { authTagLength: TAG_SIZE });
  const ct = c.update(plaintext);
  c.final();
  return Buffer.concat([ct, c.getAuthTag()]);
}

/** Opens a ChaCha20-Poly1305 box; null when authentication fails. */
export function open(key: Buffer, nonce: Buffer, box: Buffer): Buffer | null {
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
