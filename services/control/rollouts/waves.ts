/**
 * Owns the wave scheduler's decisions: given a rollout, its hosts and the time, what happens
 * next. Pure: `advance` returns intents, plain data that the engine carries out in order, and
 * `applyWaveIntent` is the one place that writes an intent's effect on state (used by `advance`
 * on a scratch copy to think ahead, and by the engine on its live copy).
 *
 * The rules, in the order they apply (plan semantics in plan.ts):
 * - a finished rollout gets nothing;
 * - `aborting`: hosts in flight are asked (once) to stop at their next step boundary, pending
 *   hosts are skipped, nothing new starts; once nothing is in flight or being rescued it is
 *   `aborted`;
 * - a host in flight silent for longer than `hostTimeoutMs` fails with SC_ERR_TIMEOUT;
 * - more failures since the last resume than the budget pause a running rollout (`failure-budget`);
 * - while running, wave by wave: preheat (the wave's colos must be settled, else a `preheat`
 *   intent and nothing else), rolling (pending hosts of the wave start within the global and
 *   per-colo in-flight limits; the wave ends once all its hosts are terminal; a canary wave with
 *   a host not converted pauses the rollout, `canary-failed`, unless accepted by a resume),
 *   bake (`bakeSeconds` after a wave ends, the next wave's preheat begins), done;
 * - a paused rollout, or one past its last wave, with no host pending and nothing in flight
 *   finishes: `completed` if every host converted, else `failed`.
 */
import { CONVERT_STEPS } from '../../../shared/protocol/index.js';
import { type HostIndex, HostOverlay, type HostTable } from './host-table.js';
import { failHost } from './host-reducer.js';
import { FINISHED_ROLLOUT, type HostState, IN_FLIGHT_HOST, type PreheatColo, type RolloutSpec, type RolloutStatus } from './model.js';

/** One decision of the scheduler. Host intents name the host; the rest are about the rollout. */
export type WaveIntent =
  /** An aborting rollout's pending host never starts: `skipped`. */
  | { kind: 'skip-host'; host: string }
  /** An aborting rollout's host in flight is asked to stop (the engine sets the agents' abort flag first). */
  | { kind: 'request-abort'; host: string }
  /** A host in flight said nothing for too long: it fails with SC_ERR_TIMEOUT (the engine then sets its abort flag). */
  | { kind: 'time-out-host'; host: string; step: string; seq: number; message: string }
  /** The rollout pauses: `failure-budget`, `canary-failed` (or `operator`, from the API). */
  | { kind: 'pause-rollout'; reason: string }
  /** The wave's colos are not preheated yet: the engine starts or follows their preheat, nothing else happens. */
  | { kind: 'preheat'; wave: number; colos: string[] }
  /** The rollout moves to `phase` at wave `wave`, baking until `bakeUntil` (ms) if set. */
  | { kind: 'phase'; phase: RolloutStatus['phase']; wave: number; bakeUntil: number | null }
  /** The host starts: marked `queued` (persisted first); the engine then enqueues its sequence. */
  | { kind: 'enqueue'; host: string }
  /** The rollout ends in `state`. */
  | { kind: 'finish-rollout'; state: 'completed' | 'failed' | 'aborted' };

/** What the scheduler reads of a rollout. */
export interface WaveRollout {
  spec: Pick<RolloutSpec, 'plan' | 'waves' | 'budget'>;
  status: Readonly<RolloutStatus>;
  preheat: Readonly<Record<string, PreheatColo>>;
}

/** Knobs of the scheduler that are not part of the rollout. */
export interface WaveOptions {
  /** In-flight hosts silent for this long (ms) fail with SC_ERR_TIMEOUT; 0 or unset: never. */
  hostTimeoutMs?: number;
}

/** The state an intent changes: the rollout's status and its hosts by id. */
export interface WaveState {
  status: RolloutStatus;
  hosts: HostIndex;
}

/**
 * Writes one intent's effect on `state` at time `now`: sets fields of `state.status` and replaces
 * changed hosts in `state.hosts` with new objects (host objects are never modified). `preheat`
 * changes nothing here (it is the engine's I/O).
 */
export function applyWaveIntent(state: WaveState, intent: WaveIntent, now: number): void {
  const s = state.status;
  const host = (id: string, change: (h: HostState) => HostState) => {
    const h = state.hosts.get(id);
    if (h) state.hosts.set(id, change(h));
  };
  switch (intent.kind) {
    case 'skip-host':
      host(intent.host, (h) => ({ ...h, status: 'skipped' }));
      break;
    case 'request-abort':
      host(intent.host, (h) => ({ ...h, abortRequested: true }));
      break;
    case 'time-out-host':
      host(intent.host, (h) => failHost(h, { step: intent.step, seq: intent.seq, code: 'SC_ERR_TIMEOUT', message: intent.message, ts: now }));
      break;
    case 'enqueue':
      host(intent.host, (h) => ({ ...h, status: 'queued', queuedAt: now, enqueued: false }));
      break;
    case 'pause-rollout':
      s.state = 'paused';
      s.pauseReason = intent.reason;
      s.updatedAt = now;
      break;
    case 'phase':
      s.phase = intent.phase;
      s.phaseSince = now;
      s.wave = intent.wave;
      s.bakeUntil = intent.bakeUntil;
      break;
    case 'finish-rollout':
      s.state = intent.state;
      s.phase = 'done';
      s.finishedAt = now;
      break;
    case 'preheat':
      break;
  }
}

/**
 * What happens next to `rollout` at time `now` (ms), as intents in the order to carry them out.
 * Pure: neither argument is modified (the intents' effects are thought through on an overlay of
 * `hosts`). A `preheat` intent is always last: carry it out, then ask again (with the preheat
 * state it produced) to go on within the same tick. Costs the hosts that change and the hosts in
 * flight, not the rollout's size.
 */
