/**
 * The demo launcher, owned here: `stagecoach demo` (services/cli/commands/demo.ts parses the
 * flags and calls runDemo). A whole local fleet on one machine, running the production code
 * with the sim machine driver plugged in; the sim fleet's building blocks (./fleet.ts) make the
 * keys, the machines and their agents.
 *
 * 1. Redis: REDIS_URL if set, else a private redis-server on a free port.
 * 2. Keys (release, control, fleet), a private CA and a server certificate for 127.0.0.1
 *    (shared/tls-gen.ts; every server listens with TLS, every client trusts that CA: the
 *    in-process ones through trustCa, the CLI children and agents through STAGECOACH_CA; plain
 *    HTTP, with a note, only where no `openssl` is installed), an origin, and one stage per colo.
 * 3. Two sample root filesystems, a rescue OS "B" and a target OS "C", published with the
 *    `stagecoach publish` command, then fetched back through every stage with `stagecoach get`
 *    (signature and digest checked).
 * 4. Control, and N sim hosts per colo whose agents run in this process; a rollout (canary 1,
 *    then the rest) through the control API, with live progress (services/control/watch.ts), a
 *    per-host table, and the origin's egress per colo (one copy per colo).
 *
 * With `--exit` it stops when done and exits non-zero when any host failed; otherwise the
 * services stay up until Ctrl-C.
 */
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { SimMachine } from '../agent/machine/sim.js';
import { ControlClient } from '../control/client.js';
import { startControl } from '../control/main.js';
import { watchRollout } from '../control/watch.js';
import { ReadClient } from '../origin/client.js';
import { startOrigin } from '../origin/main.js';
import { startStage } from '../stage/main.js';
import { makeSampleRootfs } from '../../shared/bundle/index.js';
import { readTokenFile } from '../../shared/config.js';
import { scError } from '../../shared/errors.js';
import { createLogger, silentLogger } from '../../shared/log.js';
import { ensureRedis } from '../../shared/redis.js';
import { trustCa } from '../../shared/tls.js';
import { generateTls } from '../../shared/tls-gen.js';
import { createSimHosts, makeFleetKeys, type SimHost, startFleetAgents } from './fleet.js';

/** Options of `stagecoach demo`. */
export interface DemoOptions {
  exit: boolean;
  colos: number;
  /** Sim hosts in all, spread over the colos round-robin. */
  hosts: number;
  bundleMiB: number;
  dir?: string;
  keep: boolean;
  logLevel: string;
  /** Redis URL; when absent a private redis-server is started. */
  redisUrl?: string;
  /** Redis key prefix (default: a fresh `demo-<random>`, so runs never mix). */
  prefix?: string;
}

/** What the per-host table shows, read from the sim machine. */
interface HostView {
  os: string;
  device: string;
  ip: string;
  fingerprint: string;
  rescue: string;
  /** Each boot since the machine was made: `device (OS now installed there)`; the first is labelled with the OS it ran then. */
  path: string[];
  reboots: number;
}

async function viewHost(dir: string): Promise<HostView> {
  const m = new SimMachine(dir);
  const i = await m.inspect();
  let rescue = '-';
  if (i.rescueEntry) {
    const os = await m.installedOs(i.rescueEntry).catch(() => null);
    rescue = os ? `${os.id} ${os.version} @${i.rescueEntry}` : i.rescueEntry;
  }
  const os = i.running ? `${i.running.id} ${i.running.version}` : 'down';
  const booted = await m.bootPath();
  const path: string[] = [];
  for (const [n, device] of booted.entries()) {
    // What a device holds now is what it ran then, except where a later OS replaced it: the
    // first boot (A) is labelled by the caller, the last one by what runs.
    const here = n === booted.length - 1 && i.running ? os : await m.installedOs(device).then((x) => (x ? `${x.id} ${x.version}` : '?'), () => '?');
    path.push(`${here} @${device}`);
  }
  return { os, device: i.bootDevice ?? '-', ip: i.ip ?? '-', fingerprint: i.hostKeyFingerprint ?? '-', rescue, path, reboots: i.reboots };
}

