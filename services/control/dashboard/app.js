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
/** Host colour states, in the order the legend and the per-colo summary show them. */
const STATES = ['running', 'queued', 'pending', 'failed', 'rescue', 'aborted', 'converted', 'skipped', 'idle', 'stale'];
const STATE_LABEL = { rescue: 'rescue OS', stale: 'stale (no heartbeat)' };
const FINISHED = ['aborted', 'completed', 'failed'];
const TOKEN_KEY = 'stagecoach.token';
/**
 * The partition of the rescue OS B (the agent's BASE_DEVICE, services/agent/bundles.ts): a host
 * whose running OS boots from it is on its rescue OS, whatever a rollout said before.
 */
const RESCUE_DEVICE = 'disk2p1';
/** Fleets up to this many hosts show every host's tile; larger ones the per-colo summary only, and tiles for the colo drilled into. */
const TILE_LIMIT = 300;
/** Tiles drawn at most for one drilled-down colo (and state filter) until "show all" is clicked. */
const MAX_TILES = 3000;
/** Host operations fetched (the newest; the latest per host colours its tile) and shown. */
const OPS_FETCHED = 500;
const OPS_SHOWN = 25;

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

const num = (n) => n.toLocaleString('en-US');

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

// ------------------------------------------------------------------ page states

/**
 * What the page can show, as `body[data-view]`: `no-token`, `loading` (a token, no data yet),
 * `ready`, `refused` (control refused the token: nothing is shown), `unreachable` (no answer
 * from control: what is shown is marked as old) and `error` (control answered with an error).
 */
class PageError extends Error {
  constructor(kind, text) {
    super(text);
    this.kind = kind;
  }
}

let loaded = false;
let lastOk = null;

function setView(v) {
  document.body.dataset.view = v;
}

/** Shown while no token is given: the page then loads nothing. */
function needToken() {
  document.body.dataset.auth = 'missing';
  setView('no-token');
  message('Paste a control token (read-only or write) at the top right to see the fleet.', 'info');
}

