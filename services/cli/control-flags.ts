/** The flags and output helpers of the CLI's control client commands (`rollout`, `hosts`). */
import type { Command } from 'commander';
import { ControlClient } from '../control/client.js';
import { scError } from '../../shared/errors.js';
import { envOption } from './defaults.js';
import { readTokenFile } from './util.js';

/** Flags every control client command takes. */
export interface ClientFlags {
  control: string;
  tokenFile?: string;
  actor?: string;
  json?: boolean;
}

/** Adds --control, --token-file, --json (and --actor for writes) to a command. */
export function clientOptions(c: Command, write: boolean): Command {
  c.addOption(envOption('--control <url>', 'control plane URL', 'STAGECOACH_CONTROL').default('http://127.0.0.1:7090')).option('--json', 'print JSON');
  if (write) {
    c.addOption(envOption('--token-file <file>', "control write token: control's own token file works (NAME:TOKEN or TOKEN lines; the first is sent)", 'STAGECOACH_TOKEN_FILE'));
    c.option('--actor <name>', 'who is acting (X-Actor, recorded in the audit log)');
  } else c.addOption(envOption('--token-file <file>', 'control token, read-only or write (NAME:TOKEN or TOKEN lines; the first is sent): reads need one', 'STAGECOACH_TOKEN_FILE'));
  return c;
}

/** A ControlClient for the flags; writes require --token-file (SC_ERR_BAD_CONFIG). */
export function clientFor(f: ClientFlags, write: boolean): ControlClient {
  if (write && !f.tokenFile) throw scError('SC_ERR_BAD_CONFIG', 'this command writes: give --token-file');
  return new ControlClient(f.control, { token: f.tokenFile ? readTokenFile(f.tokenFile) : undefined, actor: f.actor });
}

/** Prints rows as aligned columns. */
export function table(rows: (string | number | null | undefined)[][]): void {
  const cells = rows.map((r) => r.map((c) => (c === null || c === undefined ? '-' : String(c))));
  const widths = cells[0].map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  for (const r of cells) process.stdout.write(`${r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]))).join('  ')}\n`);
}