/** `A @disk1p1 → B @disk2p1 → C @disk1p1`: the boots since `before` was read, after its own. */
function bootPath(before: HostView, after: HostView): string {
  const path = after.path.slice(before.path.length);
  return [before.path.at(-1) ?? `${before.os} @${before.device}`, ...path].join(' → ');
}

const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;

// The `stagecoach` entry of this checkout, whether this module runs from the sources or from dist/.
const BIN = fileURLToPath(new URL(import.meta.url.includes('/dist/services/demo/') ? '../../../services/cli/bin.js' : '../cli/bin.js', import.meta.url));

/** Runs `stagecoach ARGS…` as a child process (what a release engineer would type); returns stdout. */
export async function stagecoach(args: string[]): Promise<string> {
  const child = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (c: Buffer) => {
    out += c;
  });
  child.stderr.on('data', (c: Buffer) => {
    err += c;
  });
  const code = await new Promise<number | null>((r) => child.on('close', r));
  if (code !== 0) throw scError('SC_ERR_INTERNAL', `stagecoach ${args[0]} failed (exit ${code}): ${err.trim().slice(-2000)}`);
  return out;
}

/**
 * The demo's TLS: a private CA and a certificate for 127.0.0.1 and localhost in `dir`, trusted by
 * this process and (STAGECOACH_CA) by every child it starts. Without `openssl`, plain HTTP on
 * loopback, said so.
 */
async function demoTls(dir: string): Promise<{ tlsCert: string; tlsKey: string } | Record<string, never>> {
  try {
    const g = await generateTls(dir, ['127.0.0.1', 'localhost']);
    process.env.STAGECOACH_CA = g.ca;
    trustCa([g.ca]);
    say(`tls        private CA ${g.ca} (every server below listens with TLS; clients: --ca ${g.ca})`);
    return { tlsCert: g.cert, tlsKey: g.key };
  } catch (err) {
    say(`tls        none: ${(err as Error).message}; the services listen with plain HTTP on 127.0.0.1`);
    return {};
  }
}

function say(line: string): void {
  process.stdout.write(`${line}\n`);
}

/** Reads one counter's value from Prometheus text (summing its series). */
export function counterValue(text: string, name: string): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith(`${name} `) || line.startsWith(`${name}{`)) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return sum;
}

