/**
 * Stage benchmark: stagecoach stage, alone and behind nginx (services/stage/accel.ts: nginx sends
 * committed blobs with sendfile), vs nginx (proxy_cache_lock) vs Varnish, side by side in one
 * run, behind the same throttled origin (the test origin in a child process, one shared rate
 * limiter). Scenarios per peer, each on a cold cache:
 * - cold herd: `herdClients` clients GET a `bigMiB` object at once (origin requests and bytes,
 *   TTFB p50/p99, completion p99 ÷ origin transfer time, where origin transfer time is
 *   size ÷ rate, the floor for any cache);
 * - cold herd 2: `herd2Clients` clients on a smaller `herd2MiB` object (bounded run time);
 * - warm: `warmClients` clients GET the cached big object at once (aggregate GB/s, and the ratio
 *   to nginx serving the same file statically).
 * Every peer runs in its own process group (the stage as `node services/cli/bin.js stage …`;
 * the stage behind nginx as two groups, both counted), so the server side is measurable from /proc: CPU seconds per GiB served in the warm herd
 * (utime + stime of every process of the group: nginx's master and workers, varnishd's manager
 * and child), and peak RSS over all the herds (the sum of VmHWM over the group, and the highest
 * sampled sum of VmRSS). Prints a table and one JSON line.
 * Run: `npx tsx loadtest/stage.ts [--quick] [--peers stage,stage+nginx,nginx,varnish] [--cpu-prof DIR]`
 * (`--cpu-prof`: the stage child writes a V8 CPU profile to DIR when it stops). Everything listens on 127.0.0.1; children are
 * killed on exit; each scenario has a deadline.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm, symlink } from 'node:fs/promises';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { freePort } from '../shared/redis.js';
import { renderNginxMain, renderNginxSite } from '../services/stage/accel.js';
import { parseStageConfig } from '../services/stage/config.js';
import { type SuiteResult, textTable, unitEnvironment, unitNodeFlags } from './report.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, '..');
const MiB = 1024 * 1024;

/** The peers: the stage alone, the stage behind nginx (accel.ts), nginx's proxy cache, Varnish. */
const PEER_NAMES = ['stage', 'stage+nginx', 'nginx', 'varnish'] as const;
type PeerName = (typeof PEER_NAMES)[number];

/** Benchmark knobs (sizes in MiB, rate in bytes/s, deadline in ms). */
export interface BenchOptions {
  bigMiB?: number;
  herdClients?: number;
  herd2MiB?: number;
  herd2Clients?: number;
  warmClients?: number;
  rateBytesPerSec?: number;
  peers?: PeerName[];
  scenarioTimeoutMs?: number;
  /** Extra node flags for the stage child (e.g. `--cpu-prof --cpu-prof-dir=DIR`), after the deployed unit's (infra/systemd/stagecoach-stage.service). */
  stageNodeArgs?: string[];
  log?: (line: string) => void;
}

/** One result row. Times in seconds; null where a value does not apply. */
export interface BenchRow {
  peer: string;
  scenario: 'cold-herd' | 'cold-herd-2' | 'warm' | 'rss';
  clients: number;
  objectMiB: number;
  originRequests: number | null;
  originBytesRatio: number | null;
  ttfbP50: number | null;
  ttfbP99: number | null;
  completionP99: number | null;
  completionRatio: number | null;
  gbps: number | null;
  vsNginxStatic: number | null;
  /** Peak RSS of the server's process group over all its herds (sum of VmHWM), MiB. */
  rssMiB: number | null;
  /** Highest sampled sum of VmRSS over the process group during this herd (rss row: all herds), MiB. */
  rssSampledMiB: number | null;
  /** Server CPU seconds (user + system, whole process group) during this scenario. */
  cpuSec: number | null;
  /** Server CPU seconds per GiB of body served in this scenario. */
  cpuSecPerGiB: number | null;
  errors: number;
  note?: string;
}

interface ClientRun {
  ttfb: number[];
  done: number[];
  bytes: number;
  errors: number;
  wall: number;
}

const children = new Set<ChildProcess>();

