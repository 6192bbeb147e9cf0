/**
 * age key and identity handling: native X25519 recipients (`age1…`) and identities
 * (`AGE-SECRET-KEY-1…`) parsed from Bech32, key files read, fresh identities generated, and the
 * X25519 operations on them.
 */
import { createPrivateKey, createPublicKey, diffieHellman, type KeyObject } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { bech32 } from '@scure/base';
import { generateX25519Identity, identityToRecipient } from 'age-encryption';
import { scError } from '../errors.js';

const BECH32_LIMIT = 1023;
const PKCS8_X25519_PREFIX = Buffer.from('302e020100300506032b656e04220420', 'hex');
const SPKI_X25519_PREFIX = Buffer.from('302a300506032b656e032100', 'hex');

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

/** The raw 32-byte X25519 public key of `key`. */
export function rawPublic(key: KeyObject): Buffer {
  const der = key.export({ type: 'spki', format: 'der' });
  return Buffer.from(der.subarray(der.length - 32));
}

/** A KeyObject for a raw 32-byte X25519 public key. */
export function publicKeyObject(raw: Uint8Array): KeyObject {
  return createPublicKey({ key: Buffer.concat([SPKI_X25519_PREFIX, raw]), format: 'der', type: 'spki' });
}

/** The X25519 shared secret; null for an all-zero one (a low-order point). */
export function x25519(privateKey: KeyObject, publicKey: KeyObject): Buffer | null {
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
