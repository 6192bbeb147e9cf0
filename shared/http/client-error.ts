/**
 * The answer to requests Node's HTTP parser refuses before express sees them (a 1 MB header, a
 * malformed request line): a JSON error body with a stable code, the same from every read API
 * server, instead of Node's bare reply.
 */
import type { Socket } from 'node:net';
import { ERRORS } from '../errors.js';

/**
 * `server.on('clientError', onClientError)`: answers header overflow with 431
 * SC_ERR_HEADER_TOO_LARGE and other parse errors with 400 SC_ERR_BAD_REQUEST, then closes the
 * socket. A socket that is gone, or already carries a response, is just destroyed.
 */
export function onClientError(err: NodeJS.ErrnoException, socket: Socket): void {
  if (!socket.writable || (socket as Socket & { _httpMessage?: unknown })._httpMessage) {
    socket.destroy();
    return;
  }
  const code = err.code === 'HPE_HEADER_OVERFLOW' ? 'SC_ERR_HEADER_TOO_LARGE' : 'SC_ERR_BAD_REQUEST';
  const { status, message } = ERRORS[code];
  const body = JSON.stringify({ error: { code, message } });
  socket.end(
    `HTTP/1.1 ${status} ${code === 'SC_ERR_HEADER_TOO_LARGE' ? 'Request Header Fields Too Large' : 'Bad Request'}\r\n` +
      `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
}
