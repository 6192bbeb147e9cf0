// Host operations (rescue, reinstall, install): the active ones and the newest, with their step
// progress, outcome and failure log tail.

import { $, ago, el } from './dom.js';
import { renderHosts } from './inventory.js';
import { loadOps, state } from './state.js';

/** Host operations shown. */
const OPS_SHOWN = 25;

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

export function renderOps() {
  const active = state.ops.filter((o) => o.status === 'queued' || o.status === 'running');
  const rest = state.ops.filter((o) => !active.includes(o)).slice(0, Math.max(0, OPS_SHOWN - active.length));
  const list = [...active, ...rest];
  $('ops').replaceChildren(...(list.length ? list.map(renderOp) : [el('div', { class: 'counts' }, 'no host operations yet')]));
}

export async function refreshOps() {
  await loadOps();
  renderOps();
  renderHosts();
}
