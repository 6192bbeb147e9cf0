/**
 * Codec benchmark: pack and unpack of a sample root filesystem (tar → zstd → age and back),
 * our age encrypt/decrypt against the pure-JS `age-encryption` package and the `age` CLI, and
 * the CLI pipelines `tar | zstd | age` / `age -d | zstd -d | tar x` as the peer baseline, all
 * in the same invocation. Numbers are MB/s of plaintext tree bytes (10^6 bytes per second).
 *
 *   npx tsx loadtest/codec.ts [--size-mib 256] [--work-dir /tmp]
 *
 * prints a table and one JSON line. CLI peers are skipped (flag `peer_cli_missing: 1`) when
 * `tar`, `zstd` or `age` is not installed.
 */
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Decrypter, Encrypter } from 'age-encryption';
import { decryptStream, encryptStream, generateAgeIdentity, makeSampleRootfs, packBundle, unpackBundle } from '../shared/bundle/index.js';
import { machineLine, mbps, type SuiteResult, textTable } from './report.js';

const devNull = () =>
  new Writable({
    highWaterMark: 1 << 20,
    write(_c, _e, cb) {
      cb();
    },
  });

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

function sh(script: string): Promise<void> {
  return new Promise((resolvePromise, reject) => {
    const p = spawn('bash', ['-o', 'pipefail', '-c', script], { stdio: ['ignore', 'ignore', 'inherit'] });
    p.on('error', reject);
    p.on('exit', (code) => (code === 0 ? resolvePromise() : reject(new Error(`exit ${code}: ${script}`))));
  });
}

async function drainWeb(s: ReadableStream<Uint8Array>): Promise<void> {
  const r = s.getReader();
  for (;;) {
    const { done } = await r.read();
    if (done) return;
  }
}

/**
 * Measures codec throughput on a `sizeMiB` sample tree built under `workDir` (removed after).
 * Returns MB/s figures keyed by measurement, plus `tree_bytes`, `bundle_bytes` and
 * `peer_cli_missing` (1 when the CLI peers were skipped).
 */
