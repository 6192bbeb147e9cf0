/**
 * Host pipeline benchmark, on a zstd + age bundle of a sample root filesystem, each side beside
 * its shell peer in the same run, from the same origin (a child process, so neither side shares
 * its event loop with the server):
 *
 * - network: `fetchAndUnpack` (shared/fetch-unpack.ts, what `stagecoach get --unpack` runs): the
 *   resumable, sha256-verified download with decrypt (age) → decompress (zstd) in a worker thread
 *   and the safe tar in the main thread following the file as it is written, against
 *   `curl URL | age -d -i KEY | zstd -d | tar x`. Also timed: the same work in two passes (fetch,
 *   then unpack), to show where the time goes.
 * - from disk: `unpackFile` with the digest checked in the same pass (what the agent's
 *   install steps run on the kept bundle), against `age -d -i KEY FILE | zstd -d | tar x`.
 *
 *   npx tsx loadtest/agent.ts [--size-mib 1024] [--work-dir DIR] [--runs 3] [--settle-mib N] [--fresh-fs 0]
 *
 * Every tree, ours and the peers', goes onto a new file system when this process can make one
 * (TreeTargets), as the install steps unpack onto a partition they have just formatted.
 *
 * prints a table and one JSON line. MB/s are bundle bytes per second of wall time (10^6). The
 * peers verify nothing (no digest, no path checks).
 */
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createReadStream, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, open, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { makeFleetKeys, packBundleFile } from '../services/demo/fleet.js';
import { OriginClient } from '../services/origin/client.js';
import { makeSampleRootfs } from '../shared/bundle/index.js';
import { unpackFile } from '../shared/bundle/unpack-file.js';
import { fetchBlob } from '../shared/fetch.js';
import { fetchAndUnpack } from '../shared/fetch-unpack.js';
import { freePort } from '../shared/redis.js';
import { machineLine, mbps, median, type SuiteResult, textTable, unitNodeFlags } from './report.js';

const BIN = fileURLToPath(new URL('../services/cli/bin.js', import.meta.url));

/** Options of benchAgent. */
export interface AgentBenchOptions {
  /** Size of the sample tree's filler in MiB (the bundle is about as big: the filler is incompressible). Default 1024. */
  sizeMiB?: number;
  /** Where the temp dir goes (default the OS temp dir). Needs about 6× sizeMiB free. */
  workDir?: string;
  /** Timed runs per pipeline, alternating; the median is reported, with the spread (default 3). */
  runs?: number;
  /**
   * Pack this directory as it is (real content: libraries, binaries, text; tens of thousands of
   * files) instead of the sample tree with its incompressible filler; `sizeMiB` is then unused.
   */
  tree?: string;
  /**
   * MiB written to a scratch file and deleted before every timed pipeline (see `settleMemory`);
   * 0 turns it off. Default: the bundle plus its tar stream plus 256 MiB, at most the memory
   * available less 1 GiB.
   */
  settleMiB?: number;
  /**
   * Unpack every pipeline's tree onto a file system made for it (see `TreeTargets`), as the
   * install steps do; false: into directories of the work dir. Default: on when this process may
   * (root, mkfs.ext4 and a loop device).
   */
  freshFs?: boolean;
}

