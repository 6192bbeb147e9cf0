/**
 * `npm run bench -- origin [--size-mib 1024]`: MB/s for a blob of that size through the
 * origin (upload through the typed client, download through the read client and with curl),
 * beside nginx serving the same file statically, plus the codec suite (pack/unpack and the
 * `tar | zstd | age` CLI pipelines) on a tree of the same size.
 */
import { randomBytes, createHash } from 'node:crypto';
import { chmodSync, createWriteStream, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { OriginClient } from '../services/origin/client.js';
import { startOrigin } from '../services/origin/main.js';
import { silentLogger } from '../shared/log.js';
import { run as runCodec } from './codec.js';
import { curlDownload, startNginxStatic } from './peers.js';
import { mbps, type SuiteResult } from './report.js';

async function writeRandomFile(path: string, bytes: number): Promise<string> {
  const h = createHash('sha256');
  const out = createWriteStream(path);
  const chunk = 1 << 20;
  for (let done = 0; done < bytes; done += chunk) {
    const b = randomBytes(Math.min(chunk, bytes - done));
    h.update(b);
    if (!out.write(b)) await new Promise<void>((r) => out.once('drain', () => r()));
  }
  await new Promise<void>((resolve, reject) => out.end((err?: Error | null) => (err ? reject(err) : resolve())));
  return `sha256:${h.digest('hex')}`;
}

export async function run(opts: Record<string, string | undefined>): Promise<SuiteResult> {
  const sizeMiB = Number(opts['size-mib'] ?? 1024);
  const size = sizeMiB * 2 ** 20;
  const work = mkdtempSync(join(tmpdir(), 'sc-bench-origin-'));
  chmodSync(work, 0o755); // nginx workers run unprivileged and must reach the static file
  const notes: string[] = [`blob ${sizeMiB} MiB of random bytes, loopback, one client`];
  const rows: (string | number)[][] = [];
  const data: Record<string, unknown> = { sizeMiB };
  try {
    const src = join(work, 'static', 'blob.bin');
    mkdirSync(join(work, 'static'));

    const digest = await writeRandomFile(src, size);

    const tokenFile = join(work, 'token');
    writeFileSync(tokenFile, 'bench-token\n');
    const origin = await startOrigin({ listen: '127.0.0.1:0', data: join(work, 'data'), tokenFile }, { logger: silentLogger });
    try {
      const client = new OriginClient(origin.url, { token: 'bench-token', timeoutMs: 600_000 });
      let t = Date.now();
      await client.putBlob(src, digest, size, { skipIfPresent: false });
      const up = mbps(size, Date.now() - t);
      t = Date.now();
      const dl = await client.openBlob(digest);
      let got = 0;
      await pipeline(
        dl.stream,
        new Writable({
          highWaterMark: 1 << 20,
          write(c: Buffer, _e, cb) {
            got += c.length;
            cb();
          },
        }),
      );
      const down = mbps(got, Date.now() - t);
      rows.push(['origin upload (OriginClient.putBlob, sha256-verified, fsync)', up]);
      rows.push(['origin download (ReadClient stream)', down]);
      Object.assign(data, { upload_MBps: up, download_MBps: down });
      const c1 = await curlDownload(client.blobUrl(digest));
      if (c1) {
        rows.push(['origin download (curl)', mbps(c1.bytes, c1.ms)]);
        data.download_curl_MBps = mbps(c1.bytes, c1.ms);
      }
    } finally {
      await origin.close();
    }
    const nginx = await startNginxStatic(join(work, 'static'), work);
    if (nginx) {
      try {
        const c = (await curlDownload(`${nginx.url}/blob.bin`))!;
        rows.push(['peer: nginx static (curl)', mbps(c.bytes, c.ms)]);
        data.nginx_static_curl_MBps = mbps(c.bytes, c.ms);
      } finally {
        nginx.stop();
      }
    } else notes.push('peer nginx skipped: not installed (apt-get install -y nginx)');
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  const codec = await runCodec({ 'size-mib': String(sizeMiB) });
  for (const r of codec.rows) rows.push([`codec: ${r[0]}`, r[1]]);
  notes.push(...codec.notes);
  data.codec = codec.data;
  return { suite: 'origin', headers: ['measurement', 'MB/s'], rows, notes, data };
}
