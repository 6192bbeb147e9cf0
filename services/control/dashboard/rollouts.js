// Rollouts: waves with per-host step progress, failures with log tails, pause/resume/abort.

import { write } from './api.js';
import { refreshAudit } from './audit.js';
import { $, el, num } from './dom.js';
import { renderHosts } from './inventory.js';
import { safely } from './page.js';
import { FINISHED, loadRollouts, state } from './state.js';

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

export function renderRollouts() {
  const list = state.rollouts;
  $('rollouts').replaceChildren(...(list.length ? list.map(renderRollout) : [el('div', { class: 'counts' }, 'no rollouts yet')]));
}

export async function refreshRollouts() {
  await loadRollouts();
  renderRollouts();
  renderHosts();
}
