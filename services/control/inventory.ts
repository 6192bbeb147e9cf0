/**
 * Inventory: the hosts agents registered (with their last heartbeat) and, per colo, its hosts
 * and stages. Stages come from the agents' registrations (`stages`) and from `--stages`. Each
 * stage's live numbers (fills in flight, bytes from upstream, hits) are fetched server-side from
 * its `/v1/fills` and `/metrics`, cached briefly, and never block longer than a short timeout.
 */
import type { Redis } from 'ioredis';
import { type HostRecord, readHosts } from '../agent/client.js';
import { StageClient } from '../stage/client.js';
import { naturalCompare } from './plan.js';

/** A host as control shows it: the agent's record plus liveness and control's view of its work. */
export interface HostView extends HostRecord {
  /** Stage URLs the agent registered, if any. */
  stages?: string[];
  /** True when the last heartbeat is older than the configured stale limit. */
  stale: boolean;
  /** The active rollout or host operation that holds this host, as control sees it. */
  work: { kind: 'rollout' | 'op'; id: string; status: string; step: string | null } | null;
}

/** Live numbers of one stage, or the error that prevented reading them. */
export interface StageView {
  url: string;
  /** Where the stage is known from: `flag` (--stages) and/or `agents`. */
  source: string[];
  ok: boolean;
  error?: string;
  fillsInFlight?: number;
  fillsCommitted?: number;
  fillsFailed?: number;
  /** Bytes fetched from upstream (sum of `stage_upstream_bytes_total`). */
  upstreamBytes?: number;
  /** Blob bytes served to clients (`stage_bytes_served_total`). */
  bytesServed?: number;
  hits?: number;
  misses?: number;
  cacheBytes?: number;
  fills?: { digest: string; state: string; bytes: number; size: number | null }[];
}

/** One colo: its hosts by status and its stages. */
export interface ColoView {
  colo: string;
  hosts: number;
  online: number;
  /** Host ids in natural order. */
  hostIds: string[];
  stages: StageView[];
}

/** Sums every sample of a metric in Prometheus text (any labels); undefined when absent. */
export function sumMetric(text: string, name: string): number | undefined {
  let sum: number | undefined;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (rest[0] !== ' ' && rest[0] !== '{') continue;
    const v = Number(line.slice(line.lastIndexOf(' ') + 1));
    if (Number.isFinite(v)) sum = (sum ?? 0) + v;
  }
  return sum;
}

/** Reads hosts and stages; caches stage numbers for `stageCacheMs`. */
export class Inventory {
  readonly #redis: Redis;
  readonly #prefix: string;
  readonly #flagStages: Map<string, string[]>;
  readonly #staleMs: number;
  readonly #stageCache = new Map<string, { at: number; view: Promise<StageView> }>();
  readonly #stageCacheMs: number;
  #hostCache: { at: number; hosts: Promise<HostRecord[]> } | null = null;

  constructor(opts: { redis: Redis; prefix: string; stages: Map<string, string[]>; staleMs: number; stageCacheMs?: number }) {
    this.#redis = opts.redis;
    this.#prefix = opts.prefix;
    this.#flagStages = opts.stages;
    this.#staleMs = opts.staleMs;
    this.#stageCacheMs = opts.stageCacheMs ?? 2000;
  }

