/**
 * `stagecoach hosts [--colo X]` (inventory) and `stagecoach host show|rescue|reinstall|install`
 * (host operations through the control API; writes need --token-file).
 */
import type { Command } from 'commander';
import type { ControlClient, HostOp } from '../../control/client.js';
import { scError } from '../../../shared/errors.js';
import { action, printJson } from '../util.js';
import { type ClientFlags, clientFor, clientOptions, table } from '../control-flags.js';

function ago(ms: number | undefined): string {
  if (typeof ms !== 'number') return '-';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 120 ? `${s}s` : s < 7200 ? `${Math.round(s / 60)}m` : `${Math.round(s / 3600)}h`;
}

/** Polls a host operation until it is done or failed; resolves with it. */
export async function waitOp(client: ControlClient, id: string, intervalMs = 1000): Promise<HostOp> {
  let last = '';
  for (;;) {
    const op = await client.op(id);
    const line = `${op.id} ${op.kind} ${op.host}: ${op.status}${op.step ? ` (${op.step})` : ''}`;
    if (line !== last) process.stderr.write(`${line}\n`);
    last = line;
    if (op.status === 'done' || op.status === 'failed') return op;
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** Registers `stagecoach hosts` and `stagecoach host …`. */
export function register(program: Command): void {
  clientOptions(program.command('hosts').description('List registered hosts: colo, IP, running OS, boot device, last seen, current work').option('--colo <name>', 'only this colo'), false).action(
    action(async (f: ClientFlags & { colo?: string }) => {
      const hosts = await clientFor(f, false).hosts({ colo: f.colo });
      if (f.json) return printJson(hosts);
      if (hosts.length === 0) return void process.stdout.write('no hosts\n');
      table([
        ['HOST', 'COLO', 'IP', 'RUNNING', 'BOOT', 'SEEN', 'AGENT', 'WORK'],
        ...hosts.map((h) => [
          h.hostId,
          h.colo,
          h.ip,
          h.running ? `${h.running.id} ${h.running.version} (${h.running.device})` : '-',
          h.bootDevice,
          `${ago(h.lastSeen)}${h.stale ? ' STALE' : ''}`,
          `${h.state}${h.step ? ` ${h.step}` : ''}`,
          h.work ? `${h.work.id} ${h.work.status}${h.work.step ? ` ${h.work.step}` : ''}` : '',
        ]),
      ]);
    }),
  );

  const host = program.command('host').description('One host: show it, or rescue / reinstall / install another OS');
  clientOptions(host.command('show').description('Show one host').argument('<id>'), false).action(
    action(async (id: string, f: ClientFlags) => {
      const h = await clientFor(f, false).host(id);
      printJson(h);
    }),
  );
  const ops = [
    ['rescue', 'Boot the host into its rescue OS B'],
    ['reinstall', 'From B, reinstall the kept target bundle (disk2p2) and boot it'],
    ['install', 'From B, fetch another OS NAME@VERSION through the stage, install and boot it'],
  ] as const;
  for (const [kind, what] of ops) {
    const c = host.command(kind).description(what).argument('<id>');
    if (kind === 'install') c.argument('<bundle>', 'NAME@VERSION of a published target bundle');
    c.option('--wait', 'wait until the operation is done (exit 1 if it failed)');
    clientOptions(c, true).action(
      action(async (id: string, ...rest: unknown[]) => {
        const bundle = kind === 'install' ? (rest[0] as string) : undefined;
        const f = (kind === 'install' ? rest[1] : rest[0]) as ClientFlags & { wait?: boolean };
        const client = clientFor(f, true);
        let op: HostOp;
        if (kind === 'install') {
          if (!bundle) throw scError('SC_ERR_BAD_REQUEST', 'install needs NAME@VERSION');
          op = await client.install(id, bundle);
        } else op = await client[kind](id);
        if (f.wait) op = await waitOp(client, op.id);
        if (f.json) printJson(op);
        else process.stdout.write(`${op.id} ${op.status}${op.error ? ` ${op.error.code}: ${op.error.message}` : ''}\n`);
        if (op.status === 'failed') process.exitCode = 1;
      }),
    );
  }
}
