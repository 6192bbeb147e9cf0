/**
 * Runs the `stagecoach` CLI as a child process, without blocking this one (the servers under
 * test run in it), and collects its exit code and output.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

/** The CLI entry point of this checkout. */
export const BIN = fileURLToPath(new URL('../../services/cli/bin.js', import.meta.url));

/** How to run it. */
export interface CliOptions {
  cwd?: string;
  /** The child's environment (default: this process's). */
  env?: NodeJS.ProcessEnv;
  /** Kill the child (SIGKILL) after this long; it then resolves with `code: null, timedOut: true`. */
  timeoutMs?: number;
  /** Close the read end of the child's stdout at once, as `| head -0` would: its writes get EPIPE. */
  closeStdout?: boolean;
}

/** Runs `stagecoach ARGS…`; resolves its exit code, stdout and stderr. */
export function cli(args: string[], opts: CliOptions = {}): Promise<{ code: number | null; stdout: string; stderr: string; timedOut: boolean }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { cwd: opts.cwd, env: opts.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    const timer = opts.timeoutMs
      ? setTimeout(() => {
          timedOut = true;
          child.kill('SIGKILL');
        }, opts.timeoutMs)
      : undefined;
    if (opts.closeStdout) child.stdout.destroy();
    else {
      child.stdout.on('data', (c) => {
        stdout += c;
      });
    }
    child.stderr.on('data', (c) => {
      stderr += c;
    });
    child.once('error', reject);
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr, timedOut });
    });
  });
}

/** The lines of a stream's text, without the empty one after the last newline. */
export function lines(text: string): string[] {
  return text.split('\n').filter((l, i, all) => l !== '' || i < all.length - 1);
}
