/**
 * Fleet benchmark: a whole fleet converted in one run.
 *
 *   npm run bench -- fleet [--hosts 1000 --colos 10 --bundle-mib 8 --mode relay|direct --agent-procs K --stage-procs S --max-in-flight N --timeout-sec T --window FROM:TO --idle-sec N --cpu-prof DIR]
 *
 * Starts a private redis-server (so INFO is ours alone), an origin (in this process), one stage per
 * colo in S child processes (default one per 50 colos; in relay mode each stage runs its colo's
 * relay), control as a child process (`node services/cli/bin.js control …`), and the sim hosts'
 * agents in K child processes (default one per 5,000 hosts, at least 2; no process per host). Every group's
 * CPU time is its own (/proc/PID/stat, Redis INFO cpu, process.cpuUsage). Publishes
 * B and C, converts every host with a wave plan (canary 1, then 10 %, then the rest), and prints:
 * wall time; hosts converted/failed; origin blob bytes ÷ (bundle bytes × colos) (must be 1.00);
 * stage-to-host bytes; Redis connected clients (before agents, idle agents, peak) and used memory
 * (INFO polled every second); control CPU time per host step; BullMQ jobs per second; agent-process
 * RSS per host; time per step p50/p99 (from the reports stream: started → completed); CPU seconds
 * per process group during the rollout. `--window FROM:TO` measures only while the converted hosts
 * go from FROM to TO, and stops the run there. `--idle-sec N` first measures the idle fleet for N
 * seconds (every host registered and long-polling, none converting): the stages' CPU and requests
 * per second, and the per-step stage CPU less that rate over the rollout's wall time; and, as
 * long, the stages before any agent started, so that their fixed cost and what each waiting host
 * adds are reported apart.
 *
 * The same file is the entry of the agents' child processes (`--child SPEC.json`) and of the
 * stages' (`--stage-child SPEC.json`).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Redis } from 'ioredis';
import { createSimHosts, type FleetKeys, makeFleetKeys, publishSampleBundle, type SimHost, startFleetAgents } from '../services/demo/fleet.js';
import { counterValue } from '../services/demo/demo.js';
import { formatRelayKeys, readAllReports, readHosts } from '../shared/protocol/index.js';
import { ControlClient } from '../services/control/client.js';
import { OriginClient, ReadClient } from '../services/origin/client.js';
import { startOrigin } from '../services/origin/main.js';
import { type RunningStage, startStage } from '../services/stage/main.js';
import { silentLogger } from '../shared/log.js';
import { loadPrivateKey, loadPublicKey } from '../shared/manifest.js';
import { ensureRedis, freePort } from '../shared/redis.js';
import { commandCalls, type SuiteResult, percentile, textTable } from './report.js';

const BIN = fileURLToPath(new URL('../services/cli/bin.js', import.meta.url));
const SELF = fileURLToPath(import.meta.url);
const CLK_TCK = 100;
/** `--cpu-prof DIR`: every child process (stages, control, agents) writes a V8 CPU profile into DIR when it exits. */
let profArgs: string[] = [];

/** Options of benchFleet. */
export interface FleetBenchOptions {
  hosts?: number;
  colos?: number;
  bundleMiB?: number;
  mode?: 'relay' | 'direct';
  /** Agent child processes (default ceil(hosts / 5000), at least 2: one sim process per core). */
  agentProcs?: number;
  /** Stage child processes; the colos are spread over them (default ceil(colos / 50)). */
  stageProcs?: number;
  /** Work dir parent (default the OS temp dir). */
  workDir?: string;
  /** Hosts in flight at once (default min(hosts, 1000): what two shared cores carry without timeouts). */
  maxInFlight?: number;
  /** Rollout deadline, s (default 3600). */
  timeoutSec?: number;
  /** Write V8 CPU profiles of the child processes into this directory. */
  cpuProfDir?: string;
  /**
   * Measure only while the converted hosts go from `from` to `to`, and stop there: the steady
   * state of a large rollout in minutes instead of the whole rollout's hour and a half.
   */
  window?: { from: number; to: number };
  /**
   * Before the rollout, measure the idle fleet for this many seconds: the stages' CPU and
   * requests per second while every host waits (long-polls) and none converts.
   */
  idleSec?: number;
}

