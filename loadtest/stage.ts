/**
 * Stage benchmark: stagecoach stage vs nginx (proxy_cache_lock) vs Varnish, side by side in one
 * run, behind the same throttled origin (the test origin in a child process, one shared rate
 * limiter). Scenarios per peer, each on a cold cache:
 * - cold herd: `herdClients` clients GET a `bigMiB` object at once (origin requests and bytes,
 *   TTFB p50/p99, completion p99 ÷ origin transfer time, where origin transfer time is
 *   size ÷ rate, the floor for any cache);
 * - cold herd 2: `herd2Clients` clients on a smaller `herd2MiB` object (bounded run time);
 * - warm: `warmClients` clients GET the cached big object at once (aggregate GB/s, and the ratio
 *   to nginx serving the same file statically).
 * The stage runs as a child process (`node services/cli/bin.js stage …`) so its peak RSS
 * (VmHWM) over the herds is measurable. Prints a table and one JSON line.
 * Run: `npx tsx loadtest/stage.ts [--quick]`. Everything listens on 127.0.0.1; children are
 * killed on exit; each scenario has a deadline.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm, symlink } from 'node:fs/promises';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { freePort } from '../shared/redis.js';
import { type SuiteResult, textTable } from './report.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, '..');
const MiB = 1024 * 1024;

/** Benchmark knobs (sizes in MiB, rate in bytes/s, deadline in ms). */
export interface BenchOptions {
  bigMiB?: number;
  herdClients?: number;
  herd2MiB?: number;
  herd2Clients?: number;
  warmClients?: number;
  rateBytesPerSec?: number;
  peers?: ('stage' | 'nginx' | 'varnish')[];
  scenarioTimeoutMs?: number;
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
  rssMiB: number | null;
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

function start(cmd: string, args: string[], opts: { cwd?: string } = {}): ChildProcess {
  const c = spawn(cmd, args, { cwd: opts.cwd ?? ROOT, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
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

function vmMiB(pid: number, field: 'VmHWM' | 'VmRSS'): number | null {
  try {
    const m = new RegExp(`${field}:\\s+(\\d+) kB`).exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : null;
  } catch {
    return null;
  }
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
  pid?: number;
  stop(): Promise<void>;
  staticUrl?: string;
  idleRssMiB?: number | null;
}

async function startStagePeer(dir: string, originUrl: string): Promise<Peer> {
  const port = await freePort();
  const c = start(process.execPath, [
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
  ]);
  c.stderr?.on('data', () => {});
  c.stdout?.on('data', () => {});
  const url = `http://127.0.0.1:${port}`;
  await waitHttp(`${url}/healthz`, 'stage');
  await new Promise((r) => setTimeout(r, 1000));
  return { name: 'stage', url, pid: c.pid, idleRssMiB: c.pid ? vmMiB(c.pid, 'VmRSS') : null, stop: () => stop(c) };
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
  return { name: 'nginx', url: `http://127.0.0.1:${cachePort}`, staticUrl: `http://127.0.0.1:${staticPort}`, pid: c.pid, stop: () => stop(c) };
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
  return { name: 'varnish', url: `http://127.0.0.1:${port}`, pid: c.pid, stop: () => stop(c) };
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
    peers: ['stage', 'nginx', 'varnish'] as const,
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
      const peerDir = join(dir, name);
      mkdirSync(peerDir, { recursive: true });
      const p =
        name === 'stage'
          ? await startStagePeer(peerDir, info.url)
          : name === 'nginx'
            ? await startNginxPeer(peerDir, originPort, staticRoot)
            : await startVarnishPeer(peerDir, originPort);
      if (typeof p === 'string') {
        o.log(p);
        rows.push(row({ peer: name, scenario: 'cold-herd', clients: 0, objectMiB: 0, note: p }));
        continue;
      }
      try {
        for (const [scenario, digest, n, mib] of [
          ['cold-herd', bigD, o.herdClients, o.bigMiB],
          ['cold-herd-2', medD, o.herd2Clients, o.herd2MiB],
        ] as const) {
          const before = await originCounters(info.url);
          o.log(`${name}: ${scenario}, ${n} clients x ${mib} MiB`);
          const r = await runClients(`${p.url}/v1/blobs/${digest}`, n, o.scenarioTimeoutMs);
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
              errors: r.errors,
            }),
          );
          o.log(`  ${JSON.stringify(rows.at(-1))}`);
        }
        if (name === 'stage' && p.pid) {
          rows.push(row({ peer: name, scenario: 'rss', clients: Math.max(o.herdClients, o.herd2Clients), objectMiB: o.bigMiB, rssMiB: vmMiB(p.pid, 'VmHWM'), note: `idle RSS before the herds: ${p.idleRssMiB?.toFixed(0)} MiB` }));
        }
        if (name === 'nginx' && p.staticUrl) {
          o.log(`nginx static: warm, ${o.warmClients} clients x ${o.bigMiB} MiB`);
          const s = await runClients(`${p.staticUrl}/v1/blobs/${bigD}`, o.warmClients, o.scenarioTimeoutMs);
          nginxStaticGbps = s.bytes / s.wall / 1e9;
          rows.push(row({ peer: 'nginx-static', scenario: 'warm', clients: o.warmClients, objectMiB: o.bigMiB, gbps: nginxStaticGbps, vsNginxStatic: 1, errors: s.errors }));
        }
        o.log(`${name}: warm, ${o.warmClients} clients x ${o.bigMiB} MiB`);
        const w = await runClients(`${p.url}/v1/blobs/${bigD}`, o.warmClients, o.scenarioTimeoutMs);
        rows.push(row({ peer: name, scenario: 'warm', clients: o.warmClients, objectMiB: o.bigMiB, gbps: w.bytes / w.wall / 1e9, errors: w.errors }));
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

const HEADERS = ['peer', 'scenario', 'clients', 'MiB', 'origin req', 'origin bytes ×', 'TTFB p50 s', 'TTFB p99 s', 'done p99 s', 'done ÷ transfer', 'GB/s', 'vs nginx static', 'RSS MiB', 'errors'];

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
    f(r.rssMiB, 0),
    r.errors,
  ]);
}

/** Prints rows as an aligned table. */
export function formatTable(rows: BenchRow[]): string {
  return textTable(HEADERS, cells(rows));
}

/** The stage suite in the loadtest/report.ts format (`npm run bench -- stage`). */
export async function run(opts: Record<string, string | undefined>): Promise<SuiteResult> {
  const quick = opts.quick !== undefined;
  const rows = await benchStage(quick ? { bigMiB: 32, herd2MiB: 16, herd2Clients: 50, warmClients: 8 } : {});
  return {
    suite: 'stage',
    headers: HEADERS,
    rows: cells(rows),
    notes: [
      'origin: the same test origin for every peer, throttled to 25 MB/s, in its own process; stage run as `node services/cli/bin.js stage`',
      'goals: origin bytes 1.00× per colo; waiters TTFB p99 ≤ 0.2 s; completion ≤ 1.1× the origin transfer time; warm ≥ 0.8× nginx static; stage RSS ≤ 150 MiB',
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
  const quick = process.argv.includes('--quick');
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      killAll();
      process.exit(130);
    });
  }
  const rows = await benchStage(quick ? { bigMiB: 32, herd2MiB: 16, herd2Clients: 50, warmClients: 8 } : {});
  process.stdout.write(`${formatTable(rows)}\n`);
  process.stdout.write(`${JSON.stringify({ bench: 'stage', rows })}\n`);
}
