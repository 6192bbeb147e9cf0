/**
 * Owns the wave scheduler's decisions: given a rollout, its hosts and the time, what happens
 * next. Pure: `advance` returns intents, plain data that the engine carries out in order, and
 * `applyWaveIntent` is the one place that writes an intent's effect on state (used by `advance`
 * on a scratch copy to think ahead, and by the engine on its live copy).
 *
 * The rules, in the order they apply (plan semantics in plan.ts):
 * - a finished rollout gets nothing;
 * - `aborting`: pending hosts are skipped, hosts in flight are asked (once) to stop at their next
 *   step boundary, nothing new starts; once nothing is in flight or being rescued it is `aborted`;
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
import { failHost } from './host-reducer.js';
import {
  FINISHED_ROLLOUT,
  hasWorkInFlight,
  type HostState,
  IN_FLIGHT_HOST,
  type PreheatColo,
  type RolloutSpec,
  type RolloutStatus,
  TERMINAL_HOST,
} from './model.js';

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
  hosts: Map<string, HostState>;
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
 * Pure: neither argument is modified. A `preheat` intent is always last: carry it out, then ask
 * again (with the preheat state it produced) to go on within the same tick.
 */
export function advance(rollout: WaveRollout, hosts: ReadonlyMap<string, HostState>, now: number, opts: WaveOptions = {}): WaveIntent[] {
  const state: WaveState = { status: { ...rollout.status }, hosts: new Map(hosts) };
  const intents: WaveIntent[] = [];
  const emit = (intent: WaveIntent) => {
    intents.push(intent);
    applyWaveIntent(state, intent, now);
  };
  const s = state.status;
  if (FINISHED_ROLLOUT.includes(s.state)) return intents;

  if (s.state === 'aborting') {
    for (const h of [...state.hosts.values()]) {
      if (h.status === 'pending') emit({ kind: 'skip-host', host: h.host });
      else if (IN_FLIGHT_HOST.includes(h.status) && !h.abortRequested) emit({ kind: 'request-abort', host: h.host });
    }
    if (!hasWorkInFlight(state.hosts.values())) emit({ kind: 'finish-rollout', state: 'aborted' });
    return intents;
  }

  // A host in flight that has said nothing for too long (a dead machine) fails, so that it
  // cannot hold its wave forever. Past the point of no return it gets the rescue sequence.
  const silentMs = opts.hostTimeoutMs ?? 0;
  if (silentMs > 0) {
    for (const h of [...state.hosts.values()]) {
      if (!IN_FLIGHT_HOST.includes(h.status)) continue;
      const since = h.lastEventAt ?? h.queuedAt ?? now;
      if (now - since > silentMs) {
        const message = `no report from the host for ${Math.round((now - since) / 1000)} s`;
        emit({ kind: 'time-out-host', host: h.host, step: h.step ?? CONVERT_STEPS[0], seq: h.seq, message });
      }
    }
  }

  // The failure budget: failures since the last resume beyond the budget pause the rollout.
  const failed = [...state.hosts.values()].filter((h) => h.status === 'failed').length;
  if (s.state === 'running' && failed - s.failuresAtResume > rollout.spec.budget) emit({ kind: 'pause-rollout', reason: 'failure-budget' });

  if (s.state === 'running') advanceWaves(rollout, state, now, emit);

  const hs = [...state.hosts.values()];
  if (s.state !== 'running' || s.phase === 'done') {
    if (hs.every((h) => h.status !== 'pending') && !hasWorkInFlight(hs) && (s.state === 'paused' || s.phase === 'done')) {
      emit({ kind: 'finish-rollout', state: hs.every((h) => h.status === 'converted') ? 'completed' : 'failed' });
    }
  }
  return intents;
}

/** The colos of wave `wave`, in host order, each once. */
export function waveColos(spec: Pick<RolloutSpec, 'waves'>, hosts: ReadonlyMap<string, HostState>, wave: number): string[] {
  return [...new Set(spec.waves[wave].map((id) => hosts.get(id)!.colo))];
}

/** Preheat → rolling → bake → next wave's preheat … → done, as far as `now` allows. */
function advanceWaves(rollout: WaveRollout, state: WaveState, now: number, emit: (i: WaveIntent) => void): void {
  const s = state.status;
  const { spec } = rollout;
  const waveHosts = () => spec.waves[s.wave].map((id) => state.hosts.get(id)!);
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
      startHosts(spec, state, waveHosts(), emit);
      const hs = waveHosts();
      if (!hs.every((h) => TERMINAL_HOST.includes(h.status))) return;
      if (s.wave === 0 && spec.plan.canary > 0 && !s.canaryAccepted && hs.some((h) => h.status !== 'converted')) {
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

/** Starts pending hosts of the wave, in wave order, within the global and per-colo in-flight limits. */
function startHosts(spec: WaveRollout['spec'], state: WaveState, wave: HostState[], emit: (i: WaveIntent) => void): void {
  let inFlight = 0;
  const perColo = new Map<string, number>();
  for (const h of state.hosts.values()) {
    if (!IN_FLIGHT_HOST.includes(h.status)) continue;
    inFlight++;
    perColo.set(h.colo, (perColo.get(h.colo) ?? 0) + 1);
  }
  for (const h of wave) {
    if (inFlight >= spec.plan.maxInFlight) break;
    if (h.status !== 'pending') continue;
    if ((perColo.get(h.colo) ?? 0) >= spec.plan.maxInFlightPerColo) continue;
    emit({ kind: 'enqueue', host: h.host });
    inFlight++;
    perColo.set(h.colo, (perColo.get(h.colo) ?? 0) + 1);
  }
}