/** What benchFleet measured. */
export interface FleetBenchResult {
  mode: string;
  hosts: number;
  colos: number;
  bundleBytes: number;
  setupMs: number;
  registerMs: number;
  wallMs: number;
  converted: number;
  failed: number;
  originRatio: number;
  stageToHostBytes: number;
  /** Upstream resumes of the stages' fills (each costs the bytes in flight). */
  stageResumes: number;
  redisClientsBase: number;
  redisClientsIdle: number;
  redisClientsPerIdleAgent: number;
  redisClientsPeak: number;
  redisMemIdleBytes: number;
  redisMemPeakBytes: number;
  controlCpuMs: number;
  controlCpuMsPerHostStep: number;
  jobsPerSec: number;
  agentRssBytes: number;
  agentRssPerHostBytes: number;
  stepP50Ms: number;
  stepP99Ms: number;
  stepStats: Record<string, { p50: number; p99: number }>;
  /** CPU seconds spent during the rollout, per process group. */
  cpuSec: { control: number; stages: number; agents: number; redis: number; origin: number };
  /** The stages' CPU (their relays and the bytes they serve) per host step, ms. */
  stageCpuMsPerHostStep?: number;
  /** Redis commands run during the rollout (INFO commandstats), per host step, by command: the busiest first. */
  redisCallsPerHostStep?: { total: number; top: [string, number][] };
  /** Requests the stages answered during the rollout (stage_http_requests_total), per host step, by method and route. */
  stageRequestsPerHostStep?: { total: number; byRoute: [string, number][] };
  /** Set when only a window of the rollout was measured: converted hosts at its start and end. */
  window?: { from: number; to: number };
  /** Set with `idleSec`: the idle fleet before the rollout, per second (CPU in ms per second). */
  idle?: {
    sec: number;
    stagesCpuMsPerSec: number;
    /**
     * The same stages over the same time before any agent started (no host registered or
     * polling): their fixed cost, whatever the hosts. Absent from runs recorded before it was
     * measured (`--from-json`).
     */
    stagesNoHostsCpuMsPerSec?: number;
    /** stagesNoHostsCpuMsPerSec per stage. */
    stageFixedCpuMsPerSec?: number;
    /** What the hosts add to the stages' idle rate, per host: (stagesCpuMsPerSec − stagesNoHostsCpuMsPerSec) ÷ hosts. */
    stagesCpuMsPerSecPerHost?: number;
    controlCpuMsPerSec: number;
    redisCpuMsPerSec: number;
    stageRequestsPerSec: [string, number][];
    /** Redis commands per second (INFO commandstats), the busiest first. */
    redisCallsPerSec: [string, number][];
  };
  /**
   * With `idle`: the stages' CPU per host step less what the idle fleet's rate would have cost
   * over the same wall time (the waiting hosts' polls and the relays' own timers), ms.
   */
  stageCpuMsPerHostStepNetOfIdle?: number;
}


function procStat(pid: number): { cpuTicks: number; rssBytes: number } | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // fields after ")" start at index 3 (state): utime=14, stime=15, rss=24 (1-based in proc(5)).
    const utime = Number(f[14 - 3]);
    const stime = Number(f[15 - 3]);
    const rssPages = Number(f[24 - 3]);
    return { cpuTicks: utime + stime, rssBytes: rssPages * 4096 };
  } catch {
    return null;
  }
}


function info(text: string, key: string): number {
  const m = new RegExp(`^${key}:(\\d+)`, 'm').exec(text);
  return m ? Number(m[1]) : 0;
}

const say = (l: string) => process.stderr.write(`${l}\n`);

interface ChildSpec {
  hosts: SimHost[];
  redisUrl: string;
  prefix: string;
  keysDir: string;
  keyFiles: FleetKeys['files'];
  stages: Record<string, string[]>;
  origin: string;
  relayColos: string[];
  relaySecret: string;
}

/** What a stage child process runs: the stages (and relays) of `colos`. */
interface StageChildSpec {
  colos: string[];
  root: string;
  origin: string;
  trustKey: string;
  token: string;
  relay: { redisUrl: string; prefix: string; relaySecret: string } | null;
}

/**
 * Spawns this file as a child process with `flag FILE` (FILE holding `spec` as JSON); resolves
 * with the child and the JSON the child printed after `ready ` on stdout.
 */
async function startChild<T>(flag: string, spec: unknown, file: string): Promise<{ child: ChildProcess; info: T }> {
  await writeFile(file, JSON.stringify(spec));
  const c = spawn(process.execPath, [...profArgs, '--max-old-space-size=8192', '--import', 'tsx', SELF, flag, file], { stdio: ['ignore', 'pipe', 'inherit'] });
  const info = await new Promise<T>((res, rej) => {
    let out = '';
    const onData = (d: Buffer) => {
      out += d.toString();
      const m = /^ready (.*)$/m.exec(out);
      if (m) {
        c.stdout!.off('data', onData);
        c.off('exit', onExit);
        res(JSON.parse(m[1]) as T);
      }
    };
    const onExit = (code: number | null) => rej(new Error(`${flag} process exited (${code}) before it was ready`));
    c.stdout!.on('data', onData);
    c.once('exit', onExit);
  });
  c.stdout!.resume();
  return { child: c, info };
}

/** Starts agent child processes, each running a slice of `spec.hosts`; resolves when all report ready. */
async function startAgentProcs(spec: ChildSpec, procs: number, dir: string): Promise<ChildProcess[]> {
  const per = Math.ceil(spec.hosts.length / procs);
  const started: Promise<{ child: ChildProcess }>[] = [];
  for (let i = 0; i < procs; i++) {
    const slice = spec.hosts.slice(i * per, (i + 1) * per);
    if (slice.length === 0) break;
    started.push(startChild('--child', { ...spec, hosts: slice }, join(dir, `agents-${i}.json`)));
  }
  return (await Promise.all(started)).map((x) => x.child);
}

