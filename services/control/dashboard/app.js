// The control dashboard: colos and stages, hosts colour-coded by state, host operations (rescue,
// reinstall, install) with their progress, rollouts with waves and per-host step progress,
// failures with log tails, pause/resume/abort. Every request sends the token kept in
// sessionStorage as a Bearer token: a read-only token shows everything, a write token also acts.
// Until a token is given the page says so and loads nothing; until the first data arrives it says
// it is loading; a refused token or an unreachable control is an error state, never stale data
// passed off as current. Live: SSE /v1/events (read with fetch, which can send the token)
// triggers a refresh of rollouts and operations; inventory is polled. Large fleets show a per-colo
// summary and tiles only for the colo drilled into. No build step, no dependencies; every string
// from the API goes into the page as text, never as HTML.
//
// This file is the entry (index.html loads it as a module): the token form, live updates, pacing
// and the first load. The rest: dom.js (helpers), page.js (page states), api.js (requests),
// state.js (what is known, and reading it), look.js (host colours), inventory.js (colos, hosts),
// ops.js (host operations), rollouts.js, audit.js.

import { authHeaders, TOKEN_KEY, token } from './api.js';
import { refreshAudit, renderAudit } from './audit.js';
import { $ } from './dom.js';
import { readDrill, refreshInventory, renderColos, renderHosts, renderLegend } from './inventory.js';
import { refreshOps, renderOps } from './ops.js';
import { loaded, markLoaded, message, needToken, reset, safely, setView, showProblem } from './page.js';
import { refreshRollouts, renderRollouts } from './rollouts.js';
import { loadInventory, loadOps, loadRollouts } from './state.js';

function renderAll() {
  renderColos();
  renderHosts();
  renderOps();
  renderRollouts();
  renderAudit();
}

// Pacing: a refresh that took D ms is not repeated sooner than 10 × D, so a large fleet (whose
// host list and rollout details are megabytes) costs control and the browser at most about a
// tenth of their time, while a small one stays near real time.
const took = new Map();
async function timed(fn) {
  const t0 = performance.now();
  try {
    await safely(fn);
  } finally {
    took.set(fn, performance.now() - t0);
  }
}
const pace = (fn, base) => Math.max(base, 10 * (took.get(fn) ?? 0));
function every(fn, base) {
  const loop = async () => {
    // Until the first data is in, refreshAll does the reading (and retries).
    if (loaded) await timed(fn);
    setTimeout(loop, pace(fn, base));
  };
  setTimeout(loop, pace(fn, base));
}

let pending = null;
function soon() {
  if (pending || !loaded) return;
  pending = setTimeout(async () => {
    await timed(refreshRollouts);
    await timed(refreshOps);
    await safely(refreshAudit);
    pending = null;
  }, pace(refreshRollouts, 150));
}

/** Reads /v1/events with the token (EventSource cannot send one); reconnects after 2 s. */
async function connectEvents() {
  const live = $('live');
  for (;;) {
    if (token()) {
      try {
        const r = await fetch('/v1/events', { headers: { accept: 'text/event-stream', ...authHeaders() }, cache: 'no-store' });
        if (r.ok && r.body) {
          live.textContent = 'live';
          live.className = 'live on';
          const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
          let buf = '';
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buf += value;
            let i = buf.indexOf('\n\n');
            while (i >= 0) {
              if (/^event: change$/m.test(buf.slice(0, i))) soon();
              buf = buf.slice(i + 2);
              i = buf.indexOf('\n\n');
            }
          }
        }
      } catch {
        // reconnect below
      }
    }
    live.textContent = token() ? 'reconnecting…' : 'no token';
    live.className = 'live';
    await new Promise((r) => setTimeout(r, 2000));
  }
}

/**
 * Reads everything and renders it. Before the first data the page shows its loading state; the
 * colours need hosts, rollouts and operations together, so nothing is drawn until all three are in.
 */
async function refreshAll() {
  if (!token()) return needToken();
  try {
    await Promise.all([loadInventory(), loadRollouts(), loadOps()]);
  } catch (err) {
    return showProblem(err);
  }
  markLoaded();
  setView('ready');
  message('');
  renderAll();
  await safely(refreshAudit);
}

async function showWho() {
  const t = token();
  $('whoami').textContent = '';
  if (!t) return;
  try {
    const r = await fetch('/v1/whoami', { headers: authHeaders() });
    const j = r.ok ? await r.json() : null;
    $('whoami').textContent = j ? `as ${j.token}${j.role === 'read' ? ' (read-only)' : ''}` : 'token refused';
  } catch {
    $('whoami').textContent = '';
  }
}

function setupToken() {
  $('token-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const v = $('token').value.trim();
    if (v) sessionStorage.setItem(TOKEN_KEY, v);
    $('token').value = '';
    message('');
    reset();
    await showWho();
    await refreshAll();
  });
  $('token-clear').addEventListener('click', async () => {
    sessionStorage.removeItem(TOKEN_KEY);
    reset();
    needToken();
    await showWho();
  });
}

// Whenever nothing is loaded (at start, after a new token, control down or the token refused
// at that point), read everything again every few seconds until it works.
async function loadUntilLoaded() {
  for (;;) {
    if (!loaded) await refreshAll();
    await new Promise((r) => setTimeout(r, 3000));
  }
}

readDrill();
window.addEventListener('hashchange', () => {
  readDrill();
  renderHosts();
});
renderLegend();
setupToken();
void showWho();
void connectEvents();
every(refreshInventory, 2000);
every(refreshRollouts, 3000);
every(refreshOps, 3000);
void loadUntilLoaded();
