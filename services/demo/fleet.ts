/**
 * The sim fleet: a whole fleet in one process, owned here and used by the demo launcher
 * (services/demo/demo.ts), the fleet benchmark and the tests: keys, an origin with published
 * bundles, one or more stages per colo, N sim machines per colo, and their agents running
 * in-process (startAgent: a sim reboot restarts the agent instance after the firmware ran).
 * Everything runs the production code; only the machines are simulated. Keys come from
 * shared/keys.ts and publishing from services/origin/publish.ts, the code of `stagecoach keys
 * gen` and `stagecoach publish`.
 *
 * Building blocks (use them one by one, or `startFleet` for all of it):
 * - `makeFleetKeys(dir)`: release, control and fleet age keys (as `stagecoach keys gen`).
 * - `publishBundle(origin, keys, …)`: pack a root filesystem directory (zstd + age to the
 *   fleet), upload the blob, sign and upload the manifest (as `stagecoach publish`).
 * - `publishSampleBundle(...)`: the same for a generated sample root filesystem.
 * - `packBundleFile(keys, …, file)`: the packing alone, into a file, with its signed manifest.
 * - `createSimHosts(root, colos)`: `stagecoach machine init` for every host.
 * - `startFleetAgents(hosts, …)`: one in-process agent per host.
 */
import type { KeyObject } from 'node:crypto';
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { AgentKeys } from '../agent/config.js';
import { initSimMachine } from '../agent/machine/sim.js';
import { type AgentHandle, type AgentRunOptions, startAgent } from '../agent/runtime.js';
import { OriginClient } from '../origin/client.js';
import { startOrigin } from '../origin/main.js';
import { checkPublishRequest, draftManifest, packBlob, publish } from '../origin/publish.js';
import { type RunningStage, startStage } from '../stage/main.js';
import { type Compression, makeSampleRootfs } from '../../shared/bundle/index.js';
import { generateKeys } from '../../shared/keys.js';
import type { Logger } from '../../shared/log.js';
import { silentLogger } from '../../shared/log.js';
import { loadPrivateKey, loadPublicKey, type Manifest, type NetFormat, signManifest } from '../../shared/manifest.js';
import { formatRelayKeys, relayToken } from '../../shared/protocol/index.js';

/** The fleet's keys: files (for CLIs and configs) and loaded objects. */
export interface FleetKeys {
  dir: string;
  files: { releaseKey: string; releasePub: string; controlKey: string; controlPub: string; fleetIdentity: string; fleetRecipient: string };
  releaseKey: KeyObject;
  controlKey: KeyObject;
  /** The agents' keys, loaded. */
  agent: AgentKeys;
  recipient: string;
}

/** Generates the fleet keys into `dir` (which must not hold key files yet). */
export async function makeFleetKeys(dir: string): Promise<FleetKeys> {
  const g = await generateKeys(dir);
  const identity = (await readFile(g.files.fleetIdentity, 'utf8'))
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l.startsWith('AGE-SECRET-KEY-'));
  return {
    dir: g.dir,
    files: g.files,
    releaseKey: loadPrivateKey(await readFile(g.files.releaseKey)),
    controlKey: loadPrivateKey(await readFile(g.files.controlKey)),
    agent: {
      trusted: [loadPublicKey(await readFile(g.files.releasePub))],
      control: loadPublicKey(await readFile(g.files.controlPub)),
      identities: identity,
    },
    recipient: g.recipient,
  };
}

/** What to publish. */
export interface FleetBundleOptions {
  name: string;
  version: string;
  role: 'base' | 'target';
  /** A root filesystem directory. */
  dir: string;
  os: { id: string; version: string; netFormat: NetFormat; family?: 'linux' | 'windows' };
  compression?: Compression;
  /** Encrypt to the fleet (default true). */
  encrypt?: boolean;
  /** Where the packed blob is staged before upload (default: a temp dir next to `dir`). */
  workDir?: string;
  /** Sign with this key instead of the fleet's release key (tests: a foreign key). */
  signingKey?: KeyObject;
}

/** The publish request of `o` (the fleet's own keys unless `o` says otherwise). */
function request(keys: FleetKeys, o: FleetBundleOptions) {
  return {
    path: o.dir,
    name: o.name,
    version: o.version,
    role: o.role,
    compression: o.compression ?? 'zstd',
    osId: o.os.id,
    osVersion: o.os.version,
    netFormat: o.os.netFormat,
    osFamily: o.os.family ?? 'linux',
    recipients: (o.encrypt ?? true) ? [keys.recipient] : [],
    signingKey: o.signingKey ?? keys.releaseKey,
  };
}

