// A host's colour state and tile label, from what it is doing now, its newest result and what it
// runs.

import { ago } from './dom.js';
import { state } from './state.js';

/** Host colour states, in the order the legend and the per-colo summary show them. */
export const STATES = ['running', 'queued', 'pending', 'failed', 'rescue', 'aborted', 'converted', 'skipped', 'idle', 'stale'];
export const STATE_LABEL = { rescue: 'rescue OS', stale: 'stale (no heartbeat)' };
/**
 * The partition of the rescue OS B (the agent's BASE_DEVICE, services/agent/bundles.ts): a host
 * whose running OS boots from it is on its rescue OS, whatever a rollout said before.
 */
const RESCUE_DEVICE = 'disk2p1';

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
export function hostLook(h) {
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
