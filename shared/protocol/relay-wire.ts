/**
 * The relay wire (host ↔ its colo's relay over HTTP): host tokens.
 *
 * A host's token is bound to its colo and to a key id, so a token works only at its own colo's
 * relay and secrets can be rotated without a flag day:
 * - the fleet's relay secrets are `KID:SECRET` lines (a bare `SECRET` is key id `1`); the first
 *   line is the current one, new tokens are made with it, and every line is accepted;
 * - a colo's key is HKDF-SHA256(secret, salt `stagecoach relay token v1`, info `colo:<colo>`);
 * - a host's token is `<kid>.<hex HMAC-SHA256(colo key, host id)>`.
 * A relay holds only its own colo's keys, never the fleet secret: a relay key file is `KID:HEXKEY`
 * lines (64 hex digits, the colo key under that key id, current first; `stagecoach acl relay-key`
 * derives it), so a compromised stage can mint tokens for its own colo's relay and no other.
 * The relay computes the expected token again (`Authorization: Bearer <token>` with header
 * `X-Stagecoach-Host: <id>`), so a host can only take and report its own jobs, and only at the
 * relay of its colo. A rotation: put the new line first (`2:NEW`, then `1:OLD`), give the relays
 * their new key files and hosts their new tokens, then drop the old line.
 */
