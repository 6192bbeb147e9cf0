/**
 * `stagecoach rollout create|list|show|pause|resume|abort|watch`: rollouts through the control
 * API. Writes need --token-file; every command takes --json.
 */
import type { Command } from 'commander';
import type { CreateRolloutInput, RolloutDetail } from '../../control/client.js';
import { rolloutSummary, watchRollout } from '../../control/watch.js';
import { scError } from '../../../shared/errors.js';
import { type ClientFlags, clientFor, clientOptions, table } from '../control-flags.js';
import { action, printJson, splitList } from '../util.js';

function parseWaves(s: string): (number | string)[] {
  return splitList(s).map((x) => {
    if (/^\d+(\.\d+)?%$/.test(x)) return x;
    if (/^\d+$/.test(x)) return Number(x);
    throw scError('SC_ERR_BAD_REQUEST', `bad wave ${JSON.stringify(x)}: expected a count or a percentage such as 20%`);
  });
}

function intFlag(name: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  if (!/^\d+$/.test(v)) throw scError('SC_ERR_BAD_REQUEST', `${name} must be a whole number`);
  return Number(v);
}

function printDetail(r: RolloutDetail): void {
  process.stdout.write(`${rolloutSummary(r)}\n`);
  for (const [colo, p] of Object.entries(r.preheat)) {
    process.stdout.write(`preheat ${colo}: ${p.state}${p.reason ? ` (${p.reason})` : ''}\n`);
  }
  table([
    ['HOST', 'COLO', 'WAVE', 'STATUS', 'STEP', 'ERROR'],
    ...r.hosts.map((h) => [
      h.host,
      h.colo,
      h.wave + 1,
      h.status + (h.rescue ? ` (rescue ${h.rescue.state})` : ''),
      h.step,
      h.error ? `${h.error.step}: ${h.error.code} ${h.error.message}`.slice(0, 120) : '',
    ]),
  ]);
  for (const h of r.hosts.filter((x) => x.error)) {
    process.stdout.write(`\n${h.host} failed at ${h.error!.step}: ${h.error!.code} ${h.error!.message}\n`);
    for (const l of (h.jobLog?.length ? h.jobLog : h.log).slice(-10)) process.stdout.write(`  | ${l}\n`);
  }
}

interface CreateFlags extends ClientFlags {
  base: string;
  target: string;
  colos?: string;
  hosts?: string;
  canary?: string;
  waves?: string;
  maxInFlight?: string;
  maxInFlightPerColo?: string;
  failureBudget?: string;
  bakeSeconds?: string;
  wait?: boolean;
}

