/**
 * Relay benchmark: the relay's own CPU per host step, measured apart from everything else.
 *
 *   npm run bench -- relay [--hosts 300 --rounds 2 --log-lines 2 --idle 0 --wait-sec 25]
 *
 * A stage with its colo's relay runs in this process, on a private redis-server; the hosts run in
 * a child process, each one a real RelayTransport (the agent's relay client) doing what the agent
 * does per step: take the job (long poll), report `started`, log lines, report progress once,
 * complete. Jobs are enqueued before the clock starts, as control does, as one flow per host
 * (the conversion's 11 steps, `--rounds` times). `--idle N` adds N hosts with no jobs that
 * long-poll all along, as the hosts of a large colo that wait for their wave do (`--wait-sec`:
 * the polls' length, default the agent's). Printed: the stage process's CPU time per host
 * step (this process does nothing else while the hosts run), requests per step, Redis commands
 * per step (INFO commandstats: the relay's own and those inside BullMQ's scripts), and steps per
 * second. The fleet benchmark measures the same relay in a whole rollout, with its idle polls and
 * heartbeats; this one is the per-step cost alone, with little noise from other processes.
 */
import { spawn } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Redis } from 'ioredis';
import { AgentProducer, coloQueueName, convertSequence, formatRelayKeys, relayToken, type StepRoute } from '../shared/protocol/index.js';
import { RelayTransport } from '../services/relay/client.js';
import { startOrigin } from '../services/origin/main.js';
import { startStage } from '../services/stage/main.js';
import { silentLogger } from '../shared/log.js';
import { ensureRedis } from '../shared/redis.js';
import { commandCalls, type SuiteResult } from './report.js';

const SELF = fileURLToPath(import.meta.url);
const SECRET = { kid: '1', secret: 'bench-relay-secret-0123456789abcdef' };
const COLO = 'c001';

/** Options of benchRelay. */
export interface RelayBenchOptions {
  hosts?: number;
  /** Conversions (11 steps each) per host. */
  rounds?: number;
  /** Log lines per step. */
  logLines?: number;
  /** Hosts without jobs that long-poll during the whole run. */
  idle?: number;
  /** Long-poll length of every host, s (default the agent's, RelayTransport's default). */
  waitSec?: number;
}

/** What benchRelay measured. */
export interface RelayBenchResult {
  hosts: number;
  idle: number;
  steps: number;
  wallMs: number;
  stageCpuMs: number;
  stageCpuMsPerStep: number;
  requestsPerStep: number;
  redisCallsPerStep: number;
  redisTop: [string, number][];
  stepsPerSec: number;
}


/** Runs the hosts of one benchmark in a child process: `--hosts-child SPEC.json`. */
interface HostsSpec {
  relay: string;
  hosts: string[];
  idle: string[];
  steps: number;
  logLines: number;
  waitSec?: number;
}

