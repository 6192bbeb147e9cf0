/**
 * A sim fleet driven by a real control plane, for the control fleet tests: origin with real
 * (packed, encrypted) bundles, one stage per colo that accepts preheat with a token, sim
 * machines with in-process agents (services/demo/fleet.ts), and control on port 0, all under a unique
 * Redis prefix that cleanup deletes. Reports are read back from the stream to check limits.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { Redis } from 'ioredis';
import { type ColoSpec, type Fleet, type FleetAgents, startFleet, startFleetAgents } from '../../services/demo/fleet.js';
import { readAllReports, type StepReport } from '../../shared/protocol/index.js';
import { type AgentHandle, startAgent } from '../../services/agent/runtime.js';
import { ControlClient, type RolloutDetail } from '../../services/control/client.js';
import type { ControlConfigInput } from '../../services/control/config.js';
import { type RunningControl, startControl } from '../../services/control/main.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import { type Logger, silentLogger } from '../../shared/log.js';
import { deletePrefix, REDIS_URL, until } from './control-fixture.js';

/** A fleet with its control plane. */
export interface ControlFleet {
  root: string;
  fleet: Fleet;
  stages: Record<string, RunningStage>;
  agents: FleetAgents;
  control: RunningControl;
  client: ControlClient;
  /** A client without a token. */
  anon: ControlClient;
  /** A client with the read-only token. */
  reader: ControlClient;
  token: string;
  readToken: string;
  redis: Redis;
  config: ControlConfigInput;
  /** Stops control and starts a new one on the same Redis state (another port). */
  restartControl(extra?: Partial<ControlConfigInput>): Promise<RunningControl>;
  /** Every report on the stream, in order. */
  reports(): Promise<StepReport[]>;
  /** Waits until the rollout is finished (or `pred` holds), polling the API. */
  waitRollout(id: string, pred?: (r: RolloutDetail) => boolean, ms?: number): Promise<RolloutDetail>;
  cleanup(): Promise<void>;
}