/** Runs the demo; resolves with the process exit code. */
export async function runDemo(opts: DemoOptions): Promise<number> {
  const log = opts.logLevel === 'silent' ? silentLogger : createLogger({ level: opts.logLevel, name: 'demo' });
  const work = opts.dir ? resolve(opts.dir) : mkdtempSync(join(tmpdir(), 'stagecoach-demo-'));
  mkdirSync(work, { recursive: true });
  const cleanup: (() => Promise<void>)[] = [];
  const stopAll = async () => {
    for (const c of cleanup.reverse()) await c().catch(() => {});
    if (!opts.dir && !opts.keep) rmSync(work, { recursive: true, force: true });
  };
  try {
    say(`work dir   ${work}`);
    const keys = await makeFleetKeys(join(work, 'keys'));
    const tokenFile = join(work, 'origin.token');
    writeFileSync(tokenFile, `demo-${Math.random().toString(36).slice(2)}\n`, { mode: 0o600 });

    const tls = await demoTls(join(work, 'tls'));
    const origin = await startOrigin({ listen: '127.0.0.1:0', data: join(work, 'origin'), tokenFile, ...tls }, { logger: log });
    cleanup.push(() => origin.close());
    say(`origin     ${origin.url}`);

    const colos = Array.from({ length: opts.colos }, (_, i) => `colo${String.fromCharCode(97 + i)}`);
    const stages: Record<string, string> = {};
    for (const colo of colos) {
      const st = await startStage(
        { listen: '127.0.0.1:0', upstreams: [origin.url], cache: join(work, 'stages', colo), cacheSize: '2GiB', colo, tokenFile, trustKeys: [keys.files.releasePub], logLevel: opts.logLevel, ...tls },
        { log },
      );
      cleanup.push(() => st.close());
      stages[colo] = st.url;
      say(`stage      ${colo} ${st.url}`);
    }

    // Two sample root filesystems: B (rescue/base) and C (target).
    const bundles = [
      { role: 'base', name: 'rescue-os', version: '1.0.0', os: { id: 'debian', name: 'Debian GNU/Linux', version: '12', netFormat: 'ifupdown' as const } },
      { role: 'target', name: 'target-os', version: '24.04.1', os: { id: 'ubuntu', name: 'Ubuntu', version: '24.04', netFormat: 'netplan' as const } },
    ];
    const published: Record<string, { name: string; version: string; blob: { digest: string; size: number } }> = {};
    for (const b of bundles) {
      const dir = join(work, 'rootfs', b.name);
      await makeSampleRootfs(dir, { ...b.os, sizeMiB: opts.bundleMiB });
      const out = await stagecoach([
        'publish', dir, '--origin', origin.url, '--name', b.name, '--version', b.version, '--role', b.role,
        '--token-file', tokenFile, '--signing-key', keys.files.releaseKey, '--recipients-file', keys.files.fleetRecipient, '--json',
      ]);
      const r = JSON.parse(out) as { name: string; version: string; manifestDigest: string; blob: { digest: string; size: number } };
      published[b.role] = r;
      say(`published  ${b.role.padEnd(6)} ${r.name}@${r.version}  blob ${r.blob.digest.slice(0, 19)}… ${(r.blob.size / 2 ** 20).toFixed(1)} MiB`);
    }

    // Fetch every bundle back through every stage, verifying signature and digest.
    for (const colo of colos) {
      for (const b of Object.values(published)) {
        const outFile = join(work, 'fetched', colo, `${b.name}.bundle`);
        mkdirSync(join(work, 'fetched', colo), { recursive: true });
        await stagecoach(['get', `${b.name}@${b.version}`, '--from', stages[colo], '-o', outFile, '--trust-key', keys.files.releasePub, '--json']);
      }
      say(`verified   ${colo}: both bundles fetched through its stage, signatures and digests checked`);
    }
    const originMetrics = await new ReadClient(origin.url).metricsText();
    const egress = counterValue(originMetrics, 'origin_blob_bytes_out_total');
    const bundleBytes = Object.values(published).reduce((s, b) => s + b.blob.size, 0);
    say(`origin egress ${mib(egress)} = ${(egress / bundleBytes).toFixed(2)} × the bundles for ${colos.length} colos (one copy per colo)`);

    // Redis, control, and the sim hosts with their agents (in this process, supervised).
    const redis = await ensureRedis(opts.redisUrl);
    cleanup.push(() => redis.stop());
    say(`redis      ${redis.url}${redis.started ? ' (private redis-server)' : ''}`);
    const prefix = opts.prefix ?? `demo-${Math.random().toString(36).slice(2, 8)}`;
    const controlTokenFile = join(work, 'control.token');
    const controlToken = `ops:${Math.random().toString(36).slice(2)}${Math.random().toString(36).slice(2)}`;
    writeFileSync(controlTokenFile, `${controlToken}\n`, { mode: 0o600 });
    const control = await startControl(
      {
        listen: '127.0.0.1:0',
        redis: redis.url,
        origin: origin.url,
        tokenFile: controlTokenFile,
        signingKey: keys.files.controlKey,
        prefix,
        stageTokenFile: tokenFile,
        trustKey: [keys.files.releasePub],
        stages: Object.entries(stages).map(([c, u]) => `${c}=${u}`),
        logLevel: opts.logLevel as 'warn',
        ...tls,
      },
      { logger: log },
    );
    cleanup.push(() => control.close());
    say(`control    ${control.url}   dashboard: ${control.url}/   queues: ${control.url}/queues`);
    // The file is in the format control reads (NAME:TOKEN); the CLI's --token-file takes it as it is.
    const writeToken = readTokenFile(controlTokenFile);
    say(`token      ${controlTokenFile}: use it as --token-file for rollout/host writes; paste ${writeToken} into the dashboard to write there`);

    // The hosts go round-robin over the colos (colo i gets every colos.length-th host); they are
    // listed in that order.
    const per = colos.map((name, ci) => ({ name, hosts: Math.floor(opts.hosts / colos.length) + (ci < opts.hosts % colos.length ? 1 : 0) }));
    const made = await createSimHosts(join(work, 'machines'), per);
    const byColo = colos.map((c) => made.filter((h) => h.colo === c));
    const hosts: (SimHost & { before: HostView })[] = [];
    for (let n = 0; hosts.length < made.length; n++) {
      for (const list of byColo) if (list[n]) hosts.push({ ...list[n], before: await viewHost(list[n].dir) });
    }
    // Started one after the other; a failed start stops the ones already running.
    const agents = await startFleetAgents(hosts, {
      redisUrl: redis.url,
      prefix,
      keys,
      stages: Object.fromEntries(Object.entries(stages).map(([c, u]) => [c, [u]])),
      origin: origin.url,
      logger: log,
    });
    cleanup.push(() => agents.stop());
    say(`hosts      ${hosts.length} sim hosts in ${colos.length} colos, agents running`);

    const client = new ControlClient(control.url, { token: writeToken, actor: 'demo' });
    const deadline = Date.now() + 30_000;
    while ((await client.hosts({})).length < hosts.length) {
      if (Date.now() > deadline) throw scError('SC_ERR_TIMEOUT', 'agents did not register within 30 s');
      await new Promise((r) => setTimeout(r, 200));
    }
    const base = published.base;
    const target = published.target;
    const rollout = await client.createRollout({
      base: `${base.name}@${base.version}`,
      target: `${target.name}@${target.version}`,
      colos,
      plan: { canary: 1, waves: [1, '100%'], maxInFlight: 10, failureBudget: 0 },
    });
    say(`rollout    ${rollout.spec.id}: canary 1, then the rest (${base.name}@${base.version} → ${target.name}@${target.version})\n`);
    const final = await watchRollout(client, rollout.spec.id, { intervalMs: 500 });

    say('');
    const rows = [['host', 'boot path (OS @device)', 'reboots', 'IP before → after', 'host key before → after', 'rescue entry', 'result']];
    let failed = 0;
    for (const h of hosts) {
      const after = await viewHost(h.dir);
      const st = final.hosts.find((x) => x.host === h.hostId)?.status ?? 'unknown';
      if (st !== 'converted') failed++;
      const fp = (x: string) => (x.length > 20 ? `${x.slice(0, 20)}…` : x);
      rows.push([
        h.hostId,
        bootPath(h.before, after),
        String(after.reboots - h.before.reboots),
        `${h.before.ip} → ${after.ip}`,
        `${fp(h.before.fingerprint)} ${h.before.fingerprint === after.fingerprint ? '(same)' : `→ ${fp(after.fingerprint)}`}`,
        after.rescue,
        st,
      ]);
    }
    const w = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
    for (const r of rows) say(r.map((c, i) => c.padEnd(w[i])).join('  '));

    say('');
    const originText = await new ReadClient(origin.url).metricsText();
    const totalEgress = counterValue(originText, 'origin_blob_bytes_out_total');
    for (const colo of colos) {
      const st = await new ReadClient(stages[colo]).metricsText();
      const up = counterValue(st, 'stage_upstream_bytes_total');
      say(`origin → ${colo}: ${mib(up)} (${(up / bundleBytes).toFixed(2)} × the two bundles); stage → hosts: ${mib(counterValue(st, 'stage_bytes_served_total'))}`);
    }
    say(`origin blob bytes served in all: ${mib(totalEgress)} = ${(totalEgress / bundleBytes).toFixed(2)} × the bundles for ${colos.length} colos`);
    say(`\n${hosts.length - failed} of ${hosts.length} hosts converted${failed ? `, ${failed} FAILED` : ''}`);

    if (opts.exit) return failed ? 1 : 0;
    say(`\nall services are up (dashboard ${control.url}/); press Ctrl-C to stop`);
    await new Promise<void>((r) => {
      process.once('SIGINT', () => r());
      process.once('SIGTERM', () => r());
    });
    return failed ? 1 : 0;
  } finally {
    await stopAll();
  }
}