/** Starts stage child processes for `colos`; resolves with them and each colo's stage URL. */
async function startStageProcs(spec: Omit<StageChildSpec, 'colos'>, colos: string[], procs: number, dir: string) {
  const per = Math.ceil(colos.length / procs);
  const started: Promise<{ child: ChildProcess; info: Record<string, string> }>[] = [];
  for (let i = 0; i < procs; i++) {
    const slice = colos.slice(i * per, (i + 1) * per);
    if (slice.length === 0) break;
    started.push(startChild<Record<string, string>>('--stage-child', { ...spec, colos: slice }, join(dir, `stages-${i}.json`)));
  }
  const all = await Promise.all(started);
  return { children: all.map((x) => x.child), urls: Object.assign({}, ...all.map((x) => x.info)) as Record<string, string> };
}

/** Starts the stages of `spec.colos` in this process (see StageChildSpec). */
async function startStages(spec: StageChildSpec): Promise<RunningStage[]> {
  const stages: RunningStage[] = [];
  for (const c of spec.colos) {
    stages.push(
      await startStage(
        {
          listen: '127.0.0.1:0',
          upstreams: [spec.origin],
          cache: join(spec.root, 'stages', c),
          colo: c,
          trustKeys: [spec.trustKey],
          token: spec.token,
          logLevel: 'silent',
          // Everything shares two cores here: a 15 s upstream silence is load, not a dead origin,
          // and each spurious resume costs the bytes already in flight (origin ratio > 1).
          idleTimeoutMs: 120_000,
          ...(spec.relay ? { redis: spec.relay.redisUrl, prefix: spec.relay.prefix, relayKeys: formatRelayKeys([{ kid: '1', secret: spec.relay.relaySecret }], c) } : {}),
        },
        { log: silentLogger },
      ),
    );
  }
  return stages;
}

async function stopChild(c: ChildProcess): Promise<void> {
  if (c.exitCode !== null || c.signalCode !== null) return;
  const gone = new Promise((r) => c.once('exit', r));
  c.kill('SIGTERM');
  const t = setTimeout(() => c.kill('SIGKILL'), 20_000);
  await gone;
  clearTimeout(t);
}