/** The measurements of one benchAgent call (median wall times over the runs, ms). */
export interface AgentBenchResult {
  bundleBytes: number;
  /** The tar stream's size (the manifest's unpackedSize). */
  unpackedBytes: number;
  /** Overlapped fetch + verify + unpack (fetchAndUnpack). */
  agentMs: number;
  agentMBps: number;
  /** True when every overlapped run took the overlapped path (not the fallback). */
  overlapped: boolean;
  /** The same work in two passes, and the median of each of its phases. */
  twoPassMs: number;
  twoPassFetchMs: number;
  twoPassUnpackMs: number;
  /** `curl | age -d | zstd -d | tar x` (null when a CLI is missing). */
  peerMs: number | null;
  /** `curl | tee FILE | age -d | zstd -d | tar x`: the peer that also keeps the bundle, as the agent must. */
  peerKeepMs: number | null;
  peerMBps: number | null;
  /** agentMBps / peerMBps (of the medians). Goal ≥ 1.0. */
  ratio: number | null;
  /** From the file on disk: unpackFile with the digest checked in the same pass. */
  fileMs: number;
  fileMBps: number;
  /** `age -d -i KEY FILE | zstd -d | tar x`. */
  filePeerMs: number | null;
  filePeerMBps: number | null;
  fileRatio: number | null;
  /** Runs of each pipeline. */
  runs: number;
  /** Every run's wall time, ms, in run order, by pipeline (`peer*` empty when a CLI is missing). */
  samples: { agent: number[]; twoPass: number[]; file: number[]; peer: number[]; peerKeep: number[]; filePeer: number[] };
  /**
   * Ours ÷ the peer's speed in each run, where both ran back to back (peer ms ÷ our ms), network
   * and from the file: the run-to-run spread of the ratio. Empty when a CLI is missing.
   */
  pairedRatios: { network: number[]; file: number[] };
  peerMissing: string[];
  /** MiB written and deleted before every timed pipeline (0: none). */
  settleMiB: number;
  /** True when every tree went onto a file system made for it; else why not. */
  freshFs: true | string;
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

const round2 = (x: number) => Math.round(x * 100) / 100;

/** `s` as one shell word. */
const q = (s: string) => `'${s.replaceAll("'", "'\\''")}'`;

/**
 * Where the pipelines' trees go. The install steps unpack onto a partition they have just
 * formatted (install-base: disk2p1; install-target: disk1), and so does every pipeline here, ours
 * and the peers': a new ext4 file system on a loop-mounted image file, made before the clock
 * starts and unmounted after it stops. Unpacking into a directory of a file system that has just
 * deleted the previous pipeline's tree measures that file system instead: ext4 skips inodes freed
 * in the last minutes when it allocates new ones (`recently_deleted`), and each skip reads an
 * inode table block. Measured on this bench's machine with the same 1.7 GiB tar of /usr:
 * `tar x` took 16.5 s (15.9 s system time) where a tree had just been deleted, and 5.4-6.8 s on
 * a fresh file system; `perf` put 49% of the deleted-tree run's samples under `recently_deleted`.
 * Where this process cannot make one (not root, no mkfs.ext4, no loop device), the trees go into
 * directories of the work dir, and the result says why.
 */
class TreeTargets {
  readonly #image: string;
  readonly #mnt: string;
  readonly #fallback: string;
  /** True, or why trees go into plain directories. */
  fresh: true | string;

  private constructor(root: string, fresh: true | string) {
    this.#image = join(root, 'trees.img');
    this.#mnt = join(root, 'trees');
    this.#fallback = root;
    this.fresh = fresh;
  }

  /** Tries once to make and mount the image (`bytes`, sparse); falls back to plain directories. */
  static async open(root: string, bytes: number, want: boolean): Promise<TreeTargets> {
    if (!want) return new TreeTargets(root, 'turned off (--fresh-fs 0)');
    if (process.platform !== 'linux' || process.getuid?.() !== 0) return new TreeTargets(root, 'not root on Linux: trees go into directories of the work dir');
    const t = new TreeTargets(root, true);
    try {
      await sh(`truncate -s ${bytes} ${q(t.#image)} && mkdir -p ${q(t.#mnt)}`);
      await t.#mount();
      await t.#unmount();
    } catch (err) {
      await rm(t.#image, { force: true });
      return new TreeTargets(root, `no fresh file system (${(err as Error).message.split('\n')[0].slice(0, 200)}): trees go into directories of the work dir`);
    }
    return t;
  }

  async #mount(): Promise<void> {
    await sh(`mkfs.ext4 -q -F ${q(this.#image)} && mount -o loop ${q(this.#image)} ${q(this.#mnt)}`);
  }

  async #unmount(): Promise<void> {
    await sh(`umount ${q(this.#mnt)}`);
  }

