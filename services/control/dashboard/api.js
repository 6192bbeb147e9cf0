// Requests to control: every one sends the token kept in sessionStorage as a Bearer token. A read
// that fails throws a PageError (see page.js); a write that fails says why in the message line.

import { $ } from './dom.js';
import { message, PageError, readOk } from './page.js';

export const TOKEN_KEY = 'stagecoach.token';

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

export function authHeaders() {
  const t = token();
  return t ? { authorization: `Bearer ${t}` } : {};
}

export async function getJson(path) {
  if (!token()) throw new PageError('no-token', 'no token');
  let r;
  try {
    r = await fetch(path, { headers: { accept: 'application/json', ...authHeaders() }, cache: 'no-store' });
  } catch (err) {
    throw new PageError('unreachable', String(err?.message ?? err));
  }
  if (r.status === 401 || r.status === 403) {
    const j = await r.json().catch(() => null);
    throw new PageError('refused', `HTTP ${r.status}${j?.error?.code ? ` ${j.error.code}` : ''}`);
  }
  if (!r.ok) {
    const j = await r.json().catch(() => null);
    throw new PageError('http', `${path}: HTTP ${r.status}${j?.error?.code ? ` ${j.error.code}: ${j.error.message ?? ''}` : ''}`);
  }
  const body = await r.json();
  readOk();
  return body;
}

export async function write(path, body) {
  const t = token();
  if (!t) {
    message('Enter a write token first (top right).');
    $('token').focus();
    return null;
  }
  const r = await fetch(path, {
    method: 'POST',
    headers: { authorization: `Bearer ${t}`, 'content-type': 'application/json', accept: 'application/json' },
    body: JSON.stringify(body ?? {}),
  });
  const j = await r.json().catch(() => ({}));
  if (!r.ok) {
    message(`${j?.error?.code ?? `HTTP ${r.status}`}: ${j?.error?.message ?? 'request failed'}`);
    return null;
  }
  message('');
  return j;
}