/**
 * Packs `o.dir` (tar → compression → age to the fleet) into the file `out` while hashing it,
 * and returns the signed manifest for it, uploading nothing: the packing of `stagecoach
 * publish` (services/origin/publish.ts). Nothing is held in memory.
 */
export async function packBundleFile(keys: FleetKeys, o: FleetBundleOptions, out: string): Promise<Manifest> {
  const r = request(keys, o);
  const { name, version, role, compression, input } = checkPublishRequest(r);
  const { blob } = await packBlob(input, { compression, recipients: r.recipients }, out);
  const os = { id: r.osId, version: r.osVersion, family: r.osFamily, netFormat: r.netFormat };
  return signManifest(draftManifest({ name, version, role, os }, blob), r.signingKey);
}

/**
 * Publishes `o.dir` to the origin as `stagecoach publish` does (the same function), and
 * returns the manifest on the origin.
 */
export async function publishBundle(origin: OriginClient, keys: FleetKeys, o: FleetBundleOptions): Promise<Manifest> {
  const out = await publish({ ...request(keys, o), origin, workDir: o.workDir ?? dirname(o.dir) });
  return out.manifest;
}

/** Builds a sample root filesystem (makeSampleRootfs) under `workDir` and publishes it. */
export async function publishSampleBundle(
  origin: OriginClient,
  keys: FleetKeys,
  o: Omit<FleetBundleOptions, 'dir'> & { workDir: string; sizeMiB?: number; prettyName?: string },
): Promise<Manifest> {
  const dir = join(o.workDir, `rootfs-${o.name}-${o.version}`);
  await mkdir(dir, { recursive: true });
  await makeSampleRootfs(dir, { id: o.os.id, name: o.prettyName ?? o.os.id, version: o.os.version, netFormat: o.os.netFormat, sizeMiB: o.sizeMiB ?? 1 });
  try {
    return await publishBundle(origin, keys, { ...o, dir });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** A colo of the fleet and how many hosts it has. */
export interface ColoSpec {
  name: string;
  hosts: number;
}

/** One sim host. */
export interface SimHost {
  hostId: string;
  colo: string;
  /** The machine directory. */
  dir: string;
  /** Its address with prefix. */
  ip: string;
}

/**
 * Creates the sim machines: host `<colo>-h<n>` (n from 1) in `root/<hostId>`; colo i (from 0)
 * is 10.<i+1>.0.0/16 with gateway 10.<i+1>.0.1, host n is 10.<i+1>.<n div 200>.<n mod 200 + 10>.
 * OS A is `os` (default debian-11).
 */
export async function createSimHosts(root: string, colos: ColoSpec[], opts: { os?: string; concurrency?: number } = {}): Promise<SimHost[]> {
  const hosts: SimHost[] = [];
  for (const [ci, c] of colos.entries()) {
    for (let n = 1; n <= c.hosts; n++) {
      const hostId = `${c.name}-h${n}`;
      hosts.push({ hostId, colo: c.name, dir: join(root, hostId), ip: `10.${ci + 1}.${Math.floor(n / 200)}.${(n % 200) + 10}/16` });
    }
  }
  let next = 0;
  const lane = async () => {
    while (next < hosts.length) {
      const h = hosts[next++];
      const gateway = h.ip.replace(/^(10\.\d+)\..*$/, '$1.0.1');
      await initSimMachine(h.dir, { hostId: h.hostId, ip: h.ip, gateway, os: opts.os ?? 'debian-11' });
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, opts.concurrency ?? 1) }, lane));
  return hosts;
}

/** Options of startFleetAgents. */
export interface FleetAgentOptions {
  redisUrl: string;
  prefix: string;
  keys: FleetKeys;
  /** Stage URLs per colo. */
  stages: Record<string, string[]>;
  origin?: string;
  logger?: Logger;
  lockDurationMs?: number;
  heartbeatMs?: number;
  onReboot?: AgentRunOptions['onReboot'];
  /** Colos whose hosts run in relay mode (through their stages, no Redis); the rest are direct. */
  relayColos?: readonly string[];
  /** The relay secret (relay mode hosts' tokens derive from it). */
  relaySecret?: string;
  /** Relay mode long-poll wait, s. */
  relayWaitSec?: number;
  /** Hosts started at once (default 1: one after the other). */
  startConcurrency?: number;
}

/** The agents of a fleet. */
export interface FleetAgents {
  handles: Map<string, AgentHandle>;
  /** Stops every agent (their jobs stay active, as after a crash). */
  stop(): Promise<void>;
}