/** Runs the fleet benchmark (see the top of this file). */
export async function benchFleet(o: FleetBenchOptions = {}): Promise<FleetBenchResult> {
  const nHosts = o.hosts ?? 1000;
  const nColos = Math.min(o.colos ?? 10, nHosts);
  const mode = o.mode ?? 'relay';
  const procs = o.agentProcs ?? Math.min(nHosts, Math.max(2, Math.ceil(nHosts / 5000)));
  const root = await mkdtemp(join(o.workDir ?? tmpdir(), 'sc-fleet-bench-'));
  profArgs = o.cpuProfDir ? ['--cpu-prof', '--cpu-prof-dir', o.cpuProfDir] : [];
  const cleanup: (() => Promise<void>)[] = [];
  const t0 = Date.now();
  try {
    await mkdir(join(root, 'redis'), { recursive: true });
    const redisH = await ensureRedis(undefined, { dir: join(root, 'redis') });
    cleanup.push(() => redisH.stop());
    const redis = new Redis(redisH.url, { maxRetriesPerRequest: null, connectionName: 'bench' });
    cleanup.push(async () => void redis.disconnect());
    await redis.config('SET', 'maxclients', '19000').catch(() => {});
    const prefix = 'bench';
    const keys = await makeFleetKeys(join(root, 'keys'));
    const tokenFile = join(root, 'origin.token');
    await writeFile(tokenFile, 'bench-origin-token\n', { mode: 0o600 });
    const stageTokenFile = join(root, 'stage.token');
    await writeFile(stageTokenFile, 'bench-stage-token\n', { mode: 0o600 });
    const controlTokenFile = join(root, 'control.tokens');
    await writeFile(controlTokenFile, 'bench:bench-control-token\n', { mode: 0o600 });
    const relaySecret = 'bench-relay-secret-0123456789abcdef';

    const origin = await startOrigin({ listen: '127.0.0.1:0', data: join(root, 'origin'), tokenFile, trustKey: [keys.files.releasePub] }, { logger: silentLogger });
    cleanup.push(() => origin.close());
    const colos = Array.from({ length: nColos }, (_, i) => `c${String(i + 1).padStart(3, '0')}`);
    // Stages (and their relays) in child processes, a few colos each, so that origin, stages,
    // control and agents are separate processes and their CPU time can be told apart.
    const stageProcs = await startStageProcs(
      {
        root,
        origin: origin.url,
        trustKey: keys.files.releasePub,
        token: 'bench-stage-token',
        relay: mode === 'relay' ? { redisUrl: redisH.url, prefix, relaySecret } : null,
      },
      colos,
      Math.min(nColos, o.stageProcs ?? Math.max(1, Math.ceil(nColos / 50))),
      root,
    );
    cleanup.push(async () => {
      await Promise.all(stageProcs.children.map(stopChild));
    });
    const stageUrl = stageProcs.urls;
    const client = new OriginClient(origin.url, { token: 'bench-origin-token' });
    const work = join(root, 'publish');
    await mkdir(work, { recursive: true });
    const bMiB = o.bundleMiB ?? 8;
    const base = await publishSampleBundle(client, keys, {
      name: 'rescue-os', version: '1.0.0', role: 'base', workDir: work, sizeMiB: bMiB,
      os: { id: 'debian', version: '12', netFormat: 'ifupdown' },
    });
    const target = await publishSampleBundle(client, keys, {
      name: 'target-os', version: '2.0.0', role: 'target', workDir: work, sizeMiB: bMiB,
      os: { id: 'ubuntu', version: '24.04', netFormat: 'netplan' },
    });
    const bundleBytes = base.blob.size + target.blob.size;
    const per = Math.floor(nHosts / nColos);
    const coloSpecs = colos.map((name, i) => ({ name, hosts: per + (i < nHosts % nColos ? 1 : 0) }));
    const tHosts = Date.now();
    const hosts = await createSimHosts(join(root, 'machines'), coloSpecs, { concurrency: 16 });
    say(`sim hosts: ${hosts.length} in ${Date.now() - tHosts} ms`);

    // Control, as a child process.
    const cport = await freePort();
    const control = spawn(
      process.execPath,
      [
        ...profArgs,
        BIN, 'control', '--listen', `127.0.0.1:${cport}`, '--redis', redisH.url, '--origin', origin.url,
        '--token-file', controlTokenFile, '--signing-key', keys.files.controlKey, '--prefix', prefix,
        '--stage-token-file', stageTokenFile, '--trust-key', keys.files.releasePub,
        '--stages', colos.map((c) => `${c}=${stageUrl[c]}`).join(','), '--log-level', 'warn',
      ],
      { stdio: ['ignore', 'ignore', 'inherit'] },
    );
    cleanup.push(() => stopChild(control));
    const api = new ControlClient(`http://127.0.0.1:${cport}`, { token: 'bench-control-token', actor: 'bench' });
    for (let deadline = Date.now() + 30_000; ; ) {
      if (await fetch(`http://127.0.0.1:${cport}/healthz`).then((r) => r.ok).catch(() => false)) break;
      if (Date.now() > deadline || control.exitCode !== null) throw new Error('control did not start');
      await new Promise((r) => setTimeout(r, 100));
    }
    const clientsBase = info(await redis.info('clients'), 'connected_clients');
    const stagesCpuSec = () => stageProcs.children.reduce((a, c) => a + (procStat(c.pid!)?.cpuTicks ?? 0), 0) / CLK_TCK;
    // With `idleSec`: the stages with no host at all, for as long as the idle fleet is measured below.
    let noHosts = 0;
    if (o.idleSec) {
      await new Promise((r) => setTimeout(r, 2000));
      const [c0, t0] = [stagesCpuSec(), Date.now()];
      await new Promise((r) => setTimeout(r, o.idleSec! * 1000));
      const sec = (Date.now() - t0) / 1000;
      noHosts = Math.round((((stagesCpuSec() - c0) * 1000) / sec) * 100) / 100;
      say(`stages with no hosts over ${sec.toFixed(1)} s: ${noHosts} ms CPU/s`);
    }

    // Agents, in a few child processes.
    const tAgents = Date.now();
    const children = await startAgentProcs(
      {
        hosts,
        redisUrl: redisH.url,
        prefix,
        keysDir: keys.dir,
        keyFiles: keys.files,
        stages: Object.fromEntries(colos.map((c) => [c, [stageUrl[c]]])),
        origin: origin.url,
        relayColos: mode === 'relay' ? colos : [],
        relaySecret,
      },
      procs,
      root,
    );
    cleanup.push(async () => {
      await Promise.all(children.map(stopChild));
    });
    for (let deadline = Date.now() + 600_000; ; ) {
      if ((await readHosts(redis, prefix)).length >= nHosts) break;
      if (Date.now() > deadline) throw new Error('agents did not register');
      await new Promise((r) => setTimeout(r, 250));
    }
    const registerMs = Date.now() - tAgents;
    await new Promise((r) => setTimeout(r, 2000)); // idle
    const cpuNow = async () => {
      const ticks = (cs: ChildProcess[]) => cs.reduce((a, c) => a + (procStat(c.pid!)?.cpuTicks ?? 0), 0) / CLK_TCK;
      const r = await redis.info('cpu');
      const f = (k: string) => Number(new RegExp(`^${k}:([\\d.]+)`, 'm').exec(r)?.[1] ?? 0);
      const self = process.cpuUsage();
      return {
        control: ticks([control]),
        stages: ticks(stageProcs.children),
        agents: ticks(children),
        redis: f('used_cpu_sys') + f('used_cpu_user'),
        origin: (self.user + self.system) / 1e6,
      };
    };
    /** Requests the stages answered so far, by method and route. */
    const stageRequests = async () => {
      const out = new Map<string, number>();
      for (const url of Object.values(stageUrl)) {
        const text = await new ReadClient(url).metricsText();
        for (const m of text.matchAll(/^stage_http_requests_total\{([^}]*)\} (\d+)/gm)) {
          const label = (l: string) => new RegExp(`${l}="([^"]*)"`).exec(m[1])?.[1] ?? '?';
          const k = `${label('method')} ${label('route')}`;
          out.set(k, (out.get(k) ?? 0) + Number(m[2]));
        }
      }
      return out;
    };
    // The idle fleet: every host registered, none converting, each waiting host long-polling its
    // relay. What the stages spend per second here, they spend all through a rollout on the hosts
    // that wait for their wave, whatever the rate of steps.
    let idle: FleetBenchResult['idle'];
    if (o.idleSec) {
      // The benchmark's own reads of the stages' /metrics (about 10 ms of stage CPU each) stay outside.
      const q0 = await stageRequests();
      const [c0, k0] = [await cpuNow(), commandCalls(await redis.info('commandstats'))];
      const t = Date.now();
      await new Promise((r) => setTimeout(r, o.idleSec! * 1000));
      const [c1, k1] = [await cpuNow(), commandCalls(await redis.info('commandstats'))];
      const sec = (Date.now() - t) / 1000;
      const q1 = await stageRequests();
      const perSec = (n: number) => Math.round((n / sec) * 100) / 100;
      const stagesCpuMsPerSec = perSec((c1.stages - c0.stages) * 1000);
      const fixed = noHosts;
      idle = {
        sec: Math.round(sec * 10) / 10,
        stagesCpuMsPerSec,
        stagesNoHostsCpuMsPerSec: fixed,
        stageFixedCpuMsPerSec: Math.round((fixed / colos.length) * 100) / 100,
        stagesCpuMsPerSecPerHost: Math.round(((stagesCpuMsPerSec - fixed) / nHosts) * 1000) / 1000,
        controlCpuMsPerSec: perSec((c1.control - c0.control) * 1000),
        redisCpuMsPerSec: perSec((c1.redis - c0.redis) * 1000),
        stageRequestsPerSec: [...q1].map(([k, n]): [string, number] => [k, perSec(n - (q0.get(k) ?? 0))]).filter(([k, n]) => n > 0 && k !== 'GET /metrics').sort((a, b) => b[1] - a[1]),
        redisCallsPerSec: [...k1].filter(([c]) => c !== 'info').map(([c, n]): [string, number] => [c, perSec(n - (k0.get(c) ?? 0))]).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1]),
      };
      say(`idle fleet over ${idle.sec} s: stages ${idle.stagesCpuMsPerSec} ms CPU/s, control ${idle.controlCpuMsPerSec} ms/s; requests/s ${JSON.stringify(idle.stageRequestsPerSec)}`);
    }
    const idleInfo = await redis.info();

    const clientsIdle = info(idleInfo, 'connected_clients');
    const memIdle = info(idleInfo, 'used_memory');
    const rssIdle = children.reduce((s, c) => s + (procStat(c.pid!)?.rssBytes ?? 0), 0);
    say(`agents: ${nHosts} registered in ${registerMs} ms; redis clients ${clientsBase} → ${clientsIdle}; agent RSS ${(rssIdle / 2 ** 20).toFixed(0)} MiB`);
    const setupMs = Date.now() - t0;

    // The rollout.
    let clientsPeak = clientsIdle;
    let memPeak = memIdle;
    let rssPeak = rssIdle;
    let requests0 = await stageRequests();
    let cpuStart = await cpuNow();
    let calls0 = commandCalls(await redis.info('commandstats'));
    let cpu0 = procStat(control.pid!)?.cpuTicks ?? 0;
    let tStart = Date.now();
    const tCreate = tStart;
    let windowFrom: number | null = null;
    const rollout = await api.createRollout({
      base: 'rescue-os@1.0.0',
      target: 'target-os@2.0.0',
      colos,
      plan: { canary: 1, waves: ['10%', '100%'], maxInFlight: o.maxInFlight ?? Math.min(nHosts, 1000), failureBudget: '1%' },
    });
    const sampler = setInterval(() => {
      redis.info().then(
        (t) => {
          clientsPeak = Math.max(clientsPeak, info(t, 'connected_clients'));
          memPeak = Math.max(memPeak, info(t, 'used_memory'));
        },
        () => {},
      );
      rssPeak = Math.max(rssPeak, children.reduce((s, c) => s + (procStat(c.pid!)?.rssBytes ?? 0), 0));
    }, 1000);
    // Followed through the rollout list (no per-host entries): the detail of a 10,000-host
    // rollout is megabytes, and fetching it every second would be the benchmark measuring itself.
    const summary = async () => (await api.rollouts(20)).find((r) => r.spec.id === rollout.spec.id) ?? (await api.rollout(rollout.spec.id));
    let view = await summary();
    let lastSay = 0;
    for (const deadline = Date.now() + (o.timeoutSec ?? 3600) * 1000; ; ) {
      view = await summary();
      const st = view.status;
      if (Date.now() - lastSay > 10_000) {
        lastSay = Date.now();
        say(`  ${((Date.now() - tCreate) / 1000).toFixed(0)} s: ${st.state} wave ${st.wave} converted ${st.counts.converted} failed ${st.counts.failed} in flight ${st.counts.inFlight}`);
      }
      if (o.window && windowFrom === null && st.counts.converted >= o.window.from) {
        // The window opens: every count starts again from here.
        windowFrom = st.counts.converted;
        requests0 = await stageRequests();
        [cpuStart, calls0] = [await cpuNow(), commandCalls(await redis.info('commandstats'))];
        cpu0 = procStat(control.pid!)?.cpuTicks ?? 0;
        tStart = Date.now();
        say(`  window opens at ${windowFrom} converted`);
      }
      if (o.window && windowFrom !== null && st.counts.converted >= o.window.to) break;
      if (['completed', 'failed', 'aborted', 'paused'].includes(st.state)) break;
      if (Date.now() > deadline) break;
      await new Promise((r) => setTimeout(r, 1000));
    }
    const wallMs = Date.now() - tStart;
    clearInterval(sampler);
    const cpuMs = (((procStat(control.pid!)?.cpuTicks ?? cpu0) - cpu0) / CLK_TCK) * 1000;
    const cpuEnd = await cpuNow();
    const calls1 = commandCalls(await redis.info('commandstats'));
    const cpuSec = Object.fromEntries(
      Object.entries(cpuEnd).map(([k, v]) => [k, Math.round((v - cpuStart[k as keyof typeof cpuStart]) * 10) / 10]),
    ) as FleetBenchResult['cpuSec'];
    const converted = view.status.counts.converted;
    if (o.window && windowFrom === null) throw new Error(`the rollout ended before ${o.window.from} hosts converted: no window measured`);
    const failed = view.status.counts.failed;

    const originText = await new ReadClient(origin.url).metricsText();
    const egress = counterValue(originText, 'origin_blob_bytes_out_total');
    let stageToHost = 0;
    let resumes = 0;
    const requests = await stageRequests();
    for (const [k, n] of requests0) requests.set(k, (requests.get(k) ?? 0) - n);
    for (const url of Object.values(stageUrl)) {
      const text = await new ReadClient(url).metricsText();
      stageToHost += counterValue(text, 'stage_bytes_served_total');
      resumes += counterValue(text, 'stage_resumes_total');
    }

    // Step times from the report streams.
    const started = new Map<string, number>();
    const perStep = new Map<string, number[]>();
    const tEnd = tStart + wallMs;
    for (const r of await readAllReports(redis, prefix)) {
      // In a window, the steps that ended inside it.
      if (o.window && (r.ts < tStart || r.ts > tEnd) && r.event === 'completed') continue;
      const k = `${r.host}|${r.rollout}|${r.seq}`;
      if (r.event === 'started' && !started.has(k)) started.set(k, r.ts);
      if (r.event === 'completed' && started.has(k)) {
        const arr = perStep.get(r.step) ?? [];
        arr.push(r.ts - started.get(k)!);
        perStep.set(r.step, arr);
      }
    }
    const all = [...perStep.values()].flat();
    const steps = all.length;
    const stepStats = Object.fromEntries([...perStep].map(([k, v]) => [k, { p50: percentile(v, 50), p99: percentile(v, 99) }]));
    // (The bench's own INFO polling and its report read at the end are not rollout work: INFO is left out.)
    const perStepCalls = [...calls1]
      .filter(([c]) => c !== 'info')
      .map(([c, n]): [string, number] => [c, steps ? Math.round(((n - (calls0.get(c) ?? 0)) / steps) * 100) / 100 : 0])
      .filter(([, n]) => n > 0)
      .sort((a, b) => b[1] - a[1]);
    return {
      mode,
      hosts: nHosts,
      colos: nColos,
      bundleBytes,
      setupMs,
      registerMs,
      wallMs,
      converted,
      failed,
      originRatio: Math.round((egress / (bundleBytes * nColos)) * 100) / 100,
      stageToHostBytes: stageToHost,
      stageResumes: resumes,
      redisClientsBase: clientsBase,
      redisClientsIdle: clientsIdle,
      redisClientsPerIdleAgent: Math.round(((clientsIdle - clientsBase) / nHosts) * 1000) / 1000,
      redisClientsPeak: clientsPeak,
      redisMemIdleBytes: memIdle,
      redisMemPeakBytes: memPeak,
      controlCpuMs: Math.round(cpuMs),
      controlCpuMsPerHostStep: steps ? Math.round((cpuMs / steps) * 1000) / 1000 : Number.NaN,
      jobsPerSec: Math.round((steps / (wallMs / 1000)) * 10) / 10,
      agentRssBytes: rssPeak,
      agentRssPerHostBytes: Math.round(rssPeak / nHosts),
      stepP50Ms: percentile(all, 50),
      stepP99Ms: percentile(all, 99),
      stepStats,
      cpuSec,
      stageCpuMsPerHostStep: steps ? Math.round((cpuSec.stages * 1000 * 100) / steps) / 100 : Number.NaN,
      stageRequestsPerHostStep: {
        total: steps ? Math.round(([...requests.values()].reduce((a, n) => a + n, 0) / steps) * 100) / 100 : 0,
        byRoute: [...requests].map(([k, n]): [string, number] => [k, steps ? Math.round((n / steps) * 100) / 100 : 0]).sort((a, b) => b[1] - a[1]),
      },
      redisCallsPerHostStep: { total: Math.round(perStepCalls.reduce((a, [, n]) => a + n, 0) * 10) / 10, top: perStepCalls },
      ...(o.window ? { window: { from: windowFrom!, to: converted } } : {}),
      // The idle fleet is reported even when no step ran (a run that only measures it: `--timeout-sec 1`).
      ...(idle ? { idle } : {}),
      ...(idle && steps ? { stageCpuMsPerHostStepNetOfIdle: Math.round(((cpuSec.stages * 1000 - idle.stagesCpuMsPerSec * (wallMs / 1000)) / steps) * 100) / 100 } : {}),
    };
  } finally {
    for (const c of cleanup.reverse()) await c().catch(() => {});
    await rm(root, { recursive: true, force: true }).catch(() => {});
  }
}

