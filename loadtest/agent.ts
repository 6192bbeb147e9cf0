/**
 * Agent pipeline benchmark: what the agent does with a bundle — fetch (resumable download with
 * sha256 verification, shared/fetch.ts), then decrypt (age) → decompress (zstd) in a worker
 * thread → unpack (safe tar) in the main thread (services/agent/unpack.ts) — on a zstd + age
 * bundle of a sample root filesystem, against the shell pipeline
 * `curl URL | age -d -i KEY | zstd -d | tar x` on the same bundle, in the same run, from the same
 * origin (a child process, so neither side shares its event loop with the server).
 *
 *   npx tsx loadtest/agent.ts [--size-mib 1024] [--work-dir DIR] [--runs 2]
 *
 * prints a table and one JSON line. MB/s are bundle bytes per second of wall time (10^6).
 * The peer verifies nothing (no digest, no path checks); the agent verifies the digest before
 * it unpacks a byte, so its pipeline is fetch-then-unpack, not one stream.
 */
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { makeFleetKeys, packBundleFile } from '../services/demo/fleet.js';
import { OriginClient } from '../services/origin/client.js';
import { makeSampleRootfs } from '../shared/bundle/index.js';
import { unpackFile } from '../services/agent/unpack.js';
import { fetchBlob } from '../shared/fetch.js';
import { freePort } from '../shared/redis.js';
import { machineLine, mbps, type SuiteResult, textTable } from './report.js';

const BIN = fileURLToPath(new URL('../services/cli/bin.js', import.meta.url));

/** Options of benchAgent. */
export interface AgentBenchOptions {
  /** Size of the sample tree's filler in MiB (the bundle is about as big: the filler is incompressible). Default 1024. */
  sizeMiB?: number;
  /** Where the temp dir goes (default the OS temp dir). Needs about 6× sizeMiB free. */
  workDir?: string;
  /** Timed runs per side; the best is reported (default 2). */
  runs?: number;
}

/** The measurements of one benchAgent call. */
export interface AgentBenchResult {
  bundleBytes: number;
  /** Best wall time of the agent pipeline, ms, and its two phases in that run. */
  agentMs: number;
  agentFetchMs: number;
  agentUnpackMs: number;
  agentMBps: number;
  /** Best wall time of the shell pipeline, ms (null when a CLI is missing). */
  peerMs: number | null;
  peerMBps: number | null;
  /** agentMBps / peerMBps. Goal ≥ 0.8. */
  ratio: number | null;
  peerMissing: string[];
}


