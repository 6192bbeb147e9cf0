/** Peer processes for benchmarks: nginx serving a directory statically, and curl timings. */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

/** True when `cmd` is on the PATH (or is an existing absolute path). */
export function have(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

import { freePort } from '../shared/redis.js';

export { freePort };

/** Waits until `url` answers any HTTP status, or throws after `ms`. */
export async function waitHttp(url: string, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    try {
      await fetch(url);
      return;
    } catch {
      if (Date.now() > end) throw new Error(`${url} did not come up`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

/** nginx serving `root` on 127.0.0.1 (sendfile on), in a private prefix under `workDir`. */
export async function startNginxStatic(root: string, workDir: string): Promise<{ url: string; stop(): void } | null> {
  const nginx = ['/usr/sbin/nginx', 'nginx'].find((c) => have(c));
  if (!nginx) return null;
  const port = await freePort();
  const prefix = join(workDir, 'nginx-static');
  mkdirSync(join(prefix, 'logs'), { recursive: true });
  const conf = join(prefix, 'nginx.conf');
  writeFileSync(
    conf,
    `worker_processes 1;\nerror_log ${prefix}/logs/error.log;\npid ${prefix}/nginx.pid;\nevents { worker_connections 1024; }\n` +
      `http { access_log off; sendfile on; tcp_nopush on; client_body_temp_path ${prefix}/body; proxy_temp_path ${prefix}/proxy;\n` +
      `fastcgi_temp_path ${prefix}/fcgi; uwsgi_temp_path ${prefix}/uwsgi; scgi_temp_path ${prefix}/scgi;\n` +
      `server { listen 127.0.0.1:${port}; root ${root}; } }\n`,
  );
  const child: ChildProcess = spawn(nginx, ['-p', prefix, '-c', conf, '-g', 'daemon off;'], { stdio: 'ignore' });
  await waitHttp(`http://127.0.0.1:${port}/`);
  return { url: `http://127.0.0.1:${port}`, stop: () => child.kill('SIGTERM') };
}

/**
 * Downloads `url` with curl to /dev/null; returns {ms, bytes}, or null when curl is missing.
 * Asynchronous on purpose: the server under test may run in this very process.
 */
export async function curlDownload(url: string): Promise<{ ms: number; bytes: number } | null> {
  if (!have('curl')) return null;
  const t = Date.now();
  const child = spawn('curl', ['-fsS', '-o', '/dev/null', '-w', '%{size_download}', url], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (c: Buffer) => {
    out += c;
  });
  child.stderr.on('data', (c: Buffer) => {
    err += c;
  });
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  if (code !== 0) throw new Error(`curl ${url}: exit ${code}: ${err}`);
  return { ms: Date.now() - t, bytes: Number(out) };
}

/**
 * Installs missing peer packages with apt-get when running as root (the benchmarks compare
 * against them); otherwise, or when the install fails, lists what will be skipped.
 */
export function ensurePeers(packages: Record<string, string>): string[] {
  const missing = Object.entries(packages).filter(([cmd]) => !have(cmd));
  if (missing.length === 0) return [];
  const names = [...new Set(missing.map(([, pkg]) => pkg))];
  if (process.getuid?.() === 0 && have('apt-get')) {
    process.stderr.write(`installing benchmark peers: ${names.join(' ')}\n`);
    spawnSync('apt-get', ['update', '-qq'], { stdio: 'ignore' });
    spawnSync('apt-get', ['install', '-y', '-qq', ...names], { stdio: 'ignore', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  }
  return missing.filter(([cmd]) => !have(cmd)).map(([cmd, pkg]) => `${cmd} (package ${pkg})`);
}
