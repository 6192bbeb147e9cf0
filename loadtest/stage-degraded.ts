/**
 * Degraded-stage benchmark: how long a host takes to get a blob when its only stage loses its
 * upstream, with origin as the host's last resort. Scenarios (stage cold on the blob):
 * - refused: the stage's upstream is stopped before the request (connections refused);
 * - blackhole: the stage's upstream accepts connections and never answers;
 * - mid-body: the stage's upstream closes while the host is 1 MiB into the body;
 * - frozen: the link to the stage's upstream goes silent (nothing closed, nothing answered)
 *   while the host is 1 MiB into the body;
 * - stage-frozen: the link between the host and the stage goes silent the same way (a stage
 *   machine that died without closing anything); the stage itself stays healthy.
 * Each runs twice in the same invocation: the host with its stall checks off (`stallCheckMs: 0`,
 * only the 30 s idle timeout, the baseline) and on (the default). The stage side (background
 * upstream checks, refusing misses while degraded) is the same in both. Host defaults otherwise
 * (`retries` 3, backoff 500 ms). Prints a table and one JSON line.
 * Run: `npx tsx loadtest/stage-degraded.ts [--quick]` (`--quick`: refused and mid-body only).
 * Everything listens on 127.0.0.1 and runs in this process.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { createConnection, createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { startStage } from '../services/stage/main.js';
import { fetchBlob } from '../shared/fetch.js';
import { silentLogger } from '../shared/log.js';
import { startTestOrigin } from '../test/helpers/test-origin.js';
import { type SuiteResult, textTable } from './report.js';

type Scenario = 'refused' | 'blackhole' | 'mid-body' | 'frozen' | 'stage-frozen';

/** A TCP proxy to `port` whose `freeze()` stops forwarding and leaves new connections unanswered. */
async function freezableProxy(port: number): Promise<{ url: string; freeze(): void; close(): Promise<void> }> {
  const socks = new Set<Socket>();
  const pairs: [Socket, Socket][] = [];
  let frozen = false;
  const srv = createServer((c) => {
    socks.add(c);
    c.on('error', () => {});
    if (frozen) return;
    const u = createConnection({ host: '127.0.0.1', port });
    socks.add(u);
    u.on('error', () => c.destroy());
    c.on('close', () => u.destroy());
    c.pipe(u);
    u.pipe(c);
    pairs.push([c, u]);
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  return {
    url: `http://127.0.0.1:${(srv.address() as { port: number }).port}`,
    freeze() {
      frozen = true;
      for (const [c, u] of pairs) {
        c.unpipe(u);
        u.unpipe(c);
        c.pause();
        u.pause();
      }
    },
    close: async () => {
      for (const s of socks) s.destroy();
      await new Promise<void>((r) => srv.close(() => r()));
    },
  };
}

async function blackhole(): Promise<{ url: string; close(): Promise<void> }> {
  const socks = new Set<Socket>();
  const srv = createServer((s) => {
    socks.add(s);
    s.on('error', () => {});
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as { port: number }).port;
  return {
    url: `http://127.0.0.1:${port}`,
    close: async () => {
      for (const s of socks) s.destroy();
      await new Promise<void>((r) => srv.close(() => r()));
    },
  };
}

/** One run; resolves with the ms until the host holds the verified blob, and where it came from. */
async function once(kind: Scenario, stallCheckMs: number): Promise<{ ms: number; sources: string[] }> {
  const dir = await mkdtemp(join(tmpdir(), 'bench-degraded-'));
  const data = randomBytes(4 * 1024 * 1024);
  const up = await startTestOrigin({ rateBytesPerSec: 8 * 1024 * 1024 });
  const origin = await startTestOrigin();
  const bh = await blackhole();
  const link = await freezableProxy(up.port);
  const d = up.addBlob(data);
  origin.addBlob(data);
  const upstream = kind === 'blackhole' ? bh.url : kind === 'frozen' ? link.url : up.url;
  const stage = await startStage({ listen: '127.0.0.1:0', upstreams: [upstream], cache: join(dir, 'cache'), colo: 'bench' }, { log: silentLogger });
  const hostLink = await freezableProxy(stage.port);
  const stageUrl = kind === 'stage-frozen' ? hostLink.url : stage.url;
  try {
    if (kind === 'refused') await up.close();
    if (kind === 'mid-body') up.fault({ kind: 'stall', afterBytes: 1024 * 1024 });
    let closed = false;
    const t0 = performance.now();
    const r = await fetchBlob({
      sources: [stageUrl],
      origin: origin.url,
      digest: d,
      size: data.length,
      out: join(dir, 'out'),
      stallCheckMs,
      signal: AbortSignal.timeout(300_000),
      onProgress: (p) => {
        if (!closed && p.bytes >= 1024 * 1024 && kind !== 'refused' && kind !== 'blackhole') {
          closed = true;
          if (kind === 'frozen') link.freeze();
          else if (kind === 'stage-frozen') hostLink.freeze();
          else void up.close();
        }
      },
    });
    const ms = performance.now() - t0;
    return { ms, sources: r.sources.map((s) => (s === origin.url ? 'origin' : s === stageUrl ? 'stage' : s)) };
  } finally {
    await stage.close();
    await Promise.all([origin.close(), up.close().catch(() => undefined), bh.close(), link.close(), hostLink.close()]);
    await rm(dir, { recursive: true, force: true });
  }
}

/** Runs the scenarios; see the module comment. */
export async function run(opts: Record<string, string | undefined> = {}): Promise<SuiteResult> {
  const kinds: Scenario[] = opts.quick !== undefined ? ['refused', 'mid-body'] : ['refused', 'blackhole', 'mid-body', 'frozen', 'stage-frozen'];
  const rows: (string | number)[][] = [];
  const data: Record<string, unknown> = {};
  for (const kind of kinds) {
    const base = await once(kind, 0);
    const now = await once(kind, 3000);
    rows.push([kind, (base.ms / 1000).toFixed(1), (now.ms / 1000).toFixed(1), (base.ms / now.ms).toFixed(1), now.sources.join(' then ')]);
    data[kind] = { baselineMs: Math.round(base.ms), stallChecksMs: Math.round(now.ms), sources: now.sources };
  }
  return {
    suite: 'stage-degraded',
    headers: ['scenario', 'idle timeout only (s)', 'stall checks (s)', 'speed-up', 'bytes from'],
    rows,
    notes: ['4 MiB blob, host with one stage and origin; stage upstream checks: every 3 s, 2 s deadline, down after 2 failures'],
    data,
  };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const r = await run({ quick: process.argv.includes('--quick') ? '' : undefined });
  process.stdout.write(`${textTable(r.headers, r.rows)}\n${r.notes.join('\n')}\n${JSON.stringify({ suite: r.suite, ...r.data })}\n`);
  process.exit(0);
}