function sh(script: string): Promise<void> {
  return new Promise((res, rej) => {
    const c = spawn('bash', ['-o', 'pipefail', '-c', script], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    c.stderr.on('data', (d: Buffer) => {
      err += d.toString();
    });
    c.once('exit', (code) => (code === 0 ? res() : rej(new Error(`shell pipeline failed (${code}): ${err.slice(-500)}`))));
  });
}

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

/**
 * Builds the bundle, starts an origin child process holding it, and times both pipelines
 * (`runs` times each, alternating, best kept). Cleans up its temp dir and child.
 */
export async function benchAgent(opts: AgentBenchOptions = {}): Promise<AgentBenchResult> {
  const sizeMiB = opts.sizeMiB ?? 1024;
  const runs = opts.runs ?? 2;
  const root = await mkdtemp(join(opts.workDir ?? tmpdir(), 'sc-bench-agent-'));
  const missing = ['curl', 'age', 'zstd', 'tar'].filter((c) => spawnSync('which', [c], { stdio: 'ignore' }).status !== 0);
  let origin: ReturnType<typeof spawn> | undefined;
  try {
    const keys = await makeFleetKeys(join(root, 'keys'));
    const tree = join(root, 'tree');
    await makeSampleRootfs(tree, { id: 'debian', name: 'Debian GNU/Linux', version: '12', netFormat: 'ifupdown', sizeMiB });
    const bundleFile = join(root, 'bundle');
    const m = await packBundleFile(keys, { name: 'bench-os', version: '1', role: 'target', dir: tree, os: { id: 'debian', version: '12', netFormat: 'ifupdown' } }, bundleFile);
    await rm(tree, { recursive: true, force: true });

    const port = await freePort();
    const token = randomBytes(16).toString('hex');
    await writeFile(join(root, 'token'), `${token}\n`, { mode: 0o600 });
    origin = spawn(process.execPath, [BIN, 'origin', '--listen', `127.0.0.1:${port}`, '--data', join(root, 'origin'), '--token-file', join(root, 'token'), '--log-level', 'warn'], {
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    const url = `http://127.0.0.1:${port}`;
    const client = new OriginClient(url, { token });
    const deadline = Date.now() + 30_000;
    while (!(await client.health().then(() => true, () => false))) {
      if (Date.now() > deadline) throw new Error('origin did not start');
      await new Promise((r) => setTimeout(r, 100));
    }
    await client.putBlob(createReadStream(bundleFile, { highWaterMark: 1 << 20 }), m.blob.digest, m.blob.size);
    await rm(bundleFile, { force: true });

    let best = { total: Number.POSITIVE_INFINITY, fetch: 0, unpack: 0 };
    let peerBest = Number.POSITIVE_INFINITY;
    for (let i = 0; i < runs; i++) {
      const dir = join(root, `ours-${i}`);
      const out = join(root, `fetched-${i}`);
      await mkdir(dir, { recursive: true });
      const t0 = performance.now();
      await fetchBlob({ sources: [url], digest: m.blob.digest, size: m.blob.size, out });
      const t1 = performance.now();
      await unpackFile(out, m.blob, { dir, identities: keys.agent.identities });
      const t2 = performance.now();
      if (t2 - t0 < best.total) best = { total: t2 - t0, fetch: t1 - t0, unpack: t2 - t1 };
      await rm(dir, { recursive: true, force: true });
      await rm(out, { force: true });

      if (missing.length === 0) {
        const pdir = join(root, `peer-${i}`);
        await mkdir(pdir, { recursive: true });
        const ms = await timed(() =>
          sh(`curl -sfS ${url}/v1/blobs/${m.blob.digest} | age -d -i ${keys.files.fleetIdentity} | zstd -d -q | tar x -C ${pdir}`),
        );
        peerBest = Math.min(peerBest, ms);
        await rm(pdir, { recursive: true, force: true });
      }
    }
    const agentMBps = mbps(m.blob.size, best.total);
    const peerMBps = missing.length ? null : mbps(m.blob.size, peerBest);
    return {
      bundleBytes: m.blob.size,
      agentMs: Math.round(best.total),
      agentFetchMs: Math.round(best.fetch),
      agentUnpackMs: Math.round(best.unpack),
      agentMBps,
      peerMs: missing.length ? null : Math.round(peerBest),
      peerMBps,
      ratio: peerMBps ? Math.round((agentMBps / peerMBps) * 100) / 100 : null,
      peerMissing: missing,
    };
  } finally {
    if (origin && origin.exitCode === null) {
      const gone = new Promise((r) => origin!.once('exit', r));
      origin.kill('SIGTERM');
      await gone;
    }
    await rm(root, { recursive: true, force: true });
  }
}

/** The suite for `npm run bench` (loadtest/run.ts). */
export async function run(opts: Record<string, string | undefined>): Promise<SuiteResult> {
  const sizeMiB = Number(opts['size-mib'] ?? opts['bundle-mib'] ?? 1024);
  const r = await benchAgent({ sizeMiB });
  const rows: (string | number)[][] = [
    ['agent: fetch + verify, then decrypt + decompress + unpack', r.agentMBps, r.agentMs, `fetch ${r.agentFetchMs} ms, unpack ${r.agentUnpackMs} ms`],
    ['curl | age -d | zstd -d | tar x', r.peerMBps ?? 'skipped', r.peerMs ?? '-', r.peerMissing.length ? `missing: ${r.peerMissing.join(', ')}` : 'no verification'],
  ];
  return {
    suite: 'agent',
    headers: ['pipeline', 'MB/s', 'ms', 'notes'],
    rows,
    notes: [
      `bundle: ${(r.bundleBytes / 2 ** 20).toFixed(0)} MiB (zstd + age, incompressible sample tree), served by an origin child process on 127.0.0.1`,
      `ratio agent/peer: ${r.ratio ?? 'n/a'} (goal ≥ 0.8)`,
    ],
    data: { ...r },
  };
}

const isMain = process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href;
if (isMain) {
  const { values } = parseArgs({ options: { 'size-mib': { type: 'string' }, 'work-dir': { type: 'string' }, runs: { type: 'string' } } });
  const r = await benchAgent({ sizeMiB: Number(values['size-mib'] ?? 1024), workDir: values['work-dir'], runs: Number(values.runs ?? 2) });
  process.stdout.write(
    `${textTable(
      ['pipeline', 'MB/s', 'ms'],
      [
        [`agent (fetch ${r.agentFetchMs} ms + unpack ${r.agentUnpackMs} ms)`, r.agentMBps, r.agentMs],
        ['curl | age -d | zstd -d | tar x', r.peerMBps ?? 'skipped', r.peerMs ?? '-'],
      ],
    )}\n`,
  );
  process.stdout.write(`${JSON.stringify({ bench: 'agent', machine: machineLine(), ...r })}\n`);
}