const mib = (b: number) => `${(b / 2 ** 20).toFixed(1)} MiB`;
/** True for a per-step value of a run without steps (one that only measured the idle fleet): NaN, or null as results.json holds it. */
const noValue = (v: number | null) => v === null || Number.isNaN(v);
/** A per-step value, or 'no step ran'. */
const stepped = (v: number | null, unit: string) => (noValue(v) ? 'no step ran' : `${v} ${unit}`);

/**
 * The suite entry for loadtest/run.ts. With `from-json FILE`, nothing runs: the result is the
 * last JSON line of FILE (what an earlier run printed), rendered again.
 */
export async function run(opts: Record<string, string | undefined>): Promise<SuiteResult> {
  if (opts['from-json']) {
    const lines = (await readFile(opts['from-json'], 'utf8')).split('\n').filter((l) => l.startsWith('{'));
    if (lines.length === 0) throw new Error(`${opts['from-json']} holds no result line`);
    return fleetSuite(JSON.parse(lines[lines.length - 1]) as FleetBenchResult);
  }
  return fleetSuite(await benchFleet({
    hosts: opts.hosts ? Number(opts.hosts) : undefined,
    colos: opts.colos ? Number(opts.colos) : undefined,
    bundleMiB: opts['bundle-mib'] !== undefined ? Number(opts['bundle-mib']) : undefined,
    mode: (opts.mode as 'relay' | 'direct' | undefined) ?? undefined,
    agentProcs: opts['agent-procs'] ? Number(opts['agent-procs']) : undefined,
    stageProcs: opts['stage-procs'] ? Number(opts['stage-procs']) : undefined,
    cpuProfDir: opts['cpu-prof'],
    timeoutSec: opts['timeout-sec'] ? Number(opts['timeout-sec']) : undefined,
    maxInFlight: opts['max-in-flight'] ? Number(opts['max-in-flight']) : undefined,
    window: opts.window ? parseWindow(opts.window) : undefined,
    idleSec: opts['idle-sec'] ? Number(opts['idle-sec']) : undefined,
  }));
}

