/** The relay wire (host ↔ its colo's relay over HTTP): host tokens. */
import { createHmac } from 'node:crypto';
import { scError } from '../errors.js';
import { HOST_ID_RE } from './keys.js';

/**
 * A host's relay token: hex HMAC-SHA256 of the host id under the relay secret. The relay derives
 * it again to authenticate the host (`Authorization: Bearer <token>` with header
 * `X-Stagecoach-Host: <id>`), so a host can only take and report its own jobs.
 */
export function relayToken(secret: string | Buffer, hostId: string): string {
  if (!HOST_ID_RE.test(hostId)) throw scError('SC_ERR_BAD_NAME', `bad host id ${JSON.stringify(hostId.slice(0, 80))}`);
  return createHmac('sha256', secret).update(hostId).digest('hex');
}