import { createHmac, hkdfSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { scError } from '../errors.js';
import { NAME_RE } from '../names.js';
import { HOST_ID_RE } from './keys.js';

/** One relay secret with its key id. */
export interface RelaySecret {
  kid: string;
  secret: string;
}

/** Key ids: 1–32 of `[A-Za-z0-9_-]` (no dot: the token's separator). */
export const RELAY_KID_RE = /^[A-Za-z0-9_-]{1,32}$/;

const TOKEN_RE = /^([A-Za-z0-9_-]{1,32})\.([0-9a-f]{64})$/;

/**
 * Parses a relay secrets file's text: `KID:SECRET` lines, or one bare `SECRET` (key id `1`);
 * blank lines and `#` comments are skipped. Throws SC_ERR_BAD_CONFIG (no secret in the message).
 */
export function parseRelaySecrets(text: string, path = 'relay secret file'): RelaySecret[] {
  const out: RelaySecret[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const m = /^([^:\s]{1,64}):(\S+)$/.exec(line);
    const s = m ? { kid: m[1], secret: m[2] } : { kid: '1', secret: line };
    if (!RELAY_KID_RE.test(s.kid)) throw scError('SC_ERR_BAD_CONFIG', `${path}: a key id must be 1-32 of [A-Za-z0-9_-]`);
    if (/\s/.test(s.secret) || s.secret.length < 16 || s.secret.length > 4096) throw scError('SC_ERR_BAD_CONFIG', `${path}: a relay secret must be one word of 16 to 4096 bytes`);
    if (out.some((o) => o.kid === s.kid)) throw scError('SC_ERR_BAD_CONFIG', `${path}: key id ${s.kid} appears twice`);
    out.push(s);
  }
  if (out.length === 0) throw scError('SC_ERR_BAD_CONFIG', `${path} holds no relay secret`);
  return out;
}

/** Reads the fleet's relay secrets file (`KID:SECRET` lines, current first); throws SC_ERR_BAD_CONFIG. */
export function readRelaySecrets(path: string): RelaySecret[] {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw scError('SC_ERR_BAD_CONFIG', `cannot read relay secret file ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  return parseRelaySecrets(text, path);
}

/** One colo's relay key with its key id (what a relay holds). */
export interface RelayKey {
  kid: string;
  /** HKDF output, 32 bytes. */
  key: Buffer;
}

const HEX_KEY_RE = /^[0-9a-f]{64}$/i;

/**
 * Parses a relay key file's text: `KID:HEXKEY` lines (64 hex digits), current first; blank lines
 * and `#` comments are skipped. Throws SC_ERR_BAD_CONFIG naming `path` and the line, never the key.
 */
export function parseRelayKeys(text: string, path = 'relay key file'): RelayKey[] {
  const out: RelayKey[] = [];
  for (const [i, raw] of text.split('\n').entries()) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const at = `${path} line ${i + 1}`;
    const colon = line.indexOf(':');
    if (colon < 0) throw scError('SC_ERR_BAD_CONFIG', `${at}: expected KID:HEXKEY (a relay key file holds one colo's keys: make it with stagecoach acl relay-key)`);
    const kid = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (!RELAY_KID_RE.test(kid)) throw scError('SC_ERR_BAD_CONFIG', `${at}: a key id must be 1-32 of [A-Za-z0-9_-]`);
    if (!HEX_KEY_RE.test(hex)) throw scError('SC_ERR_BAD_CONFIG', `${at}: a relay key must be 64 hex digits (make it with stagecoach acl relay-key)`);
    if (out.some((o) => o.kid === kid)) throw scError('SC_ERR_BAD_CONFIG', `${at}: key id ${kid} appears twice`);
    out.push({ kid, key: Buffer.from(hex, 'hex') });
  }
  if (out.length === 0) throw scError('SC_ERR_BAD_CONFIG', `${path} holds no relay key`);
  return out;
}

/** Reads a colo's relay key file (`KID:HEXKEY` lines, current first); throws SC_ERR_BAD_CONFIG. */
export function readRelayKeys(path: string): RelayKey[] {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw scError('SC_ERR_BAD_CONFIG', `cannot read relay key file ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  return parseRelayKeys(text, path);
}

/** The text of `colo`'s relay key file under the fleet's secrets: one `KID:HEXKEY` line each, same order. */
export function formatRelayKeys(secrets: readonly RelaySecret[], colo: string): string {
  return secrets.map((s) => `${s.kid}:${coloRelayKey(s.secret, colo).toString('hex')}\n`).join('');
}

/** The key of `colo` under one relay secret (HKDF-SHA256, see the top of this file). */
export function coloRelayKey(secret: string, colo: string): Buffer {
  if (!NAME_RE.test(colo)) throw scError('SC_ERR_BAD_NAME', `bad colo ${JSON.stringify(colo.slice(0, 80))}`);
  return Buffer.from(hkdfSync('sha256', secret, 'stagecoach relay token v1', `colo:${colo}`, 32));
}

/** The MAC part of a host's token under a colo key. */
export function relayMac(coloKey: Buffer, hostId: string): Buffer {
  if (!HOST_ID_RE.test(hostId)) throw scError('SC_ERR_BAD_NAME', `bad host id ${JSON.stringify(hostId.slice(0, 80))}`);
  return createHmac('sha256', coloKey).update(hostId).digest();
}

/** A host's relay token for its colo, under `secret` (the current one: the first line of the file). */
export function relayToken(secret: RelaySecret, colo: string, hostId: string): string {
  return `${secret.kid}.${relayMac(coloRelayKey(secret.secret, colo), hostId).toString('hex')}`;
}

/** A host's relay token under a colo key (what a relay holding only its colo's keys can check). */
export function relayKeyToken(key: RelayKey, hostId: string): string {
  return `${key.kid}.${relayMac(key.key, hostId).toString('hex')}`;
}

/** Splits a token into its key id and MAC; null when it does not have the token's shape. */
export function parseRelayToken(token: string): { kid: string; mac: Buffer } | null {
  const m = TOKEN_RE.exec(token);
  return m ? { kid: m[1], mac: Buffer.from(m[2], 'hex') } : null;
}

/** What a relay shows on /healthz. */
export interface RelayStats {
  colo: string;
  queue: string;
  /** Jobs held (taken from the queue, not yet reported finished). */
  held: number;
  /** Hosts with an open long-poll. */
  polling: number;
  /** Jobs handed to hosts since start (re-adoptions included). */
  handedOut: number;
}
