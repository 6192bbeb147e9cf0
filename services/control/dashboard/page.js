// The page's states (`body[data-view]`) and the message line: what the dashboard shows while it
// has no token, is loading, or control refused the token, is unreachable or answered an error.

import { $ } from './dom.js';

export function message(text, kind = 'error') {
  const m = $('message');
  m.textContent = text || '';
  m.className = text ? kind : '';
}

/**
 * What the page can show, as `body[data-view]`: `no-token`, `loading` (a token, no data yet),
 * `ready`, `refused` (control refused the token: nothing is shown), `unreachable` (no answer
 * from control: what is shown is marked as old) and `error` (control answered with an error).
 */
export class PageError extends Error {
  constructor(kind, text) {
    super(text);
    this.kind = kind;
  }
}

/** The first data (hosts, rollouts and operations together) is in and drawn; changed only by markLoaded and reset. */
export let loaded = false;
let lastOk = null;

export function setView(v) {
  document.body.dataset.view = v;
}

/** Shown while no token is given: the page then loads nothing. */
export function needToken() {
  document.body.dataset.auth = 'missing';
  setView('no-token');
  message('Paste a control token (read-only or write) at the top right to see the fleet.', 'info');
}

/** The page's error states; every failed read ends here. */
export function showProblem(err) {
  const kind = err instanceof PageError ? err.kind : 'error';
  if (kind === 'no-token') return needToken();
  if (kind === 'refused') {
    document.body.dataset.auth = 'refused';
    setView('refused');
    return message(`Control refused the token (${err.message}). Paste a valid control token (read-only or write) at the top right.`, 'error');
  }
  const since = lastOk ? ` Shown below is the state as of ${new Date(lastOk).toLocaleTimeString()}, not current.` : '';
  if (kind === 'unreachable') {
    setView('unreachable');
    return message(`Control is unreachable (${err.message}); retrying.${since}`, 'error');
  }
  setView('error');
  message(`Control answered with an error: ${err.message}.${since}`, 'error');
}

/** A read succeeded: leave an error state (a missing-token or loading state stays until data is in). */
export function readOk() {
  lastOk = Date.now();
  document.body.dataset.auth = 'ok';
  const v = document.body.dataset.view;
  if (loaded && v !== 'ready') {
    setView('ready');
    message('');
  }
}

/** The first data is in and drawn (`refreshAll` in app.js): refreshes run, a good read leaves an error state. */
export function markLoaded() {
  loaded = true;
}

export async function safely(fn) {
  try {
    await fn();
  } catch (err) {
    showProblem(err);
  }
}

/** Forgets what was shown (a new or no token): the next data is a first load again. */
export function reset() {
  loaded = false;
  lastOk = null;
  setView('loading');
  for (const id of ['colos', 'hosts', 'hosts-head', 'summary', 'ops', 'rollouts']) $(id).replaceChildren();
  $('audit').querySelector('tbody').replaceChildren();
}