/** The agent config of one fleet host (direct or relay mode, as `o` says). */
export function fleetAgentConfig(h: SimHost, o: FleetAgentOptions) {
  const relay = o.relayColos?.includes(h.colo) ?? false;
  return {
    hostId: h.hostId,
    colo: h.colo,
    ...(relay ? { relay: o.stages[h.colo] ?? [], relayTokenFile: '-', relayWaitSec: o.relayWaitSec } : { redis: o.redisUrl }),
    machine: `sim:${h.dir}`,
    stages: o.stages[h.colo] ?? [],
    origin: o.origin,
    trustKey: [o.keys.files.releasePub],
    controlKey: o.keys.files.controlPub,
    identity: o.keys.files.fleetIdentity,
    prefix: o.prefix,
    ...(o.lockDurationMs ? { lockDurationMs: o.lockDurationMs } : {}),
    ...(o.heartbeatMs ? { heartbeatMs: o.heartbeatMs } : {}),
  };
}

/** Starts one in-process agent per host (`startConcurrency` at a time). */
export async function startFleetAgents(hosts: SimHost[], o: FleetAgentOptions): Promise<FleetAgents> {
  const handles = new Map<string, AgentHandle>();
  const startOne = async (h: SimHost) => {
    const relay = o.relayColos?.includes(h.colo) ?? false;
    if (relay && !o.relaySecret) throw new Error('relay colos need a relaySecret');
    const handle = await startAgent(fleetAgentConfig(h, o), {
      logger: o.logger ?? silentLogger,
      keys: o.keys.agent,
      onReboot: o.onReboot,
      ...(relay ? { relayToken: relayToken({ kid: '1', secret: o.relaySecret! }, h.colo, h.hostId) } : {}),
    });
    handles.set(h.hostId, handle);
  };
  try {
    let next = 0;
    const lanes = Array.from({ length: Math.max(1, o.startConcurrency ?? 1) }, async () => {
      while (next < hosts.length) await startOne(hosts[next++]);
    });
    await Promise.all(lanes);
  } catch (err) {
    await Promise.all([...handles.values()].map((h) => h.stop()));
    throw err;
  }
  return {
    handles,
    stop: async () => {
      await Promise.all([...handles.values()].map((h) => h.stop()));
    },
  };
}

/** Options of startFleet. */
export interface FleetOptions {
  /** A directory for everything (created if missing); nothing is written outside it. */
  root: string;
  redisUrl: string;
  /** Redis prefix (default: a fresh `fleet-<random>`). */
  prefix?: string;
  colos: ColoSpec[];
  /** Stages per colo (default 1). */
  stagesPerColo?: number;
  /** Filler size of the sample bundles in MiB (default 1). */
  bundleMiB?: number;
  /** The bundles to publish (defaults: rescue-os@1.0.0 debian 12 base, target-os@2.0.0 ubuntu 24.04 target). */
  base?: { name: string; version: string; os: FleetBundleOptions['os'] };
  target?: { name: string; version: string; os: FleetBundleOptions['os'] };
  /** OS A of the machines (default debian-11). */
  os?: string;
  /** Start the agents (default true). */
  agents?: boolean;
  logger?: Logger;
  lockDurationMs?: number;
  heartbeatMs?: number;
  /** Colos whose stages run the relay (on redisUrl/prefix) and whose hosts run in relay mode. */
  relayColos?: readonly string[];
  /** Relay lock duration / stalled check of the relay stages, ms (tests make them short). */
  relayLockDurationMs?: number;
  relayStalledIntervalMs?: number;
  relayWaitSec?: number;
}

/** A running sim fleet. */
export interface Fleet {
  root: string;
  prefix: string;
  keys: FleetKeys;
  origin: { url: string; client: OriginClient; token: string; close(): Promise<void> };
  /** Stages per colo. */
  stages: Record<string, RunningStage[]>;
  base: Manifest;
  target: Manifest;
  hosts: SimHost[];
  agents: FleetAgents | null;
  /** The fleet relay secret (relay colos' host tokens and their stages' keys derive from it; no stage holds it). */
  relaySecret: string;
  /** Restarts the stage(s) of a colo on the same cache and port (relay state re-adopted from Redis). */
  restartStages(colo: string): Promise<void>;
  /** Starts the agents if they are not running. */
  startAgents(): Promise<FleetAgents>;
  /** Stops agents, stages and origin. Files stay under root. */
  close(): Promise<void>;
}