/** Registers `stagecoach rollout …`. */
export function register(program: Command): void {
  const r = program.command('rollout').description('Create, follow and steer rollouts (waves of hosts converted from A to C through B)');

  clientOptions(
    r
      .command('create')
      .description('Create a rollout; with --wait, exit 0 only when every selected host converted')
      .requiredOption('--base <name@ver>', 'the rescue/base bundle B')
      .requiredOption('--target <name@ver>', 'the target bundle C')
      .option('--colos <a,b>', 'select every registered host of these colos')
      .option('--hosts <h1,h2>', 'select these hosts')
      .option('--canary <n>', 'first wave of N hosts; any failure there pauses the rollout')
      .option('--waves <list>', 'cumulative wave targets, counts or percentages, e.g. 1,5,20%,100%')
      .option('--max-in-flight <n>', 'hosts in flight at once (default 10)')
      .option('--max-in-flight-per-colo <n>', 'hosts in flight at once per colo (default: --max-in-flight)')
      .option('--failure-budget <n|p%>', 'failed hosts tolerated before the rollout pauses (default 0)')
      .option('--bake-seconds <s>', 'wait between waves (default 0)')
      .option('--wait', 'follow the rollout until it ends'),
    true,
  ).action(
    action(async (f: CreateFlags) => {
      const client = clientFor(f, true);
      if (!f.colos === !f.hosts) throw scError('SC_ERR_BAD_REQUEST', 'give exactly one of --colos or --hosts');
      const plan: NonNullable<CreateRolloutInput['plan']> = {};
      if (f.canary !== undefined) plan.canary = intFlag('--canary', f.canary);
      if (f.waves !== undefined) plan.waves = parseWaves(f.waves);
      if (f.maxInFlight !== undefined) plan.maxInFlight = intFlag('--max-in-flight', f.maxInFlight);
      if (f.maxInFlightPerColo !== undefined) plan.maxInFlightPerColo = intFlag('--max-in-flight-per-colo', f.maxInFlightPerColo);
      if (f.failureBudget !== undefined) plan.failureBudget = /%$/.test(f.failureBudget) ? f.failureBudget : intFlag('--failure-budget', f.failureBudget);
      if (f.bakeSeconds !== undefined) {
        const b = Number(f.bakeSeconds);
        if (!Number.isFinite(b) || b < 0) throw scError('SC_ERR_BAD_REQUEST', '--bake-seconds must be a number >= 0');
        plan.bakeSeconds = b;
      }
      const created = await client.createRollout({
        base: f.base,
        target: f.target,
        ...(f.colos ? { colos: splitList(f.colos) } : { hosts: splitList(f.hosts) }),
        plan,
      });
      if (!f.wait) {
        if (f.json) printJson(created);
        else process.stdout.write(`${created.spec.id}\n`);
        return;
      }
      if (!f.json) process.stderr.write(`rollout ${created.spec.id} created\n`);
      const end = await watchRollout(client, created.spec.id, { tty: f.json ? false : undefined });
      if (f.json) printJson(end);
      else process.stdout.write(`${end.spec.id} ${end.status.state}\n`);
      if (end.status.state !== 'completed') process.exitCode = 1;
    }),
  );

  clientOptions(r.command('list').description('List rollouts, newest first').option('--limit <n>', 'how many (default 50)'), false).action(
    action(async (f: ClientFlags & { limit?: string }) => {
      const list = await clientFor(f, false).rollouts(intFlag('--limit', f.limit) ?? 50);
      if (f.json) return printJson(list);
      if (list.length === 0) return void process.stdout.write('no rollouts\n');
      table([
        ['ID', 'STATE', 'BASE', 'TARGET', 'WAVE', 'CONVERTED', 'FAILED', 'CREATED'],
        ...list.map((x) => [
          x.spec.id,
          x.status.state + (x.status.pauseReason ? ` (${x.status.pauseReason})` : ''),
          `${x.spec.base.name}@${x.spec.base.version}`,
          `${x.spec.target.name}@${x.spec.target.version}`,
          `${x.status.wave + 1}/${x.spec.waves.length}`,
          `${x.status.counts.converted}/${x.spec.hostCount}`,
          x.status.counts.failed,
          new Date(x.spec.createdAt).toISOString(),
        ]),
      ]);
    }),
  );

  clientOptions(r.command('show').description('Show a rollout: hosts, steps, failures with log tails').argument('<id>'), false).action(
    action(async (id: string, f: ClientFlags) => {
      const v = await clientFor(f, false).rollout(id);
      if (f.json) printJson(v);
      else printDetail(v);
    }),
  );

  for (const verb of ['pause', 'resume', 'abort'] as const) {
    const what = {
      pause: 'Pause: no new host starts; hosts in flight continue',
      resume: 'Resume: failed hosts stay failed, the others go on',
      abort: 'Abort: no new host starts; hosts in flight stop at their next step boundary',
    }[verb];
    clientOptions(r.command(verb).description(what).argument('<id>'), true).action(
      action(async (id: string, f: ClientFlags) => {
        const v = await clientFor(f, true)[verb](id);
        if (f.json) printJson(v);
        else process.stdout.write(`${rolloutSummary(v)}\n`);
      }),
    );
  }

  clientOptions(
    r.command('watch').description('Follow a rollout live until it ends (exit 0 when every host converted)').argument('<id>').option('--interval <ms>', 'poll interval (default 1000)'),
    false,
  ).action(
    action(async (id: string, f: ClientFlags & { interval?: string }) => {
      const end = await watchRollout(clientFor(f, false), id, { intervalMs: intFlag('--interval', f.interval), tty: f.json ? false : undefined });
      if (f.json) printJson(end);
      if (end.status.state !== 'completed') process.exitCode = 1;
    }),
  );
}
