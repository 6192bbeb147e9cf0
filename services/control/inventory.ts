/**
 * Inventory: the hosts agents registered (with their last heartbeat) and, per colo, its hosts
 * and stages. The stages control talks to are only those its own configuration names
 * (`--stages`): each one's live numbers (fills in flight, bytes from upstream, hits) are fetched
 * server-side from its `/v1/fills` and `/metrics`, cached briefly, and never block longer than a
 * short timeout. Stage URLs that agents registered are shown as reported by the hosts and are
 * never contacted: a host must not be able to point control, or its stage token, at a URL of
 * its choosing.
 */
import type { Redis } from 'ioredis';
import { type HostRecord, readHosts } from '../../shared/protocol/index.js';
import { StageClient } from '../stage/client.js';
import { naturalCompare } from './plan.js';
import type { HostResult } from './rollouts/model.js';

/** A host as control shows it: the agent's record plus liveness and control's view of its work. */
export interface HostView extends HostRecord {
  /** Stage URLs the agent registered, if any. */
  stages?: string[];
  /** True when the last heartbeat is older than the configured stale limit. */
  stale: boolean;
  /** The active rollout or host operation that holds this host, as control sees it. */
  work: { kind: 'rollout' | 'op'; id: string; status: string; step: string | null } | null;
  /** Its newest finished result (a rollout or an operation), as control recorded it; filled by the caller. */
  last?: HostResult | null;
}

/** Live numbers of one stage, or the error that prevented reading them. */
export interface StageView {
  url: string;
  /** Where the stage is known from: `flag` (--stages), and `agents` when hosts report it too. */
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
  /** The colo's configured stages (`--stages`), with their live numbers. */
  stages: StageView[];
  /**
   * Stage URLs the colo's hosts registered that control's configuration does not name: shown as
   * reported by the hosts, never contacted (no probe, no preheat).
   */
  reportedStages: { url: string; hosts: number }[];
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

  /** The stage URLs of a colo that control may contact: only those its configuration names (--stages). */
  stagesOf(colo: string): string[] {
    return [...(this.#flagStages.get(colo) ?? [])].map(normalizeStageUrl);
  }

  /** True when `url` is one of the configured stages of `colo` (the only ones control contacts). */
  isConfiguredStage(colo: string, url: string): boolean {
    return this.stagesOf(colo).includes(normalizeStageUrl(url));
  }

  /** Per colo: stage URLs its hosts registered, with how many hosts report each. Never contacted. */
  async #reportedStages(): Promise<Map<string, Map<string, number>>> {
    const m = new Map<string, Map<string, number>>();
    for (const h of await this.records()) {
      const st = (h as HostRecord & { stages?: unknown }).stages;
      if (!Array.isArray(st)) continue;
      for (const u of new Set(st.filter((x): x is string => typeof x === 'string' && /^https?:\/\//.test(x)).map(normalizeStageUrl))) {
        const c = m.get(h.colo) ?? new Map<string, number>();
        c.set(u, (c.get(u) ?? 0) + 1);
        m.set(h.colo, c);
      }
    }
    return m;
  }

  /**
   * Colos with host counts and stage numbers. Only configured stages are read (concurrently, 2 s
   * timeout each); stages that only hosts report are listed in `reportedStages`, not contacted.
   */
  async colos(now = Date.now()): Promise<ColoView[]> {
    const hosts = await this.hosts(undefined, now);
    const reported = await this.#reportedStages();
    const names = new Set<string>([...hosts.map((h) => h.colo), ...this.#flagStages.keys()]);
    const out: ColoView[] = [];
    for (const colo of [...names].sort(naturalCompare)) {
      const hs = hosts.filter((h) => h.colo === colo);
      const rep = reported.get(colo) ?? new Map<string, number>();
      const configured = this.stagesOf(colo);
      const stages = await Promise.all(configured.map((url) => this.#stage(url, rep.has(url) ? ['flag', 'agents'] : ['flag'])));
      const reportedStages = [...rep]
        .filter(([url]) => !configured.includes(url))
        .sort(([a], [b]) => naturalCompare(a, b))
        .map(([url, n]) => ({ url, hosts: n }));
      out.push({ colo, hosts: hs.length, online: hs.filter((h) => !h.stale).length, hostIds: hs.map((h) => h.hostId), stages, reportedStages });
    }
    return out;
  }

  /** One configured stage's numbers, cached for the stage cache time. */
  #stage(url: string, source: string[]): Promise<StageView> {
    const now = Date.now();
    const c = this.#stageCache.get(url);
    if (c && now - c.at < this.#stageCacheMs) return c.view.then((v) => ({ ...v, source }));
    const view = readStage(url, source);
    this.#stageCache.set(url, { at: now, view });
    return view;
  }
}

function normalizeStageUrl(u: string): string {
  return u.replace(/\/+$/, '');
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