/** The page's error states; every failed read ends here. */
function showProblem(err) {
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
function readOk() {
  lastOk = Date.now();
  document.body.dataset.auth = 'ok';
  const v = document.body.dataset.view;
  if (loaded && v !== 'ready') {
    setView('ready');
    message('');
  }
}

async function getJson(path) {
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

const state = {
  hosts: [],
  colos: [],
  rollouts: [],
  details: new Map(),
  ops: [],
  audit: [],
  /** Per host: its place in the newest rollout (of those whose details were read) that has it. */
  lastRollout: new Map(),
  /** Per host: its newest host operation (of those read). */
  lastOp: new Map(),
  /** The colo drilled into (`#colo=NAME[&state=S]` in the address), with an optional state filter. */
  drill: null,
  showAll: false,
};

/**
 * The newest known result for a host: control's record of it (`last` on /v1/hosts), else what the
 * lists loaded here show (its latest rollout place or operation, whichever is newer).
 */
function newestResult(h) {
  if (h.last) {
    const l = h.last;
    return l.kind === 'op'
      ? { what: `${l.op} ${l.id}`, outcome: l.outcome, error: l.error, kind: l.op }
      : { what: `rollout ${l.id}`, outcome: l.outcome, error: l.error, rescue: l.rescue };
  }
  const r = state.lastRollout.get(h.hostId);
  const op = state.lastOp.get(h.hostId);
  const rAt = r ? (r.h.finishedAt ?? r.h.startedAt ?? r.h.queuedAt ?? r.createdAt) : -1;
  const opAt = op ? (op.finishedAt ?? op.createdAt) : -1;
  if (!r && !op) return null;
  if (op && opAt >= rAt) {
    return { what: `${op.kind} ${op.id}`, outcome: op.status, error: op.error, kind: op.kind };
  }
  return { what: `rollout ${r.id}`, outcome: r.h.status, error: r.h.error, rescue: r.h.rescue };
}

/**
 * A host's colour state and tile label, from what it is doing now and what it runs; first match wins:
 *  1. work control has in progress on it (active rollout or operation): pending, queued, running —
 *     except a rescue control started after a failed rollout step, which is `failed`;
 *  2. `failed`: its newest result (latest rollout place or operation, whichever is newer) failed, or
 *     its agent says its last job failed or was refused — even when an earlier rollout converted it;
 *  3. `aborted`: its newest rollout stopped it;
 *  4. `rescue`: it runs its rescue OS (boots from RESCUE_DEVICE), e.g. after a rescue operation;
 *  5. `converted`: its newest rollout converted it, or a reinstall / install finished;
 *  6. `skipped`, else `idle` (nothing known).
 * `stale` (no heartbeat within control's limit) overrides the colour and keeps the rest as "was …".
 * `rescueOs` is returned on its own so that a failed host on its rescue OS is red and says so.
 */
function hostLook(h) {
  const rescueOs = h.running?.device === RESCUE_DEVICE;
  const n = newestResult(h);
  const w = h.work;
  const failedAt = (e) => (e ? ` at ${e.step}: ${e.code}` : '');
  let st;
  let label;
  if (w?.status?.startsWith('rescue')) {
    st = 'failed';
    label = `failed${failedAt(n?.error)} · rescue ${w.status.slice(7)}`;
  } else if (w) {
    st = w.status === 'pending' || w.status === 'queued' ? w.status : 'running';
    const opKind = w.kind === 'op' ? state.ops.find((o) => o.id === w.id)?.kind : null;
    label = `${st} · ${opKind ?? w.kind} ${w.id}${w.step ? ` · ${w.step}` : ''}`;
  } else if (h.state === 'failed' || h.state === 'refused' || n?.outcome === 'failed') {
    st = 'failed';
    const how = n?.outcome === 'failed' ? `${n.what}${failedAt(n.error)}` : `agent ${h.state}${h.step ? ` at ${h.step}` : ''}${h.rollout ? ` (${h.rollout})` : ''}`;
    label = `failed · ${how}`;
  } else if (n?.outcome === 'aborted') {
    st = 'aborted';
    label = `aborted · ${n.what}`;
  } else if (rescueOs) {
    st = 'rescue';
    label = `on rescue OS${n ? ` · ${n.what} ${n.outcome}` : ''}`;
  } else if (n?.outcome === 'converted' || n?.outcome === 'done') {
    st = 'converted';
    label = `${n.outcome === 'done' ? `${n.kind} done` : 'converted'} · ${n.what}`;
  } else if (n?.outcome === 'skipped') {
    st = 'skipped';
    label = `skipped · ${n.what}`;
  } else {
    st = 'idle';
    label = 'idle';
  }
  if (rescueOs && st !== 'rescue') label += ' · on rescue OS';
  if (h.stale) return { state: 'stale', label: `stale: last seen ${ago(h.lastSeen)} · was ${label}`, rescueOs };
  return { state: st, label, rescueOs };
}

function legendItem(s) {
  return el('span', { 'data-legend': s }, el('i', { class: 'swatch', 'data-state': s }), STATE_LABEL[s] ?? s);
}

function renderLegend() {
  $('legend').replaceChildren(...STATES.map(legendItem), el('span', {}, el('i', { class: 'swatch rescue-os' }), 'purple edge: runs its rescue OS'));
}

function renderColos() {
  $('colos').replaceChildren(
    ...state.colos.map((c) =>
      el(
        'div',
        { class: 'colo', 'data-colo': c.colo },
        el('h3', {}, c.colo),
        el('div', {}, `${num(c.hosts)} hosts, ${num(c.online)} online`),
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

// ------------------------------------------------------------------ hosts: summary and tiles

function readDrill() {
  const p = new URLSearchParams(location.hash.slice(1));
  const colo = p.get('colo');
  const st = p.get('state');
  state.drill = colo ? { colo, state: STATES.includes(st) ? st : null } : null;
  state.showAll = false;
}

function drill(colo, st = null) {
  const p = new URLSearchParams();
  if (colo) p.set('colo', colo);
  if (colo && st) p.set('state', st);
  const h = p.toString();
  if (h) location.hash = h;
  else history.replaceState(null, '', location.pathname + location.search);
  readDrill();
  renderHosts();
}

function tile(h, look) {
  const run = h.running ? `${h.running.id} ${h.running.version} @${h.running.device}` : 'unknown OS';
  return el(
    'div',
    { class: `host${look.rescueOs ? ' rescue-os' : ''}`, 'data-host': h.hostId, 'data-state': look.state, 'data-rescue-os': look.rescueOs ? 'true' : null, title: `${h.hostId}: ${look.label}` },
    el('div', { class: 'id' }, h.hostId),
    el('div', { class: 'meta' }, `${h.colo} · ${h.ip ?? ''}`),
    el('div', { class: 'meta' }, run, look.rescueOs ? el('b', { class: 'os-tag' }, ' rescue OS') : null),
    el('div', { class: 'meta label' }, look.label),
    el('div', { class: 'meta' }, `seen ${ago(h.lastSeen)}`),
  );
}

function countCell(colo, st, n) {
  return el(
    'td',
    { class: 'n', 'data-count': st },
    n ? el('button', { class: 'count', 'data-state': st, title: `show ${colo ?? 'all'} hosts that are ${STATE_LABEL[st] ?? st}`, onclick: () => drill(colo ?? state.colos[0]?.colo, st) }, num(n)) : '·',
  );
}

function renderSummary(looks) {
  const per = new Map();
  const total = Object.fromEntries(STATES.map((s) => [s, 0]));
  for (const h of state.hosts) {
    if (!per.has(h.colo)) per.set(h.colo, { hosts: 0, ...Object.fromEntries(STATES.map((s) => [s, 0])) });
    const c = per.get(h.colo);
    const st = looks.get(h.hostId).state;
    c.hosts++;
    c[st]++;
    total[st]++;
  }
  const names = [...per.keys()].sort((a, b) => a.localeCompare(b, 'en', { numeric: true }));
  const rows = names.map((colo) => {
    const c = per.get(colo);
    const open = state.drill?.colo === colo;
    return el(
      'tr',
      { 'data-summary-colo': colo, class: open ? 'open' : null },
      el('th', {}, el('button', { class: 'drill', 'data-drill': colo, onclick: () => (open ? drill(null) : drill(colo)) }, `${open ? '▾' : '▸'} ${colo}`)),
      el('td', { class: 'n', 'data-count': 'hosts' }, num(c.hosts)),
      ...STATES.map((s) => countCell(colo, s, c[s])),
    );
  });
  $('summary').replaceChildren(
    el('thead', {}, el('tr', {}, el('th', {}, 'colo'), el('th', {}, 'hosts'), ...STATES.map((s) => el('th', { 'data-state': s }, el('i', { class: 'swatch', 'data-state': s }), STATE_LABEL[s] ?? s)))),
    el('tbody', {}, ...rows),
    el(
      'tfoot',
      {},
      el('tr', { 'data-summary-colo': '*', class: 'total' }, el('th', {}, `all ${names.length} colo${names.length === 1 ? '' : 's'}`), el('td', { class: 'n' }, num(state.hosts.length)), ...STATES.map((s) => el('td', { class: 'n', 'data-count': s }, total[s] ? num(total[s]) : '·'))),
    ),
  );
}

function showAllTiles() {
  state.showAll = true;
  renderHosts();
}

function renderHosts() {
  if (!loaded) return;
  const looks = new Map(state.hosts.map((h) => [h.hostId, hostLook(h)]));
  renderSummary(looks);
  const small = state.hosts.length <= TILE_LIMIT;
  const d = state.drill;
  let shown = d ? state.hosts.filter((h) => h.colo === d.colo && (!d.state || looks.get(h.hostId).state === d.state)) : small ? state.hosts : [];
  const matching = shown.length;
  if (!state.showAll && shown.length > MAX_TILES) shown = shown.slice(0, MAX_TILES);
  const head = [];
  if (d) {
    head.push(
      el('span', { class: 'crumb', 'data-drilled': d.colo }, `${d.colo}${d.state ? ` · ${STATE_LABEL[d.state] ?? d.state}` : ''}: ${num(matching)} host${matching === 1 ? '' : 's'}`),
      d.state ? el('button', { class: 'btn', onclick: () => drill(d.colo) }, `all states in ${d.colo}`) : null,
      el('button', { class: 'btn', 'data-action': 'all-colos', onclick: () => drill(null) }, small ? 'whole fleet' : 'back to the summary'),
    );
  } else if (!small) {
    head.push(el('span', { class: 'crumb' }, `${num(state.hosts.length)} hosts: more than ${TILE_LIMIT}, so tiles are shown per colo. Pick a colo or a count above.`));
  }
  if (shown.length < matching) {
    head.push(el('span', { class: 'crumb' }, ` showing ${num(shown.length)} of ${num(matching)}`), el('button', { class: 'btn', onclick: showAllTiles }, 'show all'));
  }
  $('hosts-head').replaceChildren(...head);
  $('hosts').replaceChildren(...shown.map((h) => tile(h, looks.get(h.hostId))));
}

// ------------------------------------------------------------------ operations

/** Steps of an operation as a bar: done before the current one, the current one running or failed. */
function opSteps(op) {
  let failedAt = op.status === 'failed' && op.error ? op.steps.indexOf(op.error.step) : -1;
  if (op.status === 'failed' && failedAt < 0) failedAt = op.seq;
  return op.steps.map((s, i) => {
    let st = '';
    if (op.status === 'done') st = 'completed';
    else if (failedAt >= 0) st = i < failedAt ? 'completed' : i === failedAt ? 'failed' : '';
    else if (op.status === 'running') st = i < op.seq ? 'completed' : i === op.seq ? 'running' : '';
    return { step: s, state: st };
  });
}

function renderOp(op) {
  const steps = opSteps(op);
  const cur = steps.findIndex((x) => x.state === 'running' || x.state === 'failed');
  const progress =
    op.status === 'queued'
      ? `queued: ${op.steps.length} steps, none started`
      : op.status === 'done'
        ? `${op.steps.length}/${op.steps.length} steps done`
        : cur >= 0
          ? `${op.status === 'failed' ? 'stopped at' : 'at'} step ${cur + 1}/${op.steps.length}: ${op.steps[cur]}`
          : `step ${op.seq + 1}/${op.steps.length}`;
  const outcome =
    op.status === 'done'
      ? el('span', { class: 'outcome', 'data-outcome': 'done' }, `done${op.finishedAt ? ` ${ago(op.finishedAt)}` : ''}`)
      : op.status === 'failed'
        ? el('span', { class: 'outcome', 'data-outcome': 'failed' }, `failed at ${op.error?.step ?? '?'}: ${op.error?.code ?? 'unknown'}`)
        : el('span', { class: 'outcome', 'data-outcome': 'pending' }, 'in progress');
  return el(
    'div',
    { class: 'op', 'data-op': op.id, 'data-status': op.status, 'data-kind': op.kind, 'data-op-host': op.host },
    el(
      'div',
      { class: 'op-head' },
      el('span', { class: 'badge', 'data-state': op.status === 'done' ? 'completed' : op.status }, op.status),
      el('b', {}, `${op.kind}${op.bundle ? ` ${op.bundle}` : ''}`),
      el('span', {}, `host ${op.host}`),
      el('span', { class: 'muted' }, `${op.id} · by ${op.actor} · ${ago(op.createdAt)}`),
    ),
    el(
      'div',
      { class: 'op-progress' },
      el('div', { class: 'steps', style: `grid-template-columns: repeat(${steps.length}, 1fr)` }, ...steps.map((s) => el('span', { class: s.state, 'data-step': s.step, title: `${s.step}${s.state ? `: ${s.state}` : ''}` }))),
      el('span', { class: 'progress-text', 'data-progress': op.step ?? '' }, progress),
      outcome,
    ),
    op.status === 'failed' && op.error
      ? el(
          'div',
          { class: 'failure', 'data-op-failure': op.id },
          // Messages often start with their code already.
          `${op.host} ${op.kind} failed at ${op.error.step}: ${op.error.message.startsWith(op.error.code) ? '' : `${op.error.code} `}${op.error.message}`,
          op.log?.length ? el('pre', {}, op.log.slice(-10).join('\n')) : null,
        )
      : null,
  );
}

function renderOps() {
  const active = state.ops.filter((o) => o.status === 'queued' || o.status === 'running');
  const rest = state.ops.filter((o) => !active.includes(o)).slice(0, Math.max(0, OPS_SHOWN - active.length));
  const list = [...active, ...rest];
  $('ops').replaceChildren(...(list.length ? list.map(renderOp) : [el('div', { class: 'counts' }, 'no host operations yet')]));
}

// ------------------------------------------------------------------ rollouts

function stepBar(h) {
  return el(
    'div',
    { class: 'steps', title: h.step ?? '' },
    ...STEPS.map((s) => el('span', { class: h.steps?.[s]?.state ?? '', title: `${s}${h.steps?.[s]?.percent != null ? ` ${h.steps[s].percent}%` : ''}` })),
  );
}

/** Waves of more than this many hosts list only hosts in flight or in trouble (the rest as counts). */
const WAVE_ROWS = 60;

function waveRows(hs) {
  if (hs.length <= WAVE_ROWS) return { rows: hs, hidden: null };
  const notable = hs.filter((h) => !['pending', 'converted', 'skipped'].includes(h.status)).slice(0, WAVE_ROWS);
  const by = {};
  for (const h of hs) if (!notable.includes(h)) by[h.status] = (by[h.status] ?? 0) + 1;
  return { rows: notable, hidden: Object.entries(by).map(([s, n]) => `${s} ${num(n)}`).join(' · ') };
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
        const { rows, hidden } = waveRows(hs);
        return el(
          'div',
          { class: 'wave', 'data-wave': i },
          el('h4', {}, `wave ${i + 1}${i === 0 && r.spec.plan.canary > 0 ? ' (canary)' : ''} — ${done}/${ids.length} done${s.wave === i && !finished ? ` · ${s.phase}` : ''}`),
          ...rows.map((h) => [
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
                  `${h.host} failed at ${h.error.step}: ${h.error.message.startsWith(h.error.code) ? '' : `${h.error.code} `}${h.error.message}`,
                  el('pre', {}, (h.jobLog?.length ? h.jobLog : h.log).slice(-10).join('\n')),
                )
              : null,
          ]),
          hidden ? el('div', { class: 'counts' }, `not listed: ${hidden}`) : null,
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

function renderAll() {
  renderColos();
  renderHosts();
  renderOps();
  renderRollouts();
  renderAudit();
}

// ------------------------------------------------------------------ data

/** Reads rollouts (without rendering): the 10 newest, with details of the active ones and the 5 newest. */
async function loadRollouts() {
  const { rollouts } = await getJson('/v1/rollouts?limit=10');
  const want = rollouts.filter((r, i) => i < 5 || !FINISHED.includes(r.status.state));
  const details = await Promise.all(
    want.map((r) =>
      getJson(`/v1/rollouts/${encodeURIComponent(r.spec.id)}`).catch((err) => {
        // A rollout gone meanwhile is skipped; anything else is the page's problem.
        if (err instanceof PageError && err.kind === 'http') return null;
        throw err;
      }),
    ),
  );
  state.rollouts = rollouts;
  state.details = new Map(details.filter(Boolean).map((d) => [d.spec.id, d]));
  const last = new Map();
  for (const r of rollouts) {
    const d = state.details.get(r.spec.id);
    for (const h of d?.hosts ?? []) if (!last.has(h.host)) last.set(h.host, { id: r.spec.id, createdAt: r.spec.createdAt, h });
  }
  state.lastRollout = last;
}

async function loadOps() {
  const { ops } = await getJson(`/v1/ops?limit=${OPS_FETCHED}`);
  state.ops = ops;
  const last = new Map();
  for (const op of ops) if (!last.has(op.host)) last.set(op.host, op);
  state.lastOp = last;
}

async function loadInventory() {
  const [h, c] = await Promise.all([getJson('/v1/hosts'), getJson('/v1/colos')]);
  state.hosts = h.hosts;
  state.colos = c.colos;
}

async function refreshRollouts() {
  await loadRollouts();
  renderRollouts();
  renderHosts();
}

async function refreshOps() {
  await loadOps();
  renderOps();
  renderHosts();
}

async function refreshInventory() {
  await loadInventory();
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
    showProblem(err);
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
  loaded = true;
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

/** Forgets what was shown (a new or no token): the next data is a first load again. */
function reset() {
  loaded = false;
  lastOk = null;
  setView('loading');
  for (const id of ['colos', 'hosts', 'hosts-head', 'summary', 'ops', 'rollouts']) $(id).replaceChildren();
  $('audit').querySelector('tbody').replaceChildren();
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