/** `--window FROM:TO`: converted-host counts, FROM < TO. */
function parseWindow(s: string): { from: number; to: number } {
  const m = /^(\d+):(\d+)$/.exec(s);
  if (!m || Number(m[1]) >= Number(m[2])) throw new Error(`--window wants FROM:TO, converted-host counts with FROM < TO (got ${s})`);
  return { from: Number(m[1]), to: Number(m[2]) };
}

/** The table of a fleet run. */
export function fleetSuite(r: FleetBenchResult): SuiteResult {
  const noSteps = noValue(r.controlCpuMsPerHostStep);
  const rows: (string | number)[][] = [
    ['hosts / colos / mode', `${r.hosts} / ${r.colos} / ${r.mode}`],
    ['bundle bytes (B + C)', mib(r.bundleBytes)],
    ['setup (Redis … agents registered)', `${(r.setupMs / 1000).toFixed(1)} s (agents registered in ${(r.registerMs / 1000).toFixed(1)} s)`],
    r.window
      ? ['measured over', `a window of the rollout: ${r.window.from} → ${r.window.to} hosts converted, ${(r.wallMs / 1000).toFixed(1)} s (rows below: that window only)`]
      : ['rollout wall time', `${(r.wallMs / 1000).toFixed(1)} s`],
    ['hosts converted / failed', `${r.converted} / ${r.failed}`],
    ['origin blob bytes ÷ (bundle bytes × colos)', `${r.originRatio.toFixed(2)} (stage fill resumes: ${r.stageResumes})`],
    ['stage → host bytes', mib(r.stageToHostBytes)],
    ['Redis clients: base / idle fleet / peak', `${r.redisClientsBase} / ${r.redisClientsIdle} / ${r.redisClientsPeak}`],
    ['Redis clients per idle agent', r.redisClientsPerIdleAgent],
    ['Redis used memory: idle / peak', `${mib(r.redisMemIdleBytes)} / ${mib(r.redisMemPeakBytes)}`],
    ['control CPU per host step', `${stepped(r.controlCpuMsPerHostStep, 'ms')} (${(r.controlCpuMs / 1000).toFixed(1)} s in all)`],
    // (absent from results recorded before they were measured)
    ['stages CPU per host step (relay and bytes served)', r.stageCpuMsPerHostStep !== undefined ? stepped(r.stageCpuMsPerHostStep, 'ms') : 'not measured'],
    [
      'Redis commands per host step',
      noSteps
        ? 'no step ran'
        : r.redisCallsPerHostStep ? `${r.redisCallsPerHostStep.total} (${r.redisCallsPerHostStep.top.slice(0, 8).map(([c, n]) => `${c} ${n}`).join(', ')})` : 'not measured',
    ],
    [
      'stage requests per host step',
      noSteps
        ? 'no step ran'
        : r.stageRequestsPerHostStep ? `${r.stageRequestsPerHostStep.total} (${r.stageRequestsPerHostStep.byRoute.slice(0, 6).map(([k, n]) => `${k} ${n}`).join(', ')})` : 'not measured',
    ],
    ...(r.idle
      ? [
          [
            `idle fleet before the rollout (${r.idle.sec} s): CPU per second`,
            `stages ${r.idle.stagesCpuMsPerSec} ms, control ${r.idle.controlCpuMsPerSec} ms, Redis ${r.idle.redisCpuMsPerSec} ms; stage requests ${r.idle.stageRequestsPerSec.map(([k, n]) => `${k} ${n}`).join(', ')} per s; Redis commands ${(r.idle.redisCallsPerSec ?? []).reduce((a, [, n]) => a + n, 0).toFixed(0)} per s (${(r.idle.redisCallsPerSec ?? []).slice(0, 5).map(([c, n]) => `${c} ${n}`).join(', ')})`,
          ],
          [
            'idle stages apart: with no host / per stage / what each waiting host adds',
            r.idle.stagesNoHostsCpuMsPerSec === undefined
              ? 'not measured'
              : `${r.idle.stagesNoHostsCpuMsPerSec} ms/s / ${r.idle.stageFixedCpuMsPerSec} ms/s / ${r.idle.stagesCpuMsPerSecPerHost} ms/s`,
          ],
          ['stages CPU per host step, less the idle fleet\'s rate over the same time', r.stageCpuMsPerHostStepNetOfIdle === undefined ? 'no step ran' : `${r.stageCpuMsPerHostStepNetOfIdle} ms`],
        ]
      : []),
    ['BullMQ jobs (steps) per second', r.jobsPerSec],
    ['agent-process RSS per host', `${(r.agentRssPerHostBytes / 1024).toFixed(0)} KiB (${mib(r.agentRssBytes)} peak in all)`],
    ['time per step p50 / p99', noValue(r.stepP50Ms) ? 'no step ran' : `${r.stepP50Ms} / ${r.stepP99Ms} ms`],
    [
      'CPU during the rollout: control / stages / agents / Redis / origin',
      // (absent from results recorded before the processes were measured apart)
      r.cpuSec ? `${r.cpuSec.control} / ${r.cpuSec.stages} / ${r.cpuSec.agents} / ${r.cpuSec.redis} / ${r.cpuSec.origin} s` : 'not measured',
    ],
  ];
  return {
    suite: 'fleet',
    headers: ['fleet', 'value'],
    rows,
    notes: [
      Object.keys(r.stepStats).length
        ? `Per step p50/p99 ms: ${Object.entries(r.stepStats)
            .map(([k, v]) => `${k} ${v.p50}/${v.p99}`)
            .join(', ')}.`
        : 'No step ran: this run only measured the idle fleet (`--timeout-sec`), and its per-step rows are empty.',
      'Origin ratio must be 1.00 (one copy per colo). Redis clients per idle agent: 2 in direct mode (a BullMQ Worker and its blocking connection), 0 in relay mode (the relay costs 3 per colo).',
      'Everything runs on this one machine: Redis, origin, stages (relays), control (child process) and the sim agents (child processes) share its cores.',
      ...(r.window ? [`Only a window of the rollout was measured (--window), while the converted hosts went from ${r.window.from} to ${r.window.to}: every per-step row counts the steps that ended in it, and the CPU spent in it.`] : []),
    ],
    data: { ...r },
  };
}