export async function benchRelay(o: RelayBenchOptions = {}): Promise<RelayBenchResult> {
  const nHosts = o.hosts ?? 300;
  const rounds = o.rounds ?? 2;
  const root = await mkdtemp(join(tmpdir(), 'sc-relay-bench-'));
  const cleanup: (() => Promise<void>)[] = [];
  try {
    await mkdir(join(root, 'redis'), { recursive: true });
    const redisH = await ensureRedis(undefined, { dir: join(root, 'redis') });
    cleanup.push(() => redisH.stop());
    const redis = new Redis(redisH.url, { maxRetriesPerRequest: null });
    cleanup.push(async () => void redis.disconnect());
    const prefix = 'bench';
    const tokenFile = join(root, 'origin.token');
    await writeFile(tokenFile, 'bench-origin-token\n', { mode: 0o600 });
    const { publicKey } = generateKeyPairSync('ed25519');
    const trust = join(root, 'release.pub');
    await writeFile(trust, publicKey.export({ type: 'spki', format: 'pem' }));
    const origin = await startOrigin({ listen: '127.0.0.1:0', data: join(root, 'origin'), tokenFile, trustKey: [trust] }, { logger: silentLogger });
    cleanup.push(() => origin.close());
    const stage = await startStage(
      {
        listen: '127.0.0.1:0',
        upstreams: [origin.url],
        cache: join(root, 'stage'),
        colo: COLO,
        trustKeys: [trust],
        logLevel: 'silent',
        redis: redisH.url,
        prefix,
        relayKeys: formatRelayKeys([SECRET], COLO),
      },
      { log: silentLogger },
    );
    cleanup.push(() => stage.close());

    // The jobs, before the clock starts: one flow per host, `rounds` conversions long.
    const { privateKey } = generateKeyPairSync('ed25519');
    const producer = new AgentProducer({ connection: redis, prefix, signingKey: privateKey });
    cleanup.push(() => producer.close());
    const route: StepRoute = { transport: 'relay', queue: coloQueueName(COLO) };
    const hosts = Array.from({ length: nHosts }, (_, i) => `h${String(i).padStart(5, '0')}`);
    const seq = Array.from({ length: rounds }, () => convertSequence({ name: 'b', version: '1' }, { name: 'c', version: '2' })).flat();
    for (const h of hosts) await producer.enqueueSequence(h, 'bench-1', seq, { route });
    const steps = nHosts * seq.length;

    const idle = Array.from({ length: o.idle ?? 0 }, (_, i) => `idle${String(i).padStart(5, '0')}`);
    const spec: HostsSpec = { relay: stage.url, hosts, idle, steps: seq.length, logLines: o.logLines ?? 2, waitSec: o.waitSec };
    const specFile = join(root, 'hosts.json');
    await writeFile(specFile, JSON.stringify(spec));
    const calls0 = commandCalls(await redis.info('commandstats'));
    const req0 = await requestsServed(stage.url);
    const cpu0 = process.cpuUsage();
    const t0 = Date.now();
    const child = spawn(process.execPath, ['--import', 'tsx', SELF, '--hosts-child', specFile], { stdio: ['ignore', 'inherit', 'inherit'] });
    const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
    const wallMs = Date.now() - t0;
    const cpu = process.cpuUsage(cpu0);
    if (code !== 0) throw new Error(`the hosts' process exited with ${code}`);
    const calls1 = commandCalls(await redis.info('commandstats'));
    const requests = (await requestsServed(stage.url)) - req0;
    const per = [...calls1]
      .filter(([c]) => c !== 'info')
      .map(([c, n]): [string, number] => [c, Math.round(((n - (calls0.get(c) ?? 0)) / steps) * 100) / 100])
      .filter(([, n]) => n > 0)
      .sort((a, b) => b[1] - a[1]);
    const stageCpuMs = (cpu.user + cpu.system) / 1000;
    return {
      hosts: nHosts,
      idle: idle.length,
      steps,
      wallMs,
      stageCpuMs: Math.round(stageCpuMs),
      stageCpuMsPerStep: Math.round((stageCpuMs / steps) * 1000) / 1000,
      requestsPerStep: Math.round((requests / steps) * 100) / 100,
      redisCallsPerStep: Math.round(per.reduce((a, [, n]) => a + n, 0) * 10) / 10,
      redisTop: per.slice(0, 10),
      stepsPerSec: Math.round((steps / (wallMs / 1000)) * 10) / 10,
    };
  } finally {
    for (const c of cleanup.reverse()) await c().catch(() => {});
    await rm(root, { recursive: true, force: true }).catch(() => {});
  }
}

async function requestsServed(url: string): Promise<number> {
  const text = await (await fetch(`${url}/metrics`)).text();
  let n = 0;
  for (const m of text.matchAll(/^stage_http_requests_total\{([^}]*)\} (\d+)/gm)) if (/route="\/(hosts|jobs)\//.test(m[1])) n += Number(m[2]);
  return n;
}

