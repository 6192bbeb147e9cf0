/** Validation of bundle names and versions (contract: ARCHITECTURE.md, "HTTP read API"). */
import { scError } from './errors.js';

export const NAME_RE = /^[a-z0-9][a-z0-9._-]{0,63}$/;
export const VERSION_RE = /^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$/;

/** Returns `s` or throws SC_ERR_BAD_NAME. */
export function parseName(s: unknown): string {
  if (typeof s !== 'string' || !NAME_RE.test(s)) throw scError('SC_ERR_BAD_NAME', undefined, { name: String(s).slice(0, 100) });
  return s;
}

/** Returns `s` or throws SC_ERR_BAD_VERSION. */
export function parseVersion(s: unknown): string {
  if (typeof s !== 'string' || !VERSION_RE.test(s)) {
    throw scError('SC_ERR_BAD_VERSION', undefined, { version: String(s).slice(0, 100) });
  }
  return s;
}

/** Parses `name@version`; throws SC_ERR_BAD_NAME / SC_ERR_BAD_VERSION. */
export function parseRef(ref: string): { name: string; version: string } {
  const at = ref.indexOf('@');
  if (at <= 0) throw scError('SC_ERR_BAD_NAME', `expected NAME@VERSION, got ${JSON.stringify(ref.slice(0, 100))}`);
  return { name: parseName(ref.slice(0, at)), version: parseVersion(ref.slice(at + 1)) };
}
