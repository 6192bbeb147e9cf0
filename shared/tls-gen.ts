/**
 * A private CA and one server certificate signed by it, for a fleet that has no PKI of its own
 * (`stagecoach tls gen`, services/cli/commands/tls.ts, and the demo). Made with the system's
 * `openssl` (ECDSA P-256): the CA key never leaves the output directory, which is created 0700
 * and never overwritten.
 *
 * Files: `ca.crt` (give it to every client: `--ca ca.crt`), `ca.key` (keep it offline),
 * `server.crt` + `server.key` (the servers' `--tls-cert` / `--tls-key`), valid for the names
 * and addresses given with `--host`.
 */
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync } from 'node:fs';
import { unlink, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { isIP } from 'node:net';
import { scError } from './errors.js';

/** What `generateTls` wrote. */
export interface GeneratedTls {
  ca: string;
  caKey: string;
  cert: string;
  key: string;
  hosts: string[];
}

const HOST_RE = /^(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

function openssl(args: string[]): Promise<void> {
  return new Promise((res, rej) => {
    execFile('openssl', args, { env: { ...process.env, LC_ALL: 'C' } }, (err, _out, stderr) => {
      if (!err) return res();
      const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
      rej(scError('SC_ERR_COMMAND_FAILED', missing ? 'openssl is not installed (apt-get install openssl)' : `openssl ${args[0]} failed: ${String(stderr).trim().split('\n').pop()}`));
    });
  });
}

/**
 * Makes a CA and a server certificate for `hosts` (DNS names or IP addresses) in `outDir`.
 * Throws SC_ERR_FILE_EXISTS when the directory holds files already, SC_ERR_BAD_NAME for a bad host.
 */
export async function generateTls(outDir: string, hosts: readonly string[], days = 825): Promise<GeneratedTls> {
  if (hosts.length === 0) throw scError('SC_ERR_BAD_NAME', 'give at least one --host');
  for (const h of hosts) if (!isIP(h) && !HOST_RE.test(h)) throw scError('SC_ERR_BAD_NAME', `bad host name ${JSON.stringify(h.slice(0, 80))}`);
  const dir = resolve(outDir);
  if (existsSync(dir) && readdirSync(dir).length > 0) throw scError('SC_ERR_FILE_EXISTS', `refusing to write into ${dir}: it is not empty`, { files: [dir] });
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (err) {
    throw scError('SC_ERR_BAD_CONFIG', `cannot create ${dir}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  const f = { ca: join(dir, 'ca.crt'), caKey: join(dir, 'ca.key'), cert: join(dir, 'server.crt'), key: join(dir, 'server.key'), csr: join(dir, 'server.csr'), ext: join(dir, 'server.ext') };
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-noenc'];
  await openssl(['req', '-x509', ...ec, '-keyout', f.caKey, '-out', f.ca, '-days', String(days * 4), '-subj', '/CN=stagecoach fleet CA',
    '-addext', 'basicConstraints=critical,CA:TRUE,pathlen:0', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  const san = hosts.map((h) => (isIP(h) ? `IP:${h}` : `DNS:${h}`)).join(',');
  await openssl(['req', ...ec, '-keyout', f.key, '-out', f.csr, '-subj', `/CN=${hosts[0]}`]);
  await writeFile(f.ext, `subjectAltName=${san}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n`);
  await openssl(['x509', '-req', '-in', f.csr, '-CA', f.ca, '-CAkey', f.caKey, '-set_serial', `0x${Date.now().toString(16)}`, '-days', String(days), '-extfile', f.ext, '-out', f.cert]);
  await Promise.all([unlink(f.csr), unlink(f.ext)]);
  return { ca: f.ca, caKey: f.caKey, cert: f.cert, key: f.key, hosts: [...hosts] };
}

