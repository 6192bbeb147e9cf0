// Colos and stages, and hosts: the legend, the per-colo summary with counts by state, drill-down
// (`#colo=NAME[&state=S]`) and the host tiles.

import { $, ago, bytes, el, num } from './dom.js';
import { hostLook, STATE_LABEL, STATES } from './look.js';
import { loaded } from './page.js';
import { loadInventory, state } from './state.js';

/** Fleets up to this many hosts show every host's tile; larger ones the per-colo summary only, and tiles for the colo drilled into. */
const TILE_LIMIT = 300;
/** Tiles drawn at most for one drilled-down colo (and state filter) until "show all" is clicked. */
const MAX_TILES = 3000;

function legendItem(s) {
  return el('span', { 'data-legend': s }, el('i', { class: 'swatch', 'data-state': s }), STATE_LABEL[s] ?? s);
}

export function renderLegend() {
  $('legend').replaceChildren(...STATES.map(legendItem), el('span', {}, el('i', { class: 'swatch rescue-os' }), 'purple edge: runs its rescue OS'));
}

export function renderColos() {
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

export function readDrill() {
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

export function renderHosts() {
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

export async function refreshInventory() {
  await loadInventory();
  renderColos();
  renderHosts();
}