function killAll(): void {
  for (const c of children) {
    try {
      if (c.pid) process.kill(-c.pid, 'SIGKILL');
    } catch {
      /* already gone */
    }
  }
  children.clear();
}

function start(cmd: string, args: string[], opts: { cwd?: string; env?: Record<string, string> } = {}): ChildProcess {
  const c = spawn(cmd, args, { cwd: opts.cwd ?? ROOT, env: { ...process.env, ...opts.env }, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  children.add(c);
  c.on('exit', () => children.delete(c));
  return c;
}

async function stop(c: ChildProcess): Promise<void> {
  if (c.exitCode !== null || c.signalCode !== null) return;
  const exited = new Promise<void>((r) => c.once('exit', () => r()));
  try {
    if (c.pid) process.kill(-c.pid, 'SIGTERM');
  } catch {
    return;
  }
  const t = setTimeout(() => {
    try {
      if (c.pid) process.kill(-c.pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }, 5000);
  await exited;
  clearTimeout(t);
}

function httpStatus(url: string): Promise<number> {
  return new Promise((resolve) => {
    const req = request(url, { agent: false, timeout: 1000 }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('error', () => resolve(0));
    req.on('timeout', () => {
      req.destroy();
      resolve(0);
    });
    req.end();
  });
}

async function waitHttp(url: string, what: string, ms = 20_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if ((await httpStatus(url)) > 0) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${what} did not come up at ${url}`);
}

/** `n` clients GET `url` at once; times in seconds from the common start. */
function runClients(url: string, n: number, deadlineMs: number): Promise<ClientRun> {
  const t0 = performance.now();
  const run: ClientRun = { ttfb: [], done: [], bytes: 0, errors: 0, wall: 0 };
  const one = () =>
    new Promise<void>((resolve) => {
      const req = request(url, { agent: false }, (res) => {
        let first = true;
        let got = 0;
        const want = Number(res.headers['content-length']);
        res.on('data', (c: Buffer) => {
          if (first) {
            run.ttfb.push((performance.now() - t0) / 1000);
            first = false;
          }
          got += c.length;
        });
        res.on('end', () => {
          run.bytes += got;
          if (res.statusCode !== 200 || got !== want) run.errors++;
          else run.done.push((performance.now() - t0) / 1000);
          resolve();
        });
        res.on('error', () => {
          run.errors++;
          resolve();
        });
      });
      req.setTimeout(deadlineMs, () => req.destroy(new Error('deadline')));
      req.on('error', () => {
        run.errors++;
        resolve();
      });
      req.end();
    });
  return Promise.all(Array.from({ length: n }, one)).then(() => {
    run.wall = (performance.now() - t0) / 1000;
    return run;
  });
}

function pct(xs: number[], p: number): number | null {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)];
}

async function originCounters(url: string): Promise<{ requests: number; bytes: number }> {
  const text = await new Promise<string>((resolve, reject) => {
    request(`${url}/metrics`, { agent: false }, (res) => {
      let b = '';
      res.on('data', (c) => {
        b += c;
      });
      res.on('end', () => resolve(b));
    })
      .on('error', reject)
      .end();
  });
  const v = (n: string) => Number(new RegExp(`^${n} (\\d+)`, 'm').exec(text)?.[1] ?? 0);
  return { requests: v('origin_blob_requests_total'), bytes: v('origin_blob_bytes_out_total') };
}

/**
 * Memory fields of /proc/PID/status: peak and current RSS, and the file-backed part of the
 * current RSS (program and library pages, shared with other processes of the same files and
 * dropped by the kernel under memory pressure; the rest is RssAnon and RssShmem).
 */
type StatusField = 'VmHWM' | 'VmRSS' | 'RssFile';

function vmMiB(pid: number, field: StatusField): number | null {
  try {
    const m = new RegExp(`${field}:\\s+(\\d+) kB`).exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : null;
  } catch {
    return null;
  }
}

const CLK_TCK = (() => {
  const r = spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' });
  const n = Number(r.stdout?.trim());
  return Number.isFinite(n) && n > 0 ? n : 100;
})();

/** Fields of /proc/<pid>/stat after the command name (index 0 is field 3, `state`). */
function statFields(pid: number): string[] | null {
  try {
    const t = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return t.slice(t.lastIndexOf(')') + 2).split(' ');
  } catch {
    return null;
  }
}

/** Process groups: one id, or several (a server made of two programs, such as the stage behind nginx). */
type Groups = number | readonly number[];

/** Live processes of process group(s) `pgid` (a detached child's pid is its group id). */
export function groupPids(pgid: Groups): number[] {
  const ids = new Set(typeof pgid === 'number' ? [pgid] : pgid);
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const f = statFields(Number(name));
    if (f && ids.has(Number(f[2]))) out.push(Number(name));
  }
  return out;
}

/** CPU time (user + system, in clock ticks) of each live process of group(s) `pgid`. */
export function groupCpu(pgid: Groups): Map<number, number> {
  const m = new Map<number, number>();
  for (const pid of groupPids(pgid)) {
    const f = statFields(pid);
    if (f) m.set(pid, Number(f[11]) + Number(f[12]));
  }
  return m;
}

/**
 * CPU seconds the group spent between two `groupCpu` snapshots. A process that started in
 * between counts whole; one that ended in between is lost (servers keep their workers).
 */
export function cpuSeconds(before: Map<number, number>, after: Map<number, number>): number {
  let ticks = 0;
  for (const [pid, t] of after) ticks += t - (before.get(pid) ?? 0);
  return ticks / CLK_TCK;
}

/** The entries of a `groupCpu` snapshot that belong to process group `pgid` now. */
function onlyGroup(cpu: Map<number, number>, pgid: number): Map<number, number> {
  const pids = new Set(groupPids(pgid));
  return new Map([...cpu].filter(([pid]) => pids.has(pid)));
}

/** Sum over group(s) `pgid` of a /proc status field, MiB. */
export function groupMiB(pgid: Groups, field: StatusField): number {
  let sum = 0;
  for (const pid of groupPids(pgid)) sum += vmMiB(pid, field) ?? 0;
  return sum;
}

/** Samples the group's summed VmRSS every `everyMs` until stopped; `stop()` returns the highest. */
function rssSampler(pgid: Groups, everyMs = 100): { stop(): number } {
  let max = groupMiB(pgid, 'VmRSS');
  const t = setInterval(() => {
    max = Math.max(max, groupMiB(pgid, 'VmRSS'));
  }, everyMs);
  return {
    stop() {
      clearInterval(t);
      return Math.max(max, groupMiB(pgid, 'VmRSS'));
    },
  };
}

function writeRandomFile(path: string, bytes: number): void {
  const buf = Buffer.allocUnsafe(MiB);
  const parts: Buffer[] = [];
  writeFileSync(path, '');
  for (let off = 0; off < bytes; off += MiB) {
    randomFillSync(buf);
    parts.push(Buffer.from(buf.subarray(0, Math.min(MiB, bytes - off))));
    if (parts.length === 64 || off + MiB >= bytes) {
      writeFileSync(path, Buffer.concat(parts), { flag: 'a' });
      parts.length = 0;
    }
  }
}

const fill = (tmpl: string, vars: Record<string, string | number>) => tmpl.replace(/\{\{(\w+)\}\}/g, (_m, k: string) => String(vars[k]));

interface Peer {
  name: string;
  url: string;
  /** The process groups whose CPU and memory are the peer's. */
  groups?: number[];
  /** What each group is, for the rss row's note (one name per group). */
  groupNames?: string[];
  stop(): Promise<void>;
  staticUrl?: string;
  idleRssMiB?: number | null;
}

async function startStagePeer(dir: string, originUrl: string, nodeArgs: string[] = [], extra: string[] = [], port?: number): Promise<Peer> {
  port ??= await freePort();
  const c = start(process.execPath, [
    ...nodeArgs,
    join(ROOT, 'services/cli/bin.js'),
    'stage',
    '--listen',
    `127.0.0.1:${port}`,
    '--upstream',
    originUrl,
    '--cache',
    join(dir, 'stage-cache'),
    '--cache-size',
    '4GiB',
    '--colo',
    'bench',
    // The bench origin lists only what it was told to: no reconcile pass may drop the herd's blob.
    '--reconcile-interval',
    '0',
    '--log-level',
    'warn',
    ...extra,
  ], { env: unitEnvironment('stage') });
  // The tail of the stage's stderr, shown if it dies under the herd (its warnings and a crash stack).
  let tail = '';
  c.stderr?.on('data', (b: Buffer) => {
    tail = (tail + b.toString()).slice(-4000);
  });
  c.stdout?.on('data', () => {});
  c.on('exit', (code, signal) => {
    if (code !== 0 && signal !== 'SIGTERM') process.stderr.write(`stage exited (code ${code}, signal ${signal}):\n${tail}\n`);
  });
  const url = `http://127.0.0.1:${port}`;
  await waitHttp(`${url}/healthz`, 'stage', 60_000); // a loaded machine, or sources run through tsx
  await new Promise((r) => setTimeout(r, 1000));
  return { name: 'stage', url, groups: c.pid ? [c.pid] : undefined, idleRssMiB: c.pid ? groupMiB(c.pid, 'VmRSS') : null, stop: () => stop(c) };
}

/**
 * The stage behind nginx (services/stage/accel.ts): the stage with --accel-redirect on a fixed
 * loopback port, and nginx (one worker) from the config `stagecoach stage --nginx-conf` prints.
 * Its CPU and memory are both programs'.
 */
async function startStageNginxPeer(dir: string, originUrl: string, nodeArgs: string[]): Promise<Peer | string> {
  if (!existsSync('/usr/sbin/nginx')) return 'nginx not installed (/usr/sbin/nginx): skipped';
  const stagePort = await freePort();
  const stage = await startStagePeer(dir, originUrl, nodeArgs, ['--accel-redirect', '/_stagecoach'], stagePort);
  const prefix = join(dir, 'nginx');
  mkdirSync(prefix, { recursive: true });
  const frontPort = await freePort();
  const config = parseStageConfig({ listen: `127.0.0.1:${stagePort}`, upstreams: [originUrl], cache: join(dir, 'stage-cache'), colo: 'bench', accelRedirect: '/_stagecoach' });
  const site = renderNginxSite(config, { front: `127.0.0.1:${frontPort}` });
  writeFileSync(join(prefix, 'nginx.conf'), renderNginxMain(prefix, site, process.getuid?.() === 0 ? 'root' : undefined));
  const c = start('/usr/sbin/nginx', ['-p', prefix, '-c', join(prefix, 'nginx.conf'), '-g', 'daemon off;']);
  let err = '';
  c.stderr?.on('data', (b) => {
    err += b;
  });
  const url = `http://127.0.0.1:${frontPort}`;
  try {
    await waitHttp(`${url}/healthz`, 'nginx');
  } catch {
    await stop(c);
    await stage.stop();
    return `nginx in front of the stage failed to start: ${err.slice(0, 200)}`;
  }
  const groups = [...(stage.groups ?? []), ...(c.pid ? [c.pid] : [])];
  return {
    name: 'stage+nginx',
    url,
    groups,
    groupNames: ['stage', 'nginx'],
    idleRssMiB: groupMiB(groups, 'VmRSS'),
    stop: async () => {
      await stop(c);
      await stage.stop();
    },
  };
}

async function startNginxPeer(dir: string, originPort: number, staticRoot: string): Promise<Peer | string> {
  if (!existsSync('/usr/sbin/nginx')) return 'nginx not installed (/usr/sbin/nginx): skipped';
  const prefix = join(dir, 'nginx');
  mkdirSync(prefix, { recursive: true });
  const [cachePort, staticPort] = [await freePort(), await freePort()];
  const conf = fill(readFileSync(join(HERE, 'peers/nginx.conf.tmpl'), 'utf8'), {
    PREFIX: prefix,
    CACHE_PORT: cachePort,
    STATIC_PORT: staticPort,
    ORIGIN_PORT: originPort,
    STATIC_ROOT: staticRoot,
  });
  writeFileSync(join(prefix, 'nginx.conf'), conf);
  const c = start('/usr/sbin/nginx', ['-p', prefix, '-c', join(prefix, 'nginx.conf'), '-g', 'daemon off;']);
  let err = '';
  c.stderr?.on('data', (b) => {
    err += b;
  });
  try {
    await waitHttp(`http://127.0.0.1:${cachePort}/`, 'nginx');
  } catch {
    await stop(c);
    return `nginx failed to start: ${err.slice(0, 200)}`;
  }
  return { name: 'nginx', url: `http://127.0.0.1:${cachePort}`, staticUrl: `http://127.0.0.1:${staticPort}`, groups: c.pid ? [c.pid] : undefined, stop: () => stop(c) };
}

async function startVarnishPeer(dir: string, originPort: number): Promise<Peer | string> {
  if (!existsSync('/usr/sbin/varnishd')) return 'varnish not installed (/usr/sbin/varnishd): skipped';
  const work = join(dir, 'varnish');
  mkdirSync(work, { recursive: true });
  const port = await freePort();
  const vcl = join(work, 'default.vcl');
  writeFileSync(vcl, fill(readFileSync(join(HERE, 'peers/varnish.vcl'), 'utf8'), { ORIGIN_PORT: originPort }));
  const c = start('/usr/sbin/varnishd', ['-F', '-a', `127.0.0.1:${port}`, '-f', vcl, '-s', 'malloc,1G', '-n', work, '-p', 'thread_pool_min=50']);
  let err = '';
  c.stderr?.on('data', (b) => {
    err += b;
  });
  c.stdout?.on('data', () => {});
  try {
    await waitHttp(`http://127.0.0.1:${port}/`, 'varnish');
  } catch {
    await stop(c);
    return `varnish failed to start: ${err.slice(0, 200)}`;
  }
  return { name: 'varnish', url: `http://127.0.0.1:${port}`, groups: c.pid ? [c.pid] : undefined, stop: () => stop(c) };
}

function row(p: Partial<BenchRow> & Pick<BenchRow, 'peer' | 'scenario' | 'clients' | 'objectMiB'>): BenchRow {
  return {
    originRequests: null,
    originBytesRatio: null,
    ttfbP50: null,
    ttfbP99: null,
    completionP99: null,
    completionRatio: null,
    gbps: null,
    vsNginxStatic: null,
    rssMiB: null,
    rssSampledMiB: null,
    cpuSec: null,
    cpuSecPerGiB: null,
    errors: 0,
    ...p,
  };
}

/** Runs every scenario against every available peer; returns the rows (also logged as they come). */
export async function benchStage(opts: BenchOptions = {}): Promise<BenchRow[]> {
  const o = {
    bigMiB: 256,
    herdClients: 8,
    herd2MiB: 64,
    herd2Clients: 100,
    warmClients: 32,
    rateBytesPerSec: 25_000_000,
    peers: PEER_NAMES,
    scenarioTimeoutMs: 180_000,
    log: (l: string) => process.stderr.write(`${l}\n`),
    ...opts,
  };
  const dir = await mkdtemp(join(tmpdir(), 'bench-stage-'));
  chmodSync(dir, 0o755); // nginx workers and varnish's compiler run as unprivileged users
  const rows: BenchRow[] = [];
  try {
    o.log(`generating ${o.bigMiB} MiB + ${o.herd2MiB} MiB of random data in ${dir}`);
    const big = join(dir, 'big.bin');
    const med = join(dir, 'med.bin');
    writeRandomFile(big, o.bigMiB * MiB);
    writeRandomFile(med, o.herd2MiB * MiB);

    const originPort = await freePort();
    const oc = start(process.execPath, ['--import', 'tsx', fileURLToPath(import.meta.url), '--serve-origin', String(originPort), String(o.rateBytesPerSec), big, med]);
    const info = await new Promise<{ url: string; digests: string[] }>((resolve, reject) => {
      let out = '';
      oc.stdout?.on('data', (b) => {
        out += b;
        const nl = out.indexOf('\n');
        if (nl >= 0) resolve(JSON.parse(out.slice(0, nl)));
      });
      oc.on('exit', (code) => reject(new Error(`origin exited ${code}`)));
    });
    const [bigD, medD] = info.digests;
    o.log(`origin ${info.url} at ${(o.rateBytesPerSec / 1e6).toFixed(0)} MB/s`);

    // static baseline: nginx serves the same file from disk
    const staticRoot = join(dir, 'static');
    mkdirSync(join(staticRoot, 'v1', 'blobs'), { recursive: true });
    await symlink(big, join(staticRoot, 'v1', 'blobs', bigD));

    let nginxStaticGbps: number | null = null;
    for (const name of o.peers) {
      const peerDir = join(dir, name.replace('+', '-'));
      mkdirSync(peerDir, { recursive: true });
      const p =
        name === 'stage'
          ? await startStagePeer(peerDir, info.url, [...unitNodeFlags('stage'), ...(o.stageNodeArgs ?? [])])
          : name === 'stage+nginx'
            ? await startStageNginxPeer(peerDir, info.url, unitNodeFlags('stage'))
            : name === 'nginx'
              ? await startNginxPeer(peerDir, originPort, staticRoot)
              : await startVarnishPeer(peerDir, originPort);
      if (typeof p === 'string') {
        o.log(p);
        rows.push(row({ peer: name, scenario: 'cold-herd', clients: 0, objectMiB: 0, note: p }));
        continue;
      }
      const pgid = p.groups;
      let rssMax = 0;
      /** Runs `n` clients on `url`, with the server group's CPU seconds and highest sampled RSS over the run. */
      const herd = async (url: string, n: number) => {
        const before = pgid ? groupCpu(pgid) : null;
        const sampler = pgid ? rssSampler(pgid) : null;
        const r = await runClients(url, n, o.scenarioTimeoutMs);
        const afterCpu = pgid ? groupCpu(pgid) : null;
        const cpu = before && afterCpu ? cpuSeconds(before, afterCpu) : null;
        const rss = sampler?.stop() ?? null;
        if (rss !== null) rssMax = Math.max(rssMax, rss);
        // A peer of several programs: each one's share of the CPU, for the row's note.
        const split =
          pgid && before && afterCpu && p.groupNames && p.groupNames.length > 1
            ? `CPU ${p.groupNames.map((g, i) => `${g} ${cpuSeconds(onlyGroup(before, pgid[i]), onlyGroup(afterCpu, pgid[i])).toFixed(2)} s`).join(' + ')}`
            : undefined;
        return { r, cpu, cpuPerGiB: cpu === null || r.bytes === 0 ? null : cpu / (r.bytes / 2 ** 30), rss, split };
      };
      try {
        for (const [scenario, digest, n, mib] of [
          ['cold-herd', bigD, o.herdClients, o.bigMiB],
          ['cold-herd-2', medD, o.herd2Clients, o.herd2MiB],
        ] as const) {
          const before = await originCounters(info.url);
          o.log(`${name}: ${scenario}, ${n} clients x ${mib} MiB`);
          const { r, cpu, cpuPerGiB, rss, split } = await herd(`${p.url}/v1/blobs/${digest}`, n);
          const after = await originCounters(info.url);
          const transfer = (mib * MiB) / o.rateBytesPerSec;
          const c99 = pct(r.done, 99);
          rows.push(
            row({
              peer: name,
              scenario,
              clients: n,
              objectMiB: mib,
              originRequests: after.requests - before.requests,
              originBytesRatio: (after.bytes - before.bytes) / (mib * MiB),
              ttfbP50: pct(r.ttfb, 50),
              ttfbP99: pct(r.ttfb, 99),
              completionP99: c99,
              completionRatio: c99 === null ? null : c99 / transfer,
              cpuSec: cpu,
              cpuSecPerGiB: cpuPerGiB,
              rssSampledMiB: rss,
              errors: r.errors,
              note: split,
            }),
          );
          o.log(`  ${JSON.stringify(rows.at(-1))}`);
        }
        if (name === 'nginx' && p.staticUrl) {
          o.log(`nginx static: warm, ${o.warmClients} clients x ${o.bigMiB} MiB`);
          const { r: s, cpu, cpuPerGiB, rss } = await herd(`${p.staticUrl}/v1/blobs/${bigD}`, o.warmClients);
          nginxStaticGbps = s.bytes / s.wall / 1e9;
          rows.push(row({ peer: 'nginx-static', scenario: 'warm', clients: o.warmClients, objectMiB: o.bigMiB, gbps: nginxStaticGbps, vsNginxStatic: 1, cpuSec: cpu, cpuSecPerGiB: cpuPerGiB, rssSampledMiB: rss, errors: s.errors }));
          o.log(`  ${JSON.stringify(rows.at(-1))}`);
        }
        o.log(`${name}: warm, ${o.warmClients} clients x ${o.bigMiB} MiB`);
        const { r: w, cpu, cpuPerGiB, rss, split } = await herd(`${p.url}/v1/blobs/${bigD}`, o.warmClients);
        rows.push(row({ peer: name, scenario: 'warm', clients: o.warmClients, objectMiB: o.bigMiB, gbps: w.bytes / w.wall / 1e9, cpuSec: cpu, cpuSecPerGiB: cpuPerGiB, rssSampledMiB: rss, errors: w.errors, note: split }));
        o.log(`  ${JSON.stringify(rows.at(-1))}`);
        if (pgid) {
          // After every herd of this peer (cold and warm): VmHWM is the peak since the process started.
          const procs = groupPids(pgid).length;
          const parts = p.groupNames && p.groupNames.length > 1 ? `: ${p.groupNames.map((g, i) => `${g} ${groupMiB(pgid[i], 'VmHWM').toFixed(0)}`).join(' + ')} MiB` : '';
          rows.push(
            row({
              peer: name,
              scenario: 'rss',
              clients: Math.max(o.herdClients, o.herd2Clients, o.warmClients),
              objectMiB: o.bigMiB,
              rssMiB: groupMiB(pgid, 'VmHWM'),
              rssSampledMiB: rssMax,
              note: `${procs} process${procs === 1 ? '' : 'es'}${parts}; RSS before the herds: ${p.idleRssMiB?.toFixed(0) ?? '-'} MiB; after them ${groupMiB(pgid, 'VmRSS').toFixed(0)} MiB, of which file-backed (program and libraries) ${groupMiB(pgid, 'RssFile').toFixed(0)} MiB`,
            }),
          );
        }
      } finally {
        await p.stop();
      }
    }
    for (const r of rows) if (r.scenario === 'warm' && r.gbps !== null && nginxStaticGbps) r.vsNginxStatic = r.gbps / nginxStaticGbps;
    await stop(oc);
  } finally {
    killAll();
    await rm(dir, { recursive: true, force: true });
  }
  return rows;
}

const HEADERS = ['peer', 'scenario', 'clients', 'MiB', 'origin req', 'origin bytes ×', 'TTFB p50 s', 'TTFB p99 s', 'done p99 s', 'done ÷ transfer', 'GB/s', 'vs nginx static', 'CPU s', 'CPU s/GiB', 'peak RSS MiB', 'sampled RSS MiB', 'errors'];

/** Formats rows as table cells (HEADERS order). */
function cells(rows: BenchRow[]): (string | number)[][] {
  const f = (v: number | null, d = 2) => (v === null ? '-' : v.toFixed(d));
  return rows.map((r) => [
    r.peer,
    r.scenario,
    r.clients,
    r.objectMiB,
    r.originRequests ?? '-',
    f(r.originBytesRatio),
    f(r.ttfbP50, 3),
    f(r.ttfbP99, 3),
    f(r.completionP99),
    f(r.completionRatio),
    f(r.gbps),
    f(r.vsNginxStatic),
    f(r.cpuSec),
    f(r.cpuSecPerGiB),
    f(r.rssMiB, 0),
    f(r.rssSampledMiB, 0),
    r.errors,
  ]);
}

/** Prints rows as an aligned table. */
export function formatTable(rows: BenchRow[]): string {
  return textTable(HEADERS, cells(rows));
}

/** Options from the command line: `--quick`, `--peers a,b`, `--cpu-prof DIR` (stage child profile). */
function cliOptions(quick: boolean, peers?: string, cpuProf?: string): BenchOptions {
  const o: BenchOptions = quick ? { bigMiB: 32, herd2MiB: 16, herd2Clients: 50, warmClients: 8 } : {};
  if (peers) o.peers = peers.split(',').filter((x): x is PeerName => (PEER_NAMES as readonly string[]).includes(x));
  if (cpuProf) {
    mkdirSync(cpuProf, { recursive: true });
    o.stageNodeArgs = ['--cpu-prof', `--cpu-prof-dir=${resolve(cpuProf)}`];
  }
  return o;
}

/** One note per stagecoach peer: its warm herd beside Varnish's in the same run (CPU per GiB, GB/s). */
function vsVarnish(rows: BenchRow[]): string[] {
  const warm = (peer: string) => rows.find((r) => r.peer === peer && r.scenario === 'warm');
  const v = warm('varnish');
  const vCpu = v?.cpuSecPerGiB;
  const vGbps = v?.gbps;
  if (!vCpu || !vGbps) return [];
  return ['stage', 'stage+nginx'].flatMap((peer) => {
    const w = warm(peer);
    if (!w?.cpuSecPerGiB || !w.gbps) return [];
    return [
      `${peer} warm vs Varnish: CPU per GiB ${w.cpuSecPerGiB.toFixed(2)} s vs ${vCpu.toFixed(2)} s (${(w.cpuSecPerGiB / vCpu).toFixed(2)}×), GB/s ${(w.gbps / vGbps).toFixed(2)}× Varnish's`,
    ];
  });
}

/** The stage suite in the loadtest/report.ts format (`npm run bench -- stage`). */
export async function run(opts: Record<string, string | undefined>): Promise<SuiteResult> {
  const rows = await benchStage(cliOptions(opts.quick !== undefined, opts.peers, opts['cpu-prof']));
  return {
    suite: 'stage',
    headers: HEADERS,
    rows: cells(rows),
    notes: [
      `origin: the same test origin for every peer, throttled to 25 MB/s, in its own process; stage run as \`${Object.entries(unitEnvironment('stage')).map(([k, v]) => `${k}=${v} `).join('')}node ${unitNodeFlags('stage').join(' ')} services/cli/bin.js stage\` (the deployed unit's environment and node flags, infra/systemd/stagecoach-stage.service)`,
      'goals: origin bytes 1.00× per colo; waiters TTFB p99 ≤ 0.2 s; completion ≤ 1.1× the origin transfer time; warm ≥ 0.8× nginx static; stage peak RSS ≤ 100 MiB; warm CPU per GiB ≤ Varnish; warm GB/s ≥ Varnish',
      ...vsVarnish(rows),
      'CPU s, CPU s/GiB: the server process group (all its processes) from /proc/<pid>/stat utime+stime over the scenario, per GiB of body the clients received; the clients run in the benchmark process and are not counted',
      'peak RSS: sum of VmHWM over the server process group after all its herds; sampled RSS: highest sum of VmRSS, sampled every 100 ms during the herds',
      ...rows.filter((r) => r.note).map((r) => `${r.peer} ${r.scenario}: ${r.note}`),
    ],
    data: { rows },
  };
}

async function serveOrigin(args: string[]): Promise<void> {
  const [port, rate, ...files] = args;
  const { startTestOrigin } = await import('../test/helpers/test-origin.js');
  const origin = await startTestOrigin({ rateBytesPerSec: Number(rate), port: Number(port) });
  const digests: string[] = [];
  for (const f of files) digests.push(await origin.addBlobFile(f));
  process.stdout.write(`${JSON.stringify({ url: origin.url, digests })}\n`);
  process.on('SIGTERM', () => void origin.close().then(() => process.exit(0)));
}

const isMain = process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href;
if (isMain && process.argv[2] === '--serve-origin') {
  await serveOrigin(process.argv.slice(3));
} else if (isMain) {
  const arg = (name: string) => {
    const i = process.argv.indexOf(name);
    return i > 0 ? process.argv[i + 1] : undefined;
  };
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      killAll();
      process.exit(130);
    });
  }
  const rows = await benchStage(cliOptions(process.argv.includes('--quick'), arg('--peers'), arg('--cpu-prof')));
  process.stdout.write(`${formatTable(rows)}\n`);
  process.stdout.write(`${JSON.stringify({ bench: 'stage', rows })}\n`);
}
