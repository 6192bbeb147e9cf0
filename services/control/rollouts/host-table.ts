/**
 * Owns a rollout's hosts as control holds them: a Map by host id that keeps, as hosts are set,
 * what every pass of the engine asks of them (counts by status, hosts in flight per colo, hosts
 * not yet terminal per wave, the hosts in flight, being rescued or waiting to be enqueued). A pass
 * then costs what changed, not the rollout's size: at 10,000 hosts, recounting and copying the
 * whole map on every pass was a quarter of control's CPU.
 *
 * Host objects are never modified in place (every change sets a new object), so the index follows
 * every change made through `set`. `HostOverlay` is a scratch copy-on-write view of a table with
 * the same questions answered, for the scheduler to think ahead without copying (waves.ts).
 */
import { type Counts, emptyCounts, type HostState, type HostStatus, IN_FLIGHT_HOST, rescueOpen, TERMINAL_HOST } from './model.js';

/** What the scheduler asks of a rollout's hosts: a table, or an overlay on one. */
export interface HostIndex {
  get(id: string): HostState | undefined;
  set(id: string, h: HostState): unknown;
  readonly size: number;
  /** Hosts with `status`. */
  withStatus(status: HostStatus): Iterable<HostState>;
  /** How many hosts have `status`. */
  count(status: HostStatus): number;
  /** Hosts in flight (queued or running) in `colo`. */
  inFlightIn(colo: string): number;
  /** Hosts of wave `wave` that are not terminal yet. */
  openInWave(wave: number): number;
  /** True while a host is in flight or being rescued. */
  hasWork(): boolean;
}

/** Sums of hosts, added and taken away one host at a time (absolute in a table, deltas in an overlay). */
class Tally {
  readonly status: Record<HostStatus, number> = { pending: 0, queued: 0, running: 0, converted: 0, failed: 0, aborted: 0, skipped: 0 };
  rescueOpen = 0;
  rescued = 0;
  readonly colo = new Map<string, number>();
  readonly wave = new Map<number, number>();

  add(h: HostState, d: 1 | -1): void {
    this.status[h.status] += d;
    if (IN_FLIGHT_HOST.includes(h.status)) this.colo.set(h.colo, (this.colo.get(h.colo) ?? 0) + d);
    if (!TERMINAL_HOST.includes(h.status)) this.wave.set(h.wave, (this.wave.get(h.wave) ?? 0) + d);
    if (rescueOpen(h)) this.rescueOpen += d;
    if (h.rescue?.state === 'done') this.rescued += d;
  }
}

/** True when the host's sequence, or its rescue's, is still to be put in its queue. */
export function needsEnqueue(h: HostState): boolean {
  return (h.status === 'queued' && !h.enqueued) || (h.rescue?.state === 'queued' && !h.rescue.enqueued);
}

/** A rollout's hosts by id, indexed (see the module comment). Iterates in insertion order, like a Map. */
export class HostTable extends Map<string, HostState> implements HostIndex {
  readonly #tally = new Tally();
  readonly #byStatus = new Map<HostStatus, Set<string>>();
  readonly #rescuing = new Set<string>();
  readonly #due = new Set<string>();
  /** Per wave, a position before which no host of the wave is pending (see `pendingFrom`). */
  readonly #pendingFrom = new Map<number, number>();

  constructor(entries?: Iterable<readonly [string, HostState]>) {
    super();
    if (entries) for (const [k, v] of entries) this.set(k, v);
  }

  override set(id: string, h: HostState): this {
    const old = super.get(id);
    if (old) this.#forget(id, old);
    super.set(id, h);
    this.#tally.add(h, 1);
    const ids = this.#byStatus.get(h.status) ?? new Set<string>();
    this.#byStatus.set(h.status, ids);
    ids.add(id);
    if (rescueOpen(h)) this.#rescuing.add(id);
    if (needsEnqueue(h)) this.#due.add(id);
    // A host that becomes pending again voids what was known of where the pending hosts begin.
    if (h.status === 'pending' && old && old.status !== 'pending') this.#pendingFrom.clear();
    return this;
  }

  override delete(id: string): boolean {
    const old = super.get(id);
    if (!old) return false;
    this.#forget(id, old);
    return super.delete(id);
  }