  /** Every registered host (cached for 250 ms so that bursts of reads cost one Redis scan; `fresh` reads Redis now). */
  async records(opts: { fresh?: boolean } = {}): Promise<HostRecord[]> {
    const now = Date.now();
    if (opts.fresh || !this.#hostCache || now - this.#hostCache.at > 250) {
      const p = readHosts(this.#redis, this.#prefix);
      this.#hostCache = { at: now, hosts: p };
      p.catch(() => {
        if (this.#hostCache?.hosts === p) this.#hostCache = null;
      });
    }
    return this.#hostCache.hosts;
  }

  /** Hosts, optionally of one colo, sorted by id, with liveness. `work` is filled by the caller. */
  async hosts(colo?: string, now = Date.now()): Promise<HostView[]> {
    const recs = await this.records();
    return recs
      .filter((h) => !colo || h.colo === colo)
      .sort((a, b) => naturalCompare(a.hostId, b.hostId))
      .map((h) => ({ ...h, stale: typeof h.lastSeen !== 'number' || now - h.lastSeen > this.#staleMs, work: null }));
  }

  /** The stage URLs of a colo (from --stages first, then from agent registrations). */
  async stagesOf(colo: string): Promise<string[]> {
    return (await this.#stageSources()).get(colo)?.map((s) => s.url) ?? [];
  }

  async #stageSources(): Promise<Map<string, { url: string; source: string[] }[]>> {
    const m = new Map<string, { url: string; source: string[] }[]>();
    const add = (colo: string, url: string, source: string) => {
      const u = url.replace(/\/+$/, '');
      const list = m.get(colo) ?? [];
      const have = list.find((s) => s.url === u);
      if (have) {
        if (!have.source.includes(source)) have.source.push(source);
      } else list.push({ url: u, source: [source] });
      m.set(colo, list);
    };
    for (const [colo, urls] of this.#flagStages) for (const u of urls) add(colo, u, 'flag');
    for (const h of await this.records()) {
      const st = (h as HostRecord & { stages?: unknown }).stages;
      if (Array.isArray(st)) for (const u of st) if (typeof u === 'string' && /^https?:\/\//.test(u)) add(h.colo, u, 'agents');
    }
    return m;
  }

  /** Colos with host counts and stage numbers (stages fetched concurrently, 2 s timeout each). */
  async colos(now = Date.now()): Promise<ColoView[]> {
    const hosts = await this.hosts(undefined, now);
    const sources = await this.#stageSources();
    const names = new Set<string>([...hosts.map((h) => h.colo), ...sources.keys()]);
    const out: ColoView[] = [];
    for (const colo of [...names].sort(naturalCompare)) {
      const hs = hosts.filter((h) => h.colo === colo);
      const stages = await Promise.all((sources.get(colo) ?? []).map((s) => this.stage(s.url, s.source)));
      out.push({ colo, hosts: hs.length, online: hs.filter((h) => !h.stale).length, hostIds: hs.map((h) => h.hostId), stages });
    }
    return out;
  }

  /** One stage's numbers, cached for the stage cache time. */
  stage(url: string, source: string[] = []): Promise<StageView> {
    const now = Date.now();
    const c = this.#stageCache.get(url);
    if (c && now - c.at < this.#stageCacheMs) return c.view.then((v) => ({ ...v, source }));
    const view = readStage(url, source);
    this.#stageCache.set(url, { at: now, view });
    return view;
  }
}

async function readStage(url: string, source: string[]): Promise<StageView> {
  const client = new StageClient(url, { timeoutMs: 2000 });
  const [fills, metrics] = await Promise.allSettled([client.fills(), client.metricsText()]);
  const v: StageView = { url, source, ok: fills.status === 'fulfilled' || metrics.status === 'fulfilled' };
  if (fills.status === 'fulfilled') {
    const list = fills.value;
    v.fillsInFlight = list.filter((f) => f.state === 'filling').length;
    v.fillsCommitted = list.filter((f) => f.state === 'committed').length;
    v.fillsFailed = list.filter((f) => f.state === 'failed').length;
    v.fills = list.slice(0, 50).map((f) => ({ digest: f.digest, state: f.state, bytes: f.bytes, size: f.size ?? null }));
  }
  if (metrics.status === 'fulfilled') {
    const t = metrics.value;
    v.upstreamBytes = sumMetric(t, 'stage_upstream_bytes_total');
    v.bytesServed = sumMetric(t, 'stage_bytes_served_total');
    v.hits = sumMetric(t, 'stage_hits_total');
    v.misses = sumMetric(t, 'stage_misses_total');
    v.cacheBytes = sumMetric(t, 'stage_cache_bytes');
    v.fillsInFlight ??= sumMetric(t, 'stage_fills_in_flight');
  }
  if (!v.ok) v.error = String((fills as PromiseRejectedResult).reason?.message ?? 'unreachable').slice(0, 300);
  return v;
}
