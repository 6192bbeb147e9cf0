/**
 * Running the host tools the VM harness needs (mmdebstrap, qemu-img, sfdisk, mkfs, ssh…): argv
 * only, never a shell; a non-zero exit becomes SC_ERR_COMMAND_FAILED with the end of stderr.
 */
import { spawn } from 'node:child_process';
import { scError } from '../../shared/errors.js';

/** Options of `run`. */
export interface RunOptions {
  /** Bytes written to the child's stdin, then closed (default: stdin ignored). */
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Kill the child (SIGKILL) after this many ms and fail with SC_ERR_TIMEOUT. */
  timeoutMs?: number;
  /** Each stderr/stdout chunk, for progress (the text is still collected). */
  onOutput?: (chunk: string) => void;
}

/** Runs argv; resolves stdout. Throws SC_ERR_COMMAND_FAILED (non-zero exit) or SC_ERR_TIMEOUT. */
export function run(argv: string[], o: RunOptions = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(argv[0], argv.slice(1), { stdio: [o.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'], env: o.env ?? { ...process.env, LC_ALL: 'C' }, cwd: o.cwd });
    let out = '';
    let err = '';
    let timedOut = false;
    const timer = o.timeoutMs ? setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, o.timeoutMs) : null;
    child.stdout!.on('data', (c: Buffer) => {
      out += c;
      o.onOutput?.(String(c));
    });
    child.stderr!.on('data', (c: Buffer) => {
      err += c;
      if (err.length > 1 << 20) err = err.slice(-(1 << 19));
      o.onOutput?.(String(c));
    });
    if (o.input !== undefined) child.stdin?.end(o.input);
    child.on('error', (e) => {
      if (timer) clearTimeout(timer);
      reject(scError('SC_ERR_COMMAND_FAILED', `${argv[0]}: ${(e as NodeJS.ErrnoException).code ?? e.message}`, { argv }));
    });
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      if (timedOut) reject(scError('SC_ERR_TIMEOUT', `${argv[0]} did not finish within ${Math.round((o.timeoutMs ?? 0) / 1000)} s`, { argv }));
      else if (code !== 0) reject(scError('SC_ERR_COMMAND_FAILED', `${argv.slice(0, 3).join(' ')} exited ${code ?? signal}: ${err.trim().slice(-600)}`, { argv, code, stderr: err.slice(-4000) }));
      else resolve(out);
    });
  });
}

/** True when `cmd` is on PATH. */
export async function have(cmd: string): Promise<boolean> {
  return run(['sh', '-c', `command -v ${cmd}`]).then(
    () => true,
    () => false,
  );
}
