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
 *
 * This file is the public surface of the age codec; the work is split by what each part owns:
 * - age-keys.ts: recipients, identities and key files;
 * - age-header.ts: the header (stanzas, MAC) and the payload key (`openAgePayload`);
 * - age-stream.ts: the STREAM payload cipher (`encryptStream`, `decryptStream`);
 * - age-primitives.ts: HKDF and ChaCha20-Poly1305.
 */
export { AGE_MAX_HEAD, type AgePayload, openAgePayload } from './age-header.js';
export { type AgeIdentity, type AgeRecipient, generateAgeIdentity, parseIdentity, parseRecipient, readIdentityFile, readRecipientsFile } from './age-keys.js';
export { AGE_CHUNK_SIZE, decryptStream, encryptStream } from './age-stream.js';