export async function benchCodec(opts: { sizeMiB: number; workDir: string }): Promise<Record<string, number>> {
  const work = mkdtempSync(join(resolve(opts.workDir), 'sc-bench-codec-'));
  const out: Record<string, number> = {};
  try {
    const tree = join(work, 'tree');
    const { fillerBytes } = await makeSampleRootfs(tree, { id: 'debian', name: 'Debian GNU/Linux', version: '12', netFormat: 'ifupdown', sizeMiB: opts.sizeMiB });
    const bytes = fillerBytes; // the few KiB of small files are noise at this size
    out.tree_bytes = bytes;
    const { identity, recipient } = await generateAgeIdentity();
    const idFile = join(work, 'key.txt');
    writeFileSync(idFile, `${identity}\n`, { mode: 0o600 });

    // The pipelines, as the publisher and the agent run them.
    const blob = join(work, 'bundle.tar.zst.age');
    out.pack_zstd_age_MBps = mbps(bytes, await timed(() => pipeline(packBundle({ dir: tree }, { compression: 'zstd', recipients: [recipient] }), createWriteStream(blob))));
    out.bundle_bytes = statSync(blob).size;
    const unpacked = join(work, 'unpacked');
    out.unpack_zstd_age_MBps = mbps(
      bytes,
      await timed(() => unpackBundle(createReadStream(blob, { highWaterMark: 1 << 20 }), { dir: unpacked, compression: 'zstd', encryption: 'age', identities: [identity] })),
    );
    rmSync(unpacked, { recursive: true, force: true });

    // age alone, on a plaintext of the same size.
    const plain = join(work, 'plain.bin');
    const cipher = join(work, 'plain.bin.age');
    await pipeline(
      Readable.from(
        (function* () {
          for (let left = bytes; left > 0; left -= 1 << 20) yield randomBytes(Math.min(left, 1 << 20));
        })(),
      ),
      createWriteStream(plain),
    );
    const read = (f: string) => createReadStream(f, { highWaterMark: 1 << 20 });
    // Every encrypt/decrypt below reads a page-cached file and discards its output.
    out.age_encrypt_ours_MBps = mbps(bytes, await timed(() => pipeline(read(plain), encryptStream([recipient]), devNull())));
    await pipeline(read(plain), encryptStream([recipient]), createWriteStream(cipher));
    out.age_decrypt_ours_MBps = mbps(bytes, await timed(() => pipeline(read(cipher), decryptStream([identity]), devNull())));
    out.age_encrypt_pkg_MBps = mbps(
      bytes,
      await timed(async () => {
        const e = new Encrypter();
        e.addRecipient(recipient);
        await drainWeb(await e.encrypt(Readable.toWeb(read(plain)) as ReadableStream<Uint8Array>));
      }),
    );
    out.age_decrypt_pkg_MBps = mbps(
      bytes,
      await timed(async () => {
        const d = new Decrypter();
        d.addIdentity(identity);
        await drainWeb(await d.decrypt(Readable.toWeb(read(cipher)) as ReadableStream<Uint8Array>));
      }),
    );

    const missing = ['tar', 'zstd', 'age'].filter((c) => spawnSync(c, ['--version'], { stdio: 'ignore' }).status !== 0);
    out.peer_cli_missing = missing.length ? 1 : 0;
    if (!missing.length) {
      out.age_encrypt_cli_MBps = mbps(bytes, await timed(() => sh(`age -r ${recipient} < '${plain}' > /dev/null`)));
      out.age_decrypt_cli_MBps = mbps(bytes, await timed(() => sh(`age -d -i '${idFile}' < '${cipher}' > /dev/null`)));
      const peerBlob = join(work, 'peer.tar.zst.age');
      out.peer_pack_cli_MBps = mbps(bytes, await timed(() => sh(`tar -C '${tree}' -cf - . | zstd -3 -q -c | age -r ${recipient} > '${peerBlob}'`)));
      const peerOut = join(work, 'peer-out');
      out.peer_unpack_cli_MBps = mbps(
        bytes,
        await timed(() => sh(`mkdir -p '${peerOut}' && age -d -i '${idFile}' < '${peerBlob}' | zstd -d -q -c | tar -C '${peerOut}' -xpf -`)),
      );
    }
    return out;
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

const LABELS: [string, string][] = [
  ['pack_zstd_age_MBps', 'pack dir → tar → zstd → age (ours)'],
  ['peer_pack_cli_MBps', 'pack: tar | zstd -3 | age (CLIs)'],
  ['unpack_zstd_age_MBps', 'unpack age → zstd → safeExtract (ours)'],
  ['peer_unpack_cli_MBps', 'unpack: age -d | zstd -d | tar x (CLIs)'],
  ['age_encrypt_ours_MBps', 'age encrypt, node:crypto (ours)'],
  ['age_encrypt_pkg_MBps', 'age encrypt, age-encryption package'],
  ['age_encrypt_cli_MBps', 'age encrypt, age CLI'],
  ['age_decrypt_ours_MBps', 'age decrypt, node:crypto (ours)'],
  ['age_decrypt_pkg_MBps', 'age decrypt, age-encryption package'],
  ['age_decrypt_cli_MBps', 'age decrypt, age CLI'],
];

/** The codec suite in the loadtest/report.ts format. */
export async function run(opts: Record<string, string | undefined>): Promise<SuiteResult> {
  const sizeMiB = Number(opts['size-mib'] ?? 256);
  const r = await benchCodec({ sizeMiB, workDir: opts['work-dir'] ?? tmpdir() });
  return {
    suite: 'codec',
    headers: ['measurement', 'MB/s'],
    rows: LABELS.map(([k, label]) => [label, k in r ? r[k] : 'skipped']),
    notes: [
      `tree ${sizeMiB} MiB of incompressible filler; bundle ${(r.bundle_bytes / 2 ** 20).toFixed(1)} MiB (zstd level 3, age X25519)`,
      ...(r.peer_cli_missing ? ['CLI peers skipped: tar, zstd or age is not installed'] : []),
    ],
    data: { sizeMiB, ...r },
  };
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const { values } = parseArgs({ options: { 'size-mib': { type: 'string' }, 'work-dir': { type: 'string' } } });
  const r = await run(values);
  process.stdout.write(`${textTable(r.headers, r.rows)}\n`);
  for (const n of r.notes) process.stdout.write(`  ${n}\n`);
  process.stdout.write(`${JSON.stringify({ suite: r.suite, machine: machineLine(), date: new Date().toISOString(), ...r.data })}\n`);
}
