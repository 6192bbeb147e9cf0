// The control dashboard: colos and stages, hosts colour-coded by state, rollouts with waves and
// per-host step progress, failures with log tails, pause/resume/abort. Every request sends the
// token kept in sessionStorage as a Bearer token: a read-only token shows everything, a write
// token also acts. Until a token is given the page says so and loads nothing. Live: SSE
// /v1/events (read with fetch, which can send the token) triggers a refresh of rollouts;
// inventory is polled. No build step, no dependencies; every string from
// the API goes into the page as text, never as HTML.

const STEPS = [
  'fetch',
  'partition',
  'install-base',
  'capture-config',
  'apply-config-base',
  'boot-base',
  'commit-base',
  'wipe-target-disk',
  'install-target',
  'boot-target',
  'verify',
];
const STATES = ['idle', 'pending', 'queued', 'running', 'converted', 'failed', 'aborted', 'skipped', 'rescue', 'stale'];
const FINISHED = ['aborted', 'completed', 'failed'];
const TOKEN_KEY = 'stagecoach.token';

const $ = (id) => document.getElementById(id);

/** Creates an element: el('div', {class: 'x', 'data-a': 1}, child, 'text'…). */
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'onclick') e.addEventListener('click', v);
    else e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function bytes(n) {
  if (typeof n !== 'number') return '-';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

function ago(ms) {
  if (typeof ms !== 'number') return '-';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 120 ? `${s}s ago` : s < 7200 ? `${Math.round(s / 60)}m ago` : `${Math.round(s / 3600)}h ago`;
}

function message(text, kind = 'error') {
  const m = $('message');
  m.textContent = text || '';
  m.className = text ? kind : '';
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

function authHeaders() {
  const t = token();
  return t ? { authorization: `Bearer ${t}` } : {};
}

/** Shown while no token is given, or the token is refused: the page then loads nothing. */
function needToken(refused) {
  document.body.dataset.auth = refused ? 'refused' : 'missing';
  message(refused ? 'The token was refused: paste a control token (read-only or write) at the top right.' : 'Paste a control token (read-only or write) at the top right to see the fleet.', 'info');
}

async function getJson(path) {
  if (!token()) {
    needToken(false);
    throw new Error('no token');
  }
  const r = await fetch(path, { headers: { accept: 'application/json', ...authHeaders() }, cache: 'no-store' });
  if (r.status === 401 || r.status === 403) {
    needToken(true);
    throw new Error('token refused');
  }
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  document.body.dataset.auth = 'ok';
  return r.json();
}

async function write(path, body) {
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

// ------------------------------------------------------------------ state and rendering

const state = { hosts: [], colos: [], rollouts: [], details: new Map(), audit: [] };

/** The colour state of a host: its work in an active rollout, else its latest rollout result. */
function hostState(h) {
  if (h.stale) return 'stale';
  if (h.work) return h.work.status.startsWith('rescue') ? 'rescue' : h.work.kind === 'op' ? 'running' : h.work.status;
  for (const r of state.rollouts) {
    const d = state.details.get(r.spec.id);
    const hs = d?.hosts?.find((x) => x.host === h.hostId);
    if (hs) return hs.rescue && hs.status === 'failed' ? 'rescue' : hs.status;
  }
  return 'idle';
}

function renderLegend() {
  $('legend').replaceChildren(...STATES.map((s) => el('span', {}, el('i', { style: `background: var(--${s === 'rescue' ? 'rescue' : s})` }), s)));
}

function renderColos() {
  $('colos').replaceChildren(
    ...state.colos.map((c) =>
      el(
        'div',
        { class: 'colo', 'data-colo': c.colo },
        el('h3', {}, c.colo),
        el('div', {}, `${c.hosts} hosts, ${c.online} online`),
        c.stages.length === 0 ? el('div', { class: 'stage' }, 'no stage configured') : null,
        ...c.stages.map((s) =>
          el(
            'div',
            { class: `stage${s.ok ? '' : ' down'}`, 'data-stage': s.url },
            el('div', {}, s.url, s.ok ? '' : ` — unreachable: ${s.error ?? ''}`),
            s.ok
              ? el(
                  'div',
                  {},
                  `fills in flight ${s.fillsInFlight ?? 0} · committed ${s.fillsCommitted ?? 0} · from upstream ${bytes(s.upstreamBytes)} · served ${bytes(s.bytesServed)} · hits ${s.hits ?? 0}`,
                )
              : null,
          ),
        ),
        // URLs hosts registered that control does not name: shown, never contacted.
        ...(c.reportedStages ?? []).map((r) =>
          el('div', { class: 'stage reported', 'data-reported-stage': r.url }, `${r.url} — reported by ${r.hosts} host${r.hosts === 1 ? '' : 's'}, not configured (not contacted)`),
        ),
      ),
    ),
  );
}

function renderHosts() {
  $('hosts').replaceChildren(
    ...state.hosts.map((h) => {
      const st = hostState(h);
      const run = h.running ? `${h.running.id} ${h.running.version} @${h.running.device}` : 'unknown OS';
      const work = h.work ? `${h.work.id} ${h.work.status}${h.work.step ? ` · ${h.work.step}` : ''}` : h.state;
      return el(
        'div',
        { class: 'host', 'data-host': h.hostId, 'data-state': st, title: `${h.hostId} ${st}` },
        el('div', { class: 'id' }, h.hostId),
        el('div', { class: 'meta' }, `${h.colo} · ${h.ip ?? ''}`),
        el('div', { class: 'meta' }, run),
        el('div', { class: 'meta' }, `${st} · ${work ?? ''} · ${ago(h.lastSeen)}`),
      );
    }),
  );
}

function stepBar(h) {
  return el(
    'div',
    { class: 'steps', title: h.step ?? '' },
    ...STEPS.map((s) => el('span', { class: h.steps?.[s]?.state ?? '', title: `${s}${h.steps?.[s]?.percent != null ? ` ${h.steps[s].percent}%` : ''}` })),
  );
}

function renderRollout(r) {
  const d = state.details.get(r.spec.id);
  const s = r.status;
  const c = s.counts;
  const act = (verb) => async () => {
    const res = await write(`/v1/rollouts/${encodeURIComponent(r.spec.id)}/${verb}`);
    if (res) {
      await safely(refreshRollouts);
      await safely(refreshAudit);
    }
  };
  const finished = FINISHED.includes(s.state);
  const waves = d
    ? r.spec.waves.map((ids, i) => {
        const hs = d.hosts.filter((h) => h.wave === i);
        const done = hs.filter((h) => ['converted', 'failed', 'aborted', 'skipped'].includes(h.status)).length;
        return el(
          'div',
          { class: 'wave', 'data-wave': i },
          el('h4', {}, `wave ${i + 1}${i === 0 && r.spec.plan.canary > 0 ? ' (canary)' : ''} — ${done}/${ids.length} done${s.wave === i && !finished ? ` · ${s.phase}` : ''}`),
          ...hs.map((h) => [
            el(
              'div',
              { class: 'hrow', 'data-rollout-host': h.host, 'data-status': h.status },
              el('span', {}, h.host),
              el('span', {}, h.colo),
              stepBar(h),
              el('span', {}, h.status + (h.rescue ? ` (rescue ${h.rescue.state})` : '')),
            ),
            h.error
              ? el(
                  'div',
                  { class: 'failure', 'data-failure': h.host },
                  `${h.host} failed at ${h.error.step}: ${h.error.code} ${h.error.message}`,
                  el('pre', {}, (h.jobLog?.length ? h.jobLog : h.log).slice(-10).join('\n')),
                )
              : null,
          ]),
        );
      })
    : [];
  const preheat = Object.values(r.preheat ?? {});
  return el(
    'div',
    { class: 'rollout', 'data-rollout': r.spec.id, 'data-state': s.state },
    el(
      'header',
      {},
      el('h3', {}, r.spec.id),
      el('span', { class: 'badge', 'data-state': s.state }, s.state + (s.pauseReason ? ` (${s.pauseReason})` : '')),
      el('span', {}, `${r.spec.base.name}@${r.spec.base.version} → ${r.spec.target.name}@${r.spec.target.version}`),
      el(
        'div',
        { class: 'actions' },
        el('button', { 'data-action': 'pause', disabled: s.state !== 'running', onclick: act('pause') }, 'Pause'),
        el('button', { 'data-action': 'resume', disabled: s.state !== 'paused', onclick: act('resume') }, 'Resume'),
        el('button', { 'data-action': 'abort', disabled: finished || s.state === 'aborting', onclick: act('abort') }, 'Abort'),
      ),
    ),
    el(
      'div',
      { class: 'counts' },
      `wave ${s.wave + 1}/${r.spec.waves.length} · converted ${c.converted}/${r.spec.hostCount} · in flight ${c.inFlight} · failed ${c.failed} (budget ${r.spec.budget}) · aborted ${c.aborted} · skipped ${c.skipped} · max in flight ${r.spec.plan.maxInFlight} (${r.spec.plan.maxInFlightPerColo}/colo) · by ${r.spec.actor}`,
    ),
    preheat.length
      ? el('div', { class: 'preheat' }, `preheat: ${preheat.map((p) => `${p.colo} ${p.state}${p.reason ? ` (${p.reason})` : ''}`).join(' · ')}`)
      : null,
    ...waves,
  );
}

function renderRollouts() {
  const list = state.rollouts;
  $('rollouts').replaceChildren(...(list.length ? list.map(renderRollout) : [el('div', { class: 'counts' }, 'no rollouts yet')]));
}

function renderAudit() {
  $('audit')
    .querySelector('tbody')
    .replaceChildren(
      ...state.audit.map((a) =>
        el('tr', {}, el('td', {}, new Date(a.ts).toLocaleString()), el('td', {}, a.actor), el('td', {}, a.token), el('td', {}, a.action), el('td', {}, a.target)),
      ),
    );
}

// ------------------------------------------------------------------ data

async function refreshRollouts() {
  const { rollouts } = await getJson('/v1/rollouts?limit=10');
  state.rollouts = rollouts;
  // Details (hosts and steps) for the active ones and the most recent few.
  const want = rollouts.filter((r, i) => i < 5 || !FINISHED.includes(r.status.state));
  const details = await Promise.all(want.map((r) => getJson(`/v1/rollouts/${encodeURIComponent(r.spec.id)}`).catch(() => null)));
  state.details = new Map(details.filter(Boolean).map((d) => [d.spec.id, d]));
  renderRollouts();
  renderHosts();
}

async function refreshInventory() {
  const [h, c] = await Promise.all([getJson('/v1/hosts'), getJson('/v1/colos')]);
  state.hosts = h.hosts;
  state.colos = c.colos;
  renderColos();
  renderHosts();
}

async function refreshAudit() {
  state.audit = (await getJson('/v1/audit?limit=15')).entries;
  renderAudit();
}

async function safely(fn) {
  try {
    await fn();
  } catch (err) {
    if (document.body.dataset.auth === 'ok') message(String(err?.message ?? err));
  }
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
    await timed(fn);
    setTimeout(loop, pace(fn, base));
  };
  setTimeout(loop, pace(fn, base));
}

let pending = null;
function soon() {
  if (pending) return;
  pending = setTimeout(async () => {
    await timed(refreshRollouts);
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

async function refreshAll() {
  await timed(refreshInventory);
  await timed(refreshRollouts);
  await safely(refreshAudit);
}

async function showWho() {
  const t = token();
  $('whoami').textContent = '';
  if (!t) return;
  const r = await fetch('/v1/whoami', { headers: authHeaders() });
  const j = r.ok ? await r.json() : null;
  $('whoami').textContent = j ? `as ${j.token}${j.role === 'read' ? ' (read-only)' : ''}` : 'token refused';
}

function setupToken() {
  $('token-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const v = $('token').value.trim();
    if (v) sessionStorage.setItem(TOKEN_KEY, v);
    $('token').value = '';
    message('');
    await showWho();
    await refreshAll();
  });
  $('token-clear').addEventListener('click', async () => {
    sessionStorage.removeItem(TOKEN_KEY);
    await showWho();
  });
}

renderLegend();
setupToken();
void showWho();
void connectEvents();
await refreshAll();
every(refreshInventory, 2000);
every(refreshRollouts, 3000);