/** The hosts: each takes, reports and completes its steps in order, as the agent's step loop does. */
async function hostsMain(specFile: string): Promise<void> {
  const spec = JSON.parse(await readFile(specFile, 'utf8')) as HostsSpec;
  const transport = (host: string) =>
    new RelayTransport({ hostId: host, relays: [spec.relay], token: relayToken(SECRET, COLO, host), logger: silentLogger, ...(spec.waitSec ? { waitSec: spec.waitSec } : {}) });
  // Hosts waiting for their wave: registered, then long-polling until the busy ones are done.
  let done = false;
  const waiting = spec.idle.map(transport);
  const idle = waiting.map(async (t) => {
    await t.update({ colo: COLO, state: 'idle' });
    while (!done) await t.next().catch(() => undefined); // close() ends an open poll at once
  });
  await Promise.all(
    spec.hosts.map(async (host) => {
      const t = transport(host);
      await t.update({ colo: COLO, state: 'idle' });
      for (let n = 0; n < spec.steps; ) {
        const job = await t.next();
        if (!job) continue;
        // (the signed data is not verified here: the relay's cost is the subject, not the agent's)
        const p = (job.data as { payload: { rollout: string; seq: number; step: string } }).payload;
        const r = { rollout: p.rollout, seq: p.seq, step: p.step };
        await t.event(job, { ...r, event: 'started' });
        for (let i = 0; i < spec.logLines; i++) await t.log(job, `line ${i} of ${p.step}`);
        await t.progress(job, { bytes: 1, total: 2, percent: 50 }, { ...r, event: 'progress' });
        await t.complete(job, { ok: true }, { ...r, event: 'completed' });
        n++;
      }
      await t.close();
    }),
  );
  done = true;
  await Promise.all(waiting.map((t) => t.close()));
  await Promise.all(idle);
}

/** The relay suite (loadtest/run.ts). */
export async function run(opts: Record<string, string | undefined>): Promise<SuiteResult> {
  const r = await benchRelay({
    hosts: opts.hosts ? Number(opts.hosts) : undefined,
    rounds: opts.rounds ? Number(opts.rounds) : undefined,
    logLines: opts['log-lines'] ? Number(opts['log-lines']) : undefined,
    idle: opts.idle ? Number(opts.idle) : undefined,
    waitSec: opts['wait-sec'] ? Number(opts['wait-sec']) : undefined,
  });
  return {
    suite: 'relay',
    headers: ['relay', 'value'],
    rows: [
      ['hosts / steps / idle hosts polling', `${r.hosts} / ${r.steps} / ${r.idle}`],
      ['stage (relay) CPU per host step', `${r.stageCpuMsPerStep} ms (${(r.stageCpuMs / 1000).toFixed(1)} s in all)`],
      ['relay requests per host step', r.requestsPerStep],
      ['Redis commands per host step', `${r.redisCallsPerStep} (${r.redisTop.map(([c, n]) => `${c} ${n}`).join(', ')})`],
      ['steps per second', r.stepsPerSec],
    ],
    notes: ['Goal: the relay ≤ 5 ms of CPU per host step. The hosts run in their own process; the stage and its relay are this process alone.'],
    data: { ...r },
  };
}

if (process.argv[1] && pathToFileURL(process.argv[1]).href === import.meta.url) {
  const i = process.argv.indexOf('--hosts-child');
  if (i > 0) {
    await hostsMain(process.argv[i + 1]);
    process.exit(0);
  }
  const args = Object.fromEntries(process.argv.slice(2).map((a, j, arr) => (a.startsWith('--') ? [a.slice(2), arr[j + 1]] : [])).filter((x) => x.length));
  const r = await run(args);
  for (const row of r.rows) process.stdout.write(`${row[0]}: ${row[1]}\n`);
  process.stdout.write(`${JSON.stringify(r.data)}\n`);
  process.exit(0);
}