  override clear(): void {
    for (const id of [...this.keys()]) this.delete(id);
  }

  #forget(id: string, h: HostState): void {
    this.#tally.add(h, -1);
    this.#byStatus.get(h.status)?.delete(id);
    this.#rescuing.delete(id);
    this.#due.delete(id);
  }

  *withStatus(status: HostStatus): Iterable<HostState> {
    for (const id of this.#byStatus.get(status) ?? []) yield super.get(id)!;
  }

  count(status: HostStatus): number {
    return this.#tally.status[status];
  }

  inFlightIn(colo: string): number {
    return this.#tally.colo.get(colo) ?? 0;
  }

  openInWave(wave: number): number {
    return this.#tally.wave.get(wave) ?? 0;
  }

  hasWork(): boolean {
    return this.#tally.status.queued + this.#tally.status.running + this.#tally.rescueOpen > 0;
  }

  /** Hosts whose rescue is queued or running. */
  rescueOpenCount(): number {
    return this.#tally.rescueOpen;
  }

  /** The counters of the hosts (a fresh object). */
  counts(): Counts {
    const t = this.#tally;
    return { ...emptyCounts(), ...t.status, inFlight: t.status.queued + t.status.running, rescued: t.rescued };
  }

  /** Hosts in flight or being rescued (what reconcile looks at). */
  *working(): Iterable<HostState> {
    yield* this.withStatus('queued');
    yield* this.withStatus('running');
    for (const id of this.#rescuing) {
      const h = super.get(id)!;
      if (!IN_FLIGHT_HOST.includes(h.status)) yield h;
    }
  }

  /** Hosts whose sequence or rescue sequence is still to be enqueued. */
  due(): HostState[] {
    return [...this.#due].map((id) => super.get(id)!);
  }

  /**
   * A position in `wave` (the wave's host ids, in order) before which no host is pending: the
   * scheduler starts looking for hosts to start there. Hosts leave `pending` for good (only a new
   * rollout has pending hosts), so the position only moves forward; were a host set back to
   * pending, it returns to 0.
   */
  pendingFrom(waveIndex: number, wave: readonly string[]): number {
    let i = this.#pendingFrom.get(waveIndex) ?? 0;
    while (i < wave.length && super.get(wave[i])?.status !== 'pending') i++;
    this.#pendingFrom.set(waveIndex, i);
    return i;
  }
}

/**
 * A scratch view of a table that takes changes without touching it: reads see the changes, the
 * table stays as it was. Costs what is changed in it, not the table's size.
 */
export class HostOverlay implements HostIndex {
  readonly #base: HostTable;
  readonly #changes = new Map<string, HostState>();
  readonly #delta = new Tally();

  constructor(base: HostTable) {
    this.#base = base;
  }

  get size(): number {
    return this.#base.size;
  }

  get(id: string): HostState | undefined {
    return this.#changes.get(id) ?? this.#base.get(id);
  }

  set(id: string, h: HostState): this {
    const old = this.get(id);
    if (!old) throw new Error(`an overlay only changes hosts of its table (${id})`);
    this.#delta.add(old, -1);
    this.#delta.add(h, 1);
    this.#changes.set(id, h);
    return this;
  }

  *withStatus(status: HostStatus): Iterable<HostState> {
    for (const h of this.#base.withStatus(status)) if (!this.#changes.has(h.host)) yield h;
    for (const h of this.#changes.values()) if (h.status === status) yield h;
  }

  count(status: HostStatus): number {
    return this.#base.count(status) + this.#delta.status[status];
  }

  inFlightIn(colo: string): number {
    return this.#base.inFlightIn(colo) + (this.#delta.colo.get(colo) ?? 0);
  }

  openInWave(wave: number): number {
    return this.#base.openInWave(wave) + (this.#delta.wave.get(wave) ?? 0);
  }

  hasWork(): boolean {
    return this.count('queued') + this.count('running') + this.#base.rescueOpenCount() + this.#delta.rescueOpen > 0;
  }

  /** Where pending hosts of `wave` begin in the table (HostTable.pendingFrom); the overlay's own starts come after it. */
  pendingFrom(waveIndex: number, wave: readonly string[]): number {
    return this.#base.pendingFrom(waveIndex, wave);
  }
}
