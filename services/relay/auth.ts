/**
 * Who a relay request comes from and what it may write (services/relay/server.ts): a host
 * authenticates with `Authorization: Bearer <relayToken(secret, colo, id)>` and
 * `X-Stagecoach-Host: <id>` (a per-host HMAC under one of this colo's relay keys, nothing stored
 * per host), acts only on itself, and writes registration fields of this colo only.
 * Every refusal is an ScError (SC_ERR_UNAUTHORIZED, SC_ERR_FORBIDDEN, SC_ERR_CONFLICT, or
 * parseHostInput's for malformed input), turned into a response by the relay's router.
 */
import { timingSafeEqual } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import { LRUCache } from 'lru-cache';
import {
  HOST_ID_RE,
  type HostRecord,
  hostFieldsSchema,
  parseHostInput,
  reportFieldsSchema,
  parseRelayToken,
  type RelayKey,
  relayMac,
  type StepReport,
} from '../../shared/protocol/index.js';
import { scError } from '../../shared/errors.js';

/**
 * Returns the check of a request's host token against this colo's `keys` (any of them): the
 * authenticated host id, or throws SC_ERR_UNAUTHORIZED (no token or host header) or
 * SC_ERR_FORBIDDEN (bad host id, malformed token, unknown key id, wrong MAC).
 */
export function hostAuthenticator(keys: readonly RelayKey[], colo: string): (req: IncomingMessage) => string {
  // The colo's key per key id; each host's expected MAC, computed once (an HMAC per request adds
  // up at thousands of hosts).
  const coloKeys = new Map(keys.map((x) => [x.kid, x.key]));
  const macs = new LRUCache<string, Buffer>({ max: 100_000 });
  return (req: IncomingMessage): string => {
    const m = /^Bearer\s+(\S+)\s*$/i.exec(req.headers.authorization ?? '');
    const host = req.headers['x-stagecoach-host'];
    if (!m || typeof host !== 'string') throw scError('SC_ERR_UNAUTHORIZED', 'relay requests need a host token and X-Stagecoach-Host');
    if (!HOST_ID_RE.test(host)) throw scError('SC_ERR_FORBIDDEN', 'bad host id');
    const t = parseRelayToken(m[1]);
    if (!t) throw scError('SC_ERR_FORBIDDEN', 'malformed relay token (expected KID.HEX: make it again with stagecoach acl relay-token)');
    const key = coloKeys.get(t.kid);
    if (!key) throw scError('SC_ERR_FORBIDDEN', `relay token key id ${t.kid} is not accepted here (rotated out?)`);
    const k = `${t.kid}:${host}`;
    let want = macs.get(k);
    if (!want) {
      want = relayMac(key, host);
      macs.set(k, want);
    }
    if (want.length !== t.mac.length || !timingSafeEqual(want, t.mac)) throw scError('SC_ERR_FORBIDDEN', `wrong relay token for host ${host} at colo ${colo}`);
    return host;
  };
}

/** Throws SC_ERR_FORBIDDEN unless the request's `:id` is the authenticated `host`. */
export function pathHost(req: { params: Record<string, unknown> }, host: string): void {
  if (req.params.id !== host) throw scError('SC_ERR_FORBIDDEN', 'a host token only serves its own host');
}

/**
 * Returns the check of a request's registration `fields` (null when absent): valid host fields of
 * `colo` (SC_ERR_CONFLICT for another colo), without `lastSeen` and `hostId`, as `transport: relay`.
 */
export function fieldsChecker(colo: string): (f: unknown) => Partial<HostRecord> | null {
  return (f: unknown): Partial<HostRecord> | null => {
    if (f === undefined || f === null) return null;
    const r = parseHostInput(hostFieldsSchema, f, 'fields');
    if (r.colo !== undefined && r.colo !== colo) throw scError('SC_ERR_CONFLICT', `this relay serves colo ${colo}, not ${String(r.colo).slice(0, 64)}`);
    delete r.lastSeen;
    delete r.hostId;
    return { ...r, transport: 'relay' };
  };
}

/** Returns the parser of a request's step `report` (null when absent), stamped with its host and `now()` (ms). */
export function reportParser(now: () => number): (host: string, r: unknown) => StepReport | null {
  return (host: string, r: unknown): StepReport | null => {
    if (r === undefined || r === null) return null;
    return { ...parseHostInput(reportFieldsSchema, r, 'report'), host, ts: now() };
  };
}
