/**
 * Runs the `stagecoach` CLI as a child process, without blocking this one (the servers under
 * test run in it), and collects its exit code and output.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

/** The CLI entry point of this checkout. */
export const BIN = fileURLToPath(new URL('../../services/cli/bin.js', import.meta.url));

/** Runs `stagecoach ARGS…`; resolves its exit code, stdout and stderr. */
export function cli(args: string[], opts: { cwd?: string } = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => {
      stdout += c;
    });
    child.stderr.on('data', (c) => {
      stderr += c;
    });
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}