export function advance(rollout: WaveRollout, hosts: HostTable, now: number, opts: WaveOptions = {}): WaveIntent[] {
  const state: WaveState & { hosts: HostOverlay } = { status: { ...rollout.status }, hosts: new HostOverlay(hosts) };
  const intents: WaveIntent[] = [];
  const emit = (intent: WaveIntent) => {
    intents.push(intent);
    applyWaveIntent(state, intent, now);
  };
  const s = state.status;
  if (FINISHED_ROLLOUT.includes(s.state)) return intents;

  if (s.state === 'aborting') {
    for (const h of inFlight(state.hosts)) if (!h.abortRequested) emit({ kind: 'request-abort', host: h.host });
    for (const h of [...state.hosts.withStatus('pending')]) emit({ kind: 'skip-host', host: h.host });
    if (!state.hosts.hasWork()) emit({ kind: 'finish-rollout', state: 'aborted' });
    return intents;
  }

  // A host in flight that has said nothing for too long (a dead machine) fails, so that it
  // cannot hold its wave forever. Past the point of no return it gets the rescue sequence.
  const silentMs = opts.hostTimeoutMs ?? 0;
  if (silentMs > 0) {
    for (const h of inFlight(state.hosts)) {
      const since = h.lastEventAt ?? h.queuedAt ?? now;
      if (now - since > silentMs) {
        const message = `no report from the host for ${Math.round((now - since) / 1000)} s`;
        emit({ kind: 'time-out-host', host: h.host, step: h.step ?? CONVERT_STEPS[0], seq: h.seq, message });
      }
    }
  }

  // The failure budget: failures since the last resume beyond the budget pause the rollout.
  const failed = state.hosts.count('failed');
  if (s.state === 'running' && failed - s.failuresAtResume > rollout.spec.budget) emit({ kind: 'pause-rollout', reason: 'failure-budget' });

  if (s.state === 'running') advanceWaves(rollout, state, now, emit);

  if (s.state !== 'running' || s.phase === 'done') {
    const hs = state.hosts;
    if (hs.count('pending') === 0 && !hs.hasWork() && (s.state === 'paused' || s.phase === 'done')) {
      emit({ kind: 'finish-rollout', state: hs.count('converted') === hs.size ? 'completed' : 'failed' });
    }
  }
  return intents;
}

/** The hosts in flight, as a list (emitting intents changes the index being read). */
function inFlight(hosts: HostIndex): HostState[] {
  return IN_FLIGHT_HOST.flatMap((st) => [...hosts.withStatus(st)]);
}

/** The colos of wave `wave`, in host order, each once. */
export function waveColos(spec: Pick<RolloutSpec, 'waves'>, hosts: Pick<HostIndex, 'get'>, wave: number): string[] {
  return [...new Set(spec.waves[wave].map((id) => hosts.get(id)!.colo))];
}

/** Preheat → rolling → bake → next wave's preheat … → done, as far as `now` allows. */
function advanceWaves(rollout: WaveRollout, state: WaveState & { hosts: HostOverlay }, now: number, emit: (i: WaveIntent) => void): void {
  const s = state.status;
  const { spec } = rollout;
  for (;;) {
    if (s.phase === 'preheat') {
      const colos = waveColos(spec, state.hosts, s.wave);
      if (!colos.every((c) => rollout.preheat[c] && rollout.preheat[c].state !== 'filling')) {
        emit({ kind: 'preheat', wave: s.wave, colos });
        return;
      }
      emit({ kind: 'phase', phase: 'rolling', wave: s.wave, bakeUntil: s.bakeUntil });
    }
    if (s.phase === 'rolling') {
      startHosts(spec, state, s.wave, emit);
      if (state.hosts.openInWave(s.wave) > 0) return;
      if (s.wave === 0 && spec.plan.canary > 0 && !s.canaryAccepted && spec.waves[0].some((id) => state.hosts.get(id)!.status !== 'converted')) {
        emit({ kind: 'pause-rollout', reason: 'canary-failed' });
        return;
      }
      if (s.wave >= spec.waves.length - 1) {
        emit({ kind: 'phase', phase: 'done', wave: s.wave, bakeUntil: s.bakeUntil });
        return;
      }
      emit({ kind: 'phase', phase: 'bake', wave: s.wave, bakeUntil: now + spec.plan.bakeSeconds * 1000 });
    }
    if (s.phase === 'bake' && now >= (s.bakeUntil ?? 0)) {
      emit({ kind: 'phase', phase: 'preheat', wave: s.wave + 1, bakeUntil: null });
      continue;
    }
    return;
  }
}

/**
 * Starts pending hosts of wave `wave`, in wave order, within the global and per-colo in-flight
 * limits. Looks from where the wave's pending hosts begin, so a wave half done is not walked
 * from its start on every pass.
 */
function startHosts(spec: WaveRollout['spec'], state: WaveState & { hosts: HostOverlay }, wave: number, emit: (i: WaveIntent) => void): void {
  const hosts = state.hosts;
  let inFlight = hosts.count('queued') + hosts.count('running');
  if (inFlight >= spec.plan.maxInFlight) return;
  const ids = spec.waves[wave];
  for (let i = hosts.pendingFrom(wave, ids); i < ids.length && inFlight < spec.plan.maxInFlight; i++) {
    const h = hosts.get(ids[i])!;
    if (h.status !== 'pending' || hosts.inFlightIn(h.colo) >= spec.plan.maxInFlightPerColo) continue;
    emit({ kind: 'enqueue', host: h.host });
    inFlight++;
  }
}