// ---------------------------------------------------------------- agents child process

async function childMain(specFile: string): Promise<void> {
  const spec = JSON.parse(await readFile(specFile, 'utf8')) as ChildSpec;
  const f = spec.keyFiles;
  const identity = (await readFile(f.fleetIdentity, 'utf8'))
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l.startsWith('AGE-SECRET-KEY-'));
  const keys: FleetKeys = {
    dir: spec.keysDir,
    files: f,
    releaseKey: loadPrivateKey(await readFile(f.releaseKey)),
    controlKey: loadPrivateKey(await readFile(f.controlKey)),
    agent: { trusted: [loadPublicKey(await readFile(f.releasePub))], control: loadPublicKey(await readFile(f.controlPub)), identities: identity },
    recipient: '',
  };
  const agents = await startFleetAgents(spec.hosts, {
    redisUrl: spec.redisUrl,
    prefix: spec.prefix,
    keys,
    stages: spec.stages,
    origin: spec.origin,
    relayColos: spec.relayColos,
    relaySecret: spec.relaySecret,
    startConcurrency: 32,
  });
  process.stdout.write('ready {}\n');
  await new Promise<void>((r) => process.once('SIGTERM', () => r()));
  await agents.stop();
  process.exit(0);
}

async function stageChildMain(specFile: string): Promise<void> {
  const spec = JSON.parse(await readFile(specFile, 'utf8')) as StageChildSpec;
  const stages = await startStages(spec);
  process.stdout.write(`ready ${JSON.stringify(Object.fromEntries(stages.map((st) => [st.config.colo, st.url])))}\n`);
  await new Promise<void>((r) => process.once('SIGTERM', () => r()));
  for (const st of stages) await st.close().catch(() => {});
  process.exit(0);
}

if (process.argv[1] && pathToFileURL(process.argv[1]).href === import.meta.url) {
  const i = process.argv.indexOf('--child');
  const j = process.argv.indexOf('--stage-child');
  if (i > 0) await childMain(process.argv[i + 1]);
  else if (j > 0) await stageChildMain(process.argv[j + 1]);
  else {
    const r = await run(Object.fromEntries(process.argv.slice(2).map((a, j, arr) => (a.startsWith('--') ? [a.slice(2), arr[j + 1]] : [])).filter((x) => x.length)));
    process.stdout.write(`${textTable(r.headers, r.rows)}\n${JSON.stringify(r.data)}\n`);
  }
}