/** Starts a whole sim fleet (see the top of this file). */
export async function startFleet(o: FleetOptions): Promise<Fleet> {
  const log = o.logger ?? silentLogger;
  const prefix = o.prefix ?? `fleet-${randomBytes(4).toString('hex')}`;
  await mkdir(o.root, { recursive: true });
  const keys = await makeFleetKeys(join(o.root, 'keys'));
  const tokenFile = join(o.root, 'origin.token');
  const token = randomBytes(24).toString('hex');
  await writeFile(tokenFile, `${token}\n`, { mode: 0o600 });
  const closers: (() => Promise<void>)[] = [];
  try {
    const org = await startOrigin({ listen: '127.0.0.1:0', data: join(o.root, 'origin'), tokenFile, trustKey: [keys.files.releasePub] }, { logger: log });
    closers.push(() => org.close());
    const client = new OriginClient(org.url, { token });
    const stages: Record<string, RunningStage[]> = {};
    const relaySecret = randomBytes(32).toString('hex');
    const stageConfig = (colo: string, i: number, listen: string) => ({
      listen,
      upstreams: [org.url],
      cache: join(o.root, 'stages', `${colo}-${i + 1}`),
      colo,
      trustKeys: [keys.files.releasePub],
      logLevel: 'silent',
      // One relay per colo: the colo's first stage.
      ...(o.relayColos?.includes(colo) && i === 0
        ? {
            redis: o.redisUrl,
            prefix,
            // The stage gets its colo's keys only; the fleet secret stays with whoever mints tokens.
            relayKeys: formatRelayKeys([{ kid: '1', secret: relaySecret }], colo),
            ...(o.relayLockDurationMs ? { relayLockDurationMs: o.relayLockDurationMs } : {}),
            ...(o.relayStalledIntervalMs ? { relayStalledIntervalMs: o.relayStalledIntervalMs } : {}),
          }
        : {}),
    });
    for (const c of o.colos) {
      stages[c.name] = [];
      for (let i = 0; i < (o.stagesPerColo ?? 1); i++) {
        const s = await startStage(stageConfig(c.name, i, '127.0.0.1:0'), { log });
        stages[c.name].push(s);
      }
    }
    closers.push(async () => {
      for (const ss of Object.values(stages)) for (const s of ss) await s.close();
    });
    const work = join(o.root, 'publish');
    await mkdir(work, { recursive: true });
    const b = o.base ?? { name: 'rescue-os', version: '1.0.0', os: { id: 'debian', version: '12', netFormat: 'ifupdown' as const } };
    const t = o.target ?? { name: 'target-os', version: '2.0.0', os: { id: 'ubuntu', version: '24.04', netFormat: 'netplan' as const } };
    const base = await publishSampleBundle(client, keys, { ...b, role: 'base', workDir: work, sizeMiB: o.bundleMiB ?? 1 });
    const target = await publishSampleBundle(client, keys, { ...t, role: 'target', workDir: work, sizeMiB: o.bundleMiB ?? 1 });
    const hosts = await createSimHosts(join(o.root, 'machines'), o.colos, { os: o.os });
    const stageUrls = Object.fromEntries(Object.entries(stages).map(([c, ss]) => [c, ss.map((s) => s.url)]));
    const fleet: Fleet = {
      root: o.root,
      prefix,
      keys,
      origin: { url: org.url, client, token, close: () => org.close() },
      stages,
      base,
      target,
      hosts,
      agents: null,
      relaySecret,
      restartStages: async (colo: string) => {
        const ss = stages[colo] ?? [];
        for (const [i, s] of ss.entries()) {
          await s.close();
          ss[i] = await startStage(stageConfig(colo, i, `127.0.0.1:${s.port}`), { log });
        }
      },
      startAgents: async () => {
        fleet.agents ??= await startFleetAgents(hosts, {
          redisUrl: o.redisUrl,
          prefix,
          keys,
          stages: stageUrls,
          origin: org.url,
          logger: log,
          lockDurationMs: o.lockDurationMs,
          heartbeatMs: o.heartbeatMs,
          relayColos: o.relayColos,
          relaySecret,
          relayWaitSec: o.relayWaitSec,
        });
        return fleet.agents;
      },
      close: async () => {
        await fleet.agents?.stop();
        fleet.agents = null;
        for (const c of closers.reverse()) await c().catch(() => {});
      },
    };
    if (o.agents ?? true) await fleet.startAgents();
    return fleet;
  } catch (err) {
    for (const c of closers.reverse()) await c().catch(() => {});
    throw err;
  }
}