/** Starts origin, stages, sim hosts, agents and control. `redisUrl` defaults to the runner's Redis. */
export async function startControlFleet(o: {
  colos: ColoSpec[];
  redisUrl?: string;
  /** Per-host Redis URL for the agents (ACL users); default `redisUrl`. */
  agentRedisUrl?: (hostId: string) => string;
  prefix?: string;
  control?: Partial<ControlConfigInput>;
  logger?: Logger;
}): Promise<ControlFleet> {
  const root = mkdtempSync(join(tmpdir(), 'sc-cfleet-'));
  const redisUrl = o.redisUrl ?? REDIS_URL;
  const fleet = await startFleet({ root, redisUrl, prefix: o.prefix, colos: o.colos, agents: false, bundleMiB: 1, heartbeatMs: 500 });
  const stageToken = 'preheat-token-for-tests';
  writeFileSync(join(root, 'stage.token'), `${stageToken}\n`);
  const token = 'ops-token-for-tests';
  writeFileSync(join(root, 'control.tokens'), `ops:${token}\n`);
  const readToken = 'viewer-token-for-tests';
  writeFileSync(join(root, 'control.read-tokens'), `viewer:${readToken}\n`);
  const stages: Record<string, RunningStage> = {};
  let agents: FleetAgents | null = null;
  let control: RunningControl | null = null;
  const redis = new Redis(redisUrl, { maxRetriesPerRequest: null });
  redis.on('error', () => {});
  try {
    for (const c of o.colos) {
      stages[c.name] = await startStage(
        {
          listen: '127.0.0.1:0',
          upstreams: [fleet.origin.url],
          cache: join(root, 'cstages', c.name),
          colo: c.name,
          token: stageToken,
          trustKeys: [fleet.keys.files.releasePub],
          logLevel: 'silent',
        },
        { log: silentLogger },
      );
    }
    const stageUrls = Object.fromEntries(Object.entries(stages).map(([c, s]) => [c, [s.url]]));
    if (o.agentRedisUrl) {
      const handles = new Map<string, AgentHandle>();
      const stopAll = async () => {
        await Promise.all([...handles.values()].map((h) => h.stop()));
      };
      agents = { handles, stop: stopAll };
      for (const h of fleet.hosts) {
        const handle = await startAgent(
          {
            hostId: h.hostId,
            colo: h.colo,
            redis: o.agentRedisUrl(h.hostId),
            machine: `sim:${h.dir}`,
            stages: stageUrls[h.colo] ?? [],
            origin: fleet.origin.url,
            trustKey: [fleet.keys.files.releasePub],
            controlKey: fleet.keys.files.controlPub,
            identity: fleet.keys.files.fleetIdentity,
            prefix: fleet.prefix,
            heartbeatMs: 500,
          },
          { logger: o.logger ?? silentLogger, keys: fleet.keys.agent },
        );
        handles.set(h.hostId, handle);
      }
    } else {
      agents = await startFleetAgents(fleet.hosts, {
        redisUrl,
        prefix: fleet.prefix,
        keys: fleet.keys,
        stages: stageUrls,
        origin: fleet.origin.url,
        heartbeatMs: 500,
        logger: o.logger,
      });
    }
    const config: ControlConfigInput = {
      listen: '127.0.0.1:0',
      redis: redisUrl,
      origin: fleet.origin.url,
      tokenFile: join(root, 'control.tokens'),
      readTokenFile: join(root, 'control.read-tokens'),
      signingKey: fleet.keys.files.controlKey,
      prefix: fleet.prefix,
      trustKey: [fleet.keys.files.releasePub],
      stageTokenFile: join(root, 'stage.token'),
      // Control talks only to the stages it is configured with, never to ones agents register.
      stages: Object.entries(stageUrls).flatMap(([colo, urls]) => urls.map((u) => `${colo}=${u}`)),
      tickMs: 50,
      logLevel: 'silent',
      ...o.control,
    };
    control = await startControl(config, { logger: silentLogger });
    // Every agent registered before a rollout selects by colo.
    await until(
      'agents registered',
      async () => {
        const ids = new Set((await new ControlClient(control!.url, { token: readToken }).hosts()).map((h) => h.hostId));
        return fleet.hosts.every((h) => ids.has(h.hostId));
      },
      30_000,
    );
    const cf: ControlFleet = {
      root,
      fleet,
      stages,
      agents,
      control,
      client: new ControlClient(control.url, { token }),
      anon: new ControlClient(control.url),
      reader: new ControlClient(control.url, { token: readToken }),
      token,
      readToken,
      redis,
      config,
      async restartControl(extra = {}) {
        await cf.control.close();
        cf.control = await startControl({ ...config, ...extra }, { logger: silentLogger });
        cf.client = new ControlClient(cf.control.url, { token });
        cf.anon = new ControlClient(cf.control.url);
        cf.reader = new ControlClient(cf.control.url, { token: readToken });
        return cf.control;
      },
      async reports() {
        return readAllReports(redis, fleet.prefix);
      },
      async waitRollout(id, pred, ms = 240_000) {
        return until(
          `rollout ${id}`,
          async () => {
            const r = await cf.client.rollout(id);
            return (pred ? pred(r) : ['completed', 'failed', 'aborted'].includes(r.status.state)) ? r : null;
          },
          ms,
          100,
        );
      },
      async cleanup() {
        await cf.control.close().catch(() => {});
        await cf.agents.stop().catch(() => {});
        for (const s of Object.values(stages)) await s.close().catch(() => {});
        await fleet.close().catch(() => {});
        await deletePrefix(redis, fleet.prefix).catch(() => {});
        redis.disconnect();
        rmSync(root, { recursive: true, force: true });
      },
    };
    return cf;
  } catch (err) {
    await control?.close().catch(() => {});
    await agents?.stop().catch(() => {});
    for (const s of Object.values(stages)) await s.close().catch(() => {});
    await fleet.close().catch(() => {});
    await deletePrefix(redis, fleet.prefix).catch(() => {});
    redis.disconnect();
    rmSync(root, { recursive: true, force: true });
    throw err;
  }
}

/** Per host: when it first started a convert step and when it ended (verify completed or a final failure), by stream order. */
export function hostSpans(reports: StepReport[], rollout: string): Map<string, { start: number; end: number | null }> {
  const m = new Map<string, { start: number; end: number | null }>();
  reports.forEach((r, i) => {
    if (r.rollout !== rollout || r.step === 'rescue') return;
    if (r.event === 'started' && !m.has(r.host)) m.set(r.host, { start: i, end: null });
    const s = m.get(r.host);
    if (!s) return;
    if ((r.event === 'completed' && r.step === 'verify') || r.event === 'refused' || (r.event === 'failed' && !/will retry/.test(r.message ?? ''))) {
      if (s.end === null) s.end = i;
    }
  });
  return m;
}

/** Most hosts in flight at once, overall and per colo, from the spans (in stream order). */
export function maxInFlight(spans: Map<string, { start: number; end: number | null }>, coloOf: (h: string) => string): { global: number; perColo: Record<string, number> } {
  const events: { at: number; d: number; colo: string }[] = [];
  for (const [h, s] of spans) {
    events.push({ at: s.start, d: 1, colo: coloOf(h) });
    events.push({ at: s.end ?? Number.MAX_SAFE_INTEGER, d: -1, colo: coloOf(h) });
  }
  events.sort((a, b) => a.at - b.at || a.d - b.d);
  let cur = 0;
  let global = 0;
  const per: Record<string, number> = {};
  const perMax: Record<string, number> = {};
  for (const e of events) {
    cur += e.d;
    per[e.colo] = (per[e.colo] ?? 0) + e.d;
    global = Math.max(global, cur);
    perMax[e.colo] = Math.max(perMax[e.colo] ?? 0, per[e.colo]);
  }
  return { global, perColo: perMax };
}