  /** An empty directory for one pipeline's tree (on a new file system when fresh); `done` puts it away. */
  async take(name: string): Promise<{ dir: string; done: () => Promise<void> }> {
    if (this.fresh !== true) {
      const dir = join(this.#fallback, name);
      await mkdir(dir, { recursive: true });
      return { dir, done: () => rm(dir, { recursive: true, force: true }) };
    }
    await this.#mount();
    const dir = join(this.#mnt, name);
    await mkdir(dir);
    return { dir, done: () => this.#unmount() };
  }

  /** Unmounts (if mounted) and deletes the image. */
  async close(): Promise<void> {
    if (this.fresh === true) await sh(`mountpoint -q ${q(this.#mnt)} && umount ${q(this.#mnt)} || true`).catch(() => {});
    await rm(this.#image, { force: true });
  }
}

/**
 * Leaves `mib` MiB of memory just freed, so that the next pipeline's page cache and buffers come
 * from resident memory. On a virtual machine whose balloon reports free pages to the host
 * (Linux page_reporting, as on this bench's machine), memory left free for a few seconds goes
 * back to the host, and the first touch of each of its pages then costs a host fault. Measured
 * here: writing 1 GiB into the page cache took 2.1-2.3 s of system time after 10 s idle, and
 * 0.18 s right after an earlier write was deleted. Without this, which pipeline paid that
 * depended on how long the clean-up before it took. Every pipeline, ours and the peers', gets
 * the same. A bare-metal host has no such cost, and this step changes nothing there.
 */
async function settleMemory(dir: string, mib: number): Promise<void> {
  if (mib <= 0) return;
  const path = join(dir, 'settle.scratch');
  const buf = Buffer.alloc(1 << 20, 0x5a);
  const fh = await open(path, 'w');
  try {
    for (let i = 0; i < mib; i++) await fh.write(buf);
  } finally {
    await fh.close();
    await rm(path, { force: true });
  }
}

/** MiB of memory available now (MemAvailable of /proc/meminfo), or null where that file is missing. */
function availableMiB(): number | null {
  try {
    const m = /^MemAvailable:\s+(\d+) kB/m.exec(readFileSync('/proc/meminfo', 'utf8'));
    return m ? Math.floor(Number(m[1]) / 1024) : null;
  } catch {
    return null;
  }
}

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

/**
 * Builds the bundle, starts an origin child process holding it, and times both pipelines
 * (`runs` times each, alternating; the medians are reported, with every run's time). Cleans up
 * its temp dir and child.
 */
export async function benchAgent(opts: AgentBenchOptions = {}): Promise<AgentBenchResult> {
  const sizeMiB = opts.sizeMiB ?? 1024;
  const runs = opts.runs ?? 3;
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`runs must be a positive integer, not ${runs}`);
  const root = await mkdtemp(join(opts.workDir ?? tmpdir(), 'sc-bench-agent-'));
  const missing = ['curl', 'age', 'zstd', 'tar'].filter((c) => spawnSync('which', [c], { stdio: 'ignore' }).status !== 0);
  let origin: ReturnType<typeof spawn> | undefined;
  let targets: TreeTargets | undefined;
  try {
    const keys = await makeFleetKeys(join(root, 'keys'));
    const tree = opts.tree ?? join(root, 'tree');
    if (!opts.tree) await makeSampleRootfs(tree, { id: 'debian', name: 'Debian GNU/Linux', version: '12', netFormat: 'ifupdown', sizeMiB });
    const bundleFile = join(root, 'bundle');
    const m = await packBundleFile(keys, { name: 'bench-os', version: '1', role: 'target', dir: tree, os: { id: 'debian', version: '12', netFormat: 'ifupdown' } }, bundleFile);
    if (!opts.tree) await rm(tree, { recursive: true, force: true });

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

    const identities = keys.agent.identities;
    const t: AgentBenchResult['samples'] & { fetch: number[]; unpack: number[] } = { agent: [], twoPass: [], fetch: [], unpack: [], file: [], peer: [], peerKeep: [], filePeer: [] };
    let allOverlapped = true;
    // Every pipeline starts on a settled disk: what the last one wrote, and its removal (this
    // file system may discard freed blocks), is on disk before the next clock starts. And on
    // resident memory (settleMemory).
    const settleMiB =
      opts.settleMiB ?? Math.max(0, Math.min(Math.ceil((m.blob.size + (m.blob.unpackedSize ?? m.blob.size)) / 2 ** 20) + 256, (availableMiB() ?? 0) - 1024));
    const clean = async (...paths: string[]) => {
      for (const p of paths) await rm(p, { recursive: true, force: true });
      await sh('sync');
      await settleMemory(root, settleMiB);
    };
    // Room for the largest tree with ext4's own overhead (inodes, journal) and slack.
    const unpacked = m.blob.unpackedSize ?? m.blob.size;
    targets = await TreeTargets.open(root, Math.max(1 << 30, Math.ceil(unpacked * 1.5) + (512 << 20)), opts.freshFs ?? true);
    const trees = targets;
    /** Times `fn` on a fresh tree target, on a settled disk and memory (target made, settled and put away outside the clock); removes `paths` after. */
    const onTree = async (name: string, fn: (dir: string) => Promise<unknown>, ...paths: string[]): Promise<number> => {
      const t = await trees.take(name);
      await clean();
      try {
        return await timed(() => fn(t.dir));
      } finally {
        await t.done();
        for (const p of paths) await rm(p, { recursive: true, force: true });
      }
    };
    for (let i = 0; i < runs; i++) {
      // Overlapped: one pass from the network into the tree.
      const out = join(root, `fetched-${i}`);
      const ms = await onTree(`ours-${i}`, async (dir) => {
        const r = await fetchAndUnpack({ sources: [url], digest: m.blob.digest, size: m.blob.size, out }, m.blob, { dir, identities }, async () => {
          for (const e of await readdir(dir)) await rm(join(dir, e), { recursive: true, force: true });
        });
        allOverlapped &&= r.overlapped;
      });
      t.agent.push(ms);

      // From disk: the kept-bundle install, digest checked in the same pass.
      t.file.push(await onTree(`file-${i}`, (dir) => unpackFile(out, m.blob, { dir, identities })));
      if (missing.length === 0) {
        t.filePeer.push(await onTree(`file-peer-${i}`, (dir) => sh(`age -d -i ${q(keys.files.fleetIdentity)} ${q(out)} | zstd -d -q | tar x -C ${q(dir)}`)));
      }
      await clean(out);

      // Two passes: fetch (verified), then unpack.
      const tout = join(root, `two-${i}.bundle`);
      let phases = { fetch: 0, unpack: 0 };
      const two = await onTree(
        `two-${i}`,
        async (dir) => {
          const t0 = performance.now();
          await fetchBlob({ sources: [url], digest: m.blob.digest, size: m.blob.size, out: tout });
          const t1 = performance.now();
          await unpackFile(tout, m.blob, { dir, identities, verified: true });
          phases = { fetch: t1 - t0, unpack: performance.now() - t1 };
        },
        tout,
      );
      t.twoPass.push(two);
      t.fetch.push(phases.fetch);
      t.unpack.push(phases.unpack);

      if (missing.length === 0) {
        t.peer.push(await onTree(`peer-${i}`, (dir) => sh(`curl -sfS ${url}/v1/blobs/${m.blob.digest} | age -d -i ${q(keys.files.fleetIdentity)} | zstd -d -q | tar x -C ${q(dir)}`)));
        const kept = join(root, `peer-${i}.bundle`);
        t.peerKeep.push(await onTree(`peer-keep-${i}`, (dir) => sh(`curl -sfS ${url}/v1/blobs/${m.blob.digest} | tee ${q(kept)} | age -d -i ${q(keys.files.fleetIdentity)} | zstd -d -q | tar x -C ${q(dir)}`), kept));
      }
    }
    const agentMs = median(t.agent);
    const fileMs = median(t.file);
    const peerMs = missing.length ? null : median(t.peer);
    const filePeerMs = missing.length ? null : median(t.filePeer);
    const agentMBps = mbps(m.blob.size, agentMs);
    const fileMBps = mbps(m.blob.size, fileMs);
    const peerMBps = peerMs === null ? null : mbps(m.blob.size, peerMs);
    const filePeerMBps = filePeerMs === null ? null : mbps(m.blob.size, filePeerMs);
    const ratio = (a: number, b: number | null) => (b ? round2(a / b) : null);
    const ms = (xs: number[]) => xs.map(Math.round);
    return {
      bundleBytes: m.blob.size,
      unpackedBytes: m.blob.unpackedSize ?? 0,
      agentMs: Math.round(agentMs),
      agentMBps,
      overlapped: allOverlapped,
      twoPassMs: Math.round(median(t.twoPass)),
      twoPassFetchMs: Math.round(median(t.fetch)),
      twoPassUnpackMs: Math.round(median(t.unpack)),
      peerMs: peerMs === null ? null : Math.round(peerMs),
      peerKeepMs: missing.length ? null : Math.round(median(t.peerKeep)),
      peerMBps,
      ratio: ratio(agentMBps, peerMBps),
      fileMs: Math.round(fileMs),
      fileMBps,
      filePeerMs: filePeerMs === null ? null : Math.round(filePeerMs),
      filePeerMBps,
      fileRatio: ratio(fileMBps, filePeerMBps),
      runs,
      samples: { agent: ms(t.agent), twoPass: ms(t.twoPass), file: ms(t.file), peer: ms(t.peer), peerKeep: ms(t.peerKeep), filePeer: ms(t.filePeer) },
      pairedRatios: { network: t.peer.map((p, i) => round2(p / t.agent[i])), file: t.filePeer.map((p, i) => round2(p / t.file[i])) },
      peerMissing: missing,
      settleMiB,
      freshFs: trees.fresh,
    };
  } finally {
    if (origin && origin.exitCode === null) {
      const gone = new Promise((r) => origin!.once('exit', r));
      origin.kill('SIGTERM');
      await gone;
    }
    await targets?.close();
    await rm(root, { recursive: true, force: true });
  }
}

/** Runs benchAgent in a child process started with the deployed agent's node flags. */
function benchAgentAsDeployed(sizeMiB: number, flags: string[], tree?: string, settleMiB?: number, freshFs?: boolean, runs?: number): Promise<AgentBenchResult> {
  return new Promise((res, rej) => {
    const args = [
      ...flags,
      '--import',
      'tsx',
      fileURLToPath(import.meta.url),
      '--size-mib',
      String(sizeMiB),
      ...(tree ? ['--tree', tree] : []),
      ...(settleMiB !== undefined ? ['--settle-mib', String(settleMiB)] : []),
      ...(freshFs === false ? ['--fresh-fs', '0'] : []),
      ...(runs !== undefined ? ['--runs', String(runs)] : []),
    ];
    const c = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    c.stdout.on('data', (d: Buffer) => {
      out += d.toString();
    });
    c.once('exit', (code) => {
      const line = out.trim().split('\n').at(-1) ?? '';
      if (code !== 0 || !line.startsWith('{')) rej(new Error(`agent bench child failed (${code}): ${out.slice(-500)}`));
      else res(JSON.parse(line) as AgentBenchResult);
    });
  });
}

/** The suite for `npm run bench` (loadtest/run.ts). */
export async function run(opts: Record<string, string | undefined>): Promise<SuiteResult> {
  const sizeMiB = Number(opts['size-mib'] ?? opts['bundle-mib'] ?? 1024);
  const flags = unitNodeFlags('agent');
  const tree = opts.tree ? resolve(opts.tree) : undefined;
  const settle = opts['settle-mib'];
  const r = await benchAgentAsDeployed(sizeMiB, flags, tree, settle === undefined ? undefined : Number(settle), opts['fresh-fs'] === '0' ? false : undefined, opts.runs === undefined ? undefined : Number(opts.runs));
  const skipped = r.peerMissing.length ? `missing: ${r.peerMissing.join(', ')}` : 'no verification';
  const spread = (xs: number[]) => (xs.length > 1 ? `; runs ${Math.min(...xs)}–${Math.max(...xs)} ms` : '');
  const rows: (string | number)[][] = [
    ['agent: fetch + verify + decrypt + decompress + unpack, overlapped', r.agentMBps, r.agentMs, `${r.overlapped ? 'one pass; sha256 checked before the tree counts' : 'fell back to two passes'}${spread(r.samples.agent)}`],
    ['agent: the same in two passes (fetch, then unpack)', mbps(r.bundleBytes, r.twoPassMs), r.twoPassMs, `fetch ${r.twoPassFetchMs} ms, unpack ${r.twoPassUnpackMs} ms${spread(r.samples.twoPass)}`],
    ['curl | age -d | zstd -d | tar x', r.peerMBps ?? 'skipped', r.peerMs ?? '-', `${skipped}${spread(r.samples.peer)}`],
    ['curl | tee FILE | age -d | zstd -d | tar x', r.peerKeepMs ? mbps(r.bundleBytes, r.peerKeepMs) : 'skipped', r.peerKeepMs ?? '-', `${skipped}; keeps the bundle, as the agent must (no fsync)${spread(r.samples.peerKeep)}`],
    ['agent: kept file → verify + decrypt + decompress + unpack, one pass', r.fileMBps, r.fileMs, `install-base / install-target${spread(r.samples.file)}`],
    ['age -d FILE | zstd -d | tar x', r.filePeerMBps ?? 'skipped', r.filePeerMs ?? '-', `${skipped}${spread(r.samples.filePeer)}`],
  ];
  return {
    suite: 'agent',
    headers: ['pipeline', 'MB/s', 'ms', 'notes'],
    rows,
    notes: [
      tree
        ? `bundle: ${(r.bundleBytes / 2 ** 20).toFixed(0)} MiB (zstd + age) of the real tree ${tree} (${(r.unpackedBytes / 2 ** 30).toFixed(2)} GiB as a tar stream), served by an origin child process on 127.0.0.1`
        : `bundle: ${(r.bundleBytes / 2 ** 20).toFixed(0)} MiB (zstd + age, incompressible sample tree), served by an origin child process on 127.0.0.1`,
      `MB/s and ms: the median of ${r.runs} runs of each pipeline, run in turn (ours, then the peers, then ours again…), each on a fresh file system`,
      `ratio agent/peer, network: ${r.ratio ?? 'n/a'}; from the file: ${r.fileRatio ?? 'n/a'} (goal ≥ 1.0)${r.pairedRatios.network.length > 1 ? `; run by run (the peer's time ÷ ours in the same round): network ${r.pairedRatios.network.join(', ')}; from the file ${r.pairedRatios.file.join(', ')}` : ''}`,
      `our pipelines run in a node process with the deployed agent's flags (infra/systemd/stagecoach-agent.service): ${flags.join(' ') || 'none'}`,
      r.settleMiB > 0
        ? `before every timed pipeline, ours and the peers', ${r.settleMiB} MiB are written to a scratch file and deleted, so that each starts on resident memory: on a VM whose balloon reports free pages to the host, re-touching memory left free for a few seconds costs a host fault per page (see settleMemory in loadtest/agent.ts; --settle-mib 0 turns it off)`
        : 'memory not settled before the pipelines (--settle-mib 0)',
      r.freshFs === true
        ? "every tree, ours and the peers', went onto a new ext4 file system (a loop-mounted image, made before the clock started and unmounted after it stopped), as the install steps unpack onto a partition they have just formatted (see TreeTargets in loadtest/agent.ts; --fresh-fs 0 turns it off)"
        : `trees went into directories of the work dir: ${r.freshFs}`,
    ],
    data: { ...r },
  };
}

const isMain = process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href;
if (isMain) {
  const { values } = parseArgs({
    options: { 'size-mib': { type: 'string' }, 'work-dir': { type: 'string' }, runs: { type: 'string' }, tree: { type: 'string' }, 'settle-mib': { type: 'string' }, 'fresh-fs': { type: 'string' } },
  });
  const r = await benchAgent({
    sizeMiB: Number(values['size-mib'] ?? 1024),
    workDir: values['work-dir'],
    runs: Number(values.runs ?? 3),
    tree: values.tree,
    settleMiB: values['settle-mib'] === undefined ? undefined : Number(values['settle-mib']),
    freshFs: values['fresh-fs'] === '0' ? false : undefined,
  });
  process.stdout.write(
    `${textTable(
      ['pipeline', 'MB/s', 'ms'],
      [
        [`agent overlapped${r.overlapped ? '' : ' (fell back)'}`, r.agentMBps, r.agentMs],
        [`agent two passes (fetch ${r.twoPassFetchMs} ms + unpack ${r.twoPassUnpackMs} ms)`, mbps(r.bundleBytes, r.twoPassMs), r.twoPassMs],
        ['curl | age -d | zstd -d | tar x', r.peerMBps ?? 'skipped', r.peerMs ?? '-'],
        ['curl | tee FILE | age -d | zstd -d | tar x', r.peerKeepMs ? mbps(r.bundleBytes, r.peerKeepMs) : 'skipped', r.peerKeepMs ?? '-'],
        ['agent from the kept file', r.fileMBps, r.fileMs],
        ['age -d FILE | zstd -d | tar x', r.filePeerMBps ?? 'skipped', r.filePeerMs ?? '-'],
      ],
    )}\n`,
  );
  process.stdout.write(`${JSON.stringify({ bench: 'agent', machine: machineLine(), ...r })}\n`);
}
