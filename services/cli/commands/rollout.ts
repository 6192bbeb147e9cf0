/**
 * `stagecoach rollout create|list|show|pause|resume|abort|watch`: rollouts through the control
 * API. Writes need --token-file; every command takes --json.
 */
import cliProgress from 'cli-progress';
import type { Command } from 'commander';
import { envOption } from '../defaults.js';
import { ControlClient, ROLLOUT_FINISHED, type RolloutDetail, type RolloutView } from '../../control/client.js';
import type { CreateRolloutInput } from '../../control/client.js';
import { scError } from '../../../shared/errors.js';
import { action, printJson, readTokenFile, splitList } from '../util.js';

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

function summary(r: RolloutView): string {
  const c = r.status.counts;
  const parts = [
    `${r.spec.id}  ${r.status.state}${r.status.pauseReason ? ` (${r.status.pauseReason})` : ''}`,
    `${r.spec.base.name}@${r.spec.base.version} → ${r.spec.target.name}@${r.spec.target.version}`,
    `wave ${r.status.wave + 1}/${r.spec.waves.length} ${r.status.phase}`,
    `converted ${c.converted}/${r.spec.hostCount}, in flight ${c.inFlight}, failed ${c.failed}, aborted ${c.aborted}, skipped ${c.skipped}`,
  ];
  return parts.join('  ·  ');
}

function printDetail(r: RolloutDetail): void {
  process.stdout.write(`${summary(r)}\n`);
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

/**
 * Follows a rollout until it finishes: one progress bar per wave on a terminal (hosts done of
 * the wave, hosts per step, failures printed with their reasons), plain lines otherwise.
 * Resolves with the final view.
 */
export async function watchRollout(client: ControlClient, id: string, opts: { intervalMs?: number; tty?: boolean } = {}): Promise<RolloutDetail> {
  const tty = opts.tty ?? Boolean(process.stderr.isTTY);
  const every = opts.intervalMs ?? 1000;
  const seenFailures = new Set<string>();
  let lastLine = '';
  let bars: cliProgress.MultiBar | null = null;
  const waveBars: cliProgress.SingleBar[] = [];
  try {
    for (;;) {
      const r = await client.rollout(id);
      if (tty && !bars) {
        bars = new cliProgress.MultiBar(
          { format: ' {label} |{bar}| {value}/{total} {steps}', hideCursor: true, clearOnComplete: false, stream: process.stderr },
          cliProgress.Presets.shades_classic,
        );
        r.spec.waves.forEach((w, i) => {
          waveBars.push(bars!.create(w.length, 0, { label: `wave ${String(i + 1).padStart(2)}`, steps: '' }));
        });
      }
      r.spec.waves.forEach((_w, i) => {
        const hs = r.hosts.filter((h) => h.wave === i);
        const done = hs.filter((h) => ['converted', 'failed', 'aborted', 'skipped'].includes(h.status)).length;
        const perStep = new Map<string, number>();
        for (const h of hs) {
          const k = h.status === 'running' ? (h.step ?? 'starting') : h.status;
          perStep.set(k, (perStep.get(k) ?? 0) + 1);
        }
        const steps = [...perStep].map(([k, n]) => `${k}:${n}`).join(' ');
        if (bars) waveBars[i].update(done, { steps });
      });
      for (const h of r.hosts) {
        if (h.error && !seenFailures.has(h.host)) {
          seenFailures.add(h.host);
          const msg = `${h.host} ${h.status} at ${h.error.step}: ${h.error.code} ${h.error.message}`.slice(0, 300);
          if (bars) bars.log(`${msg}\n`);
          else process.stderr.write(`${msg}\n`);
        }
      }
      const line = summary(r);
      if (!bars && line !== lastLine) process.stderr.write(`${line}\n`);
      lastLine = line;
      if (ROLLOUT_FINISHED.includes(r.status.state)) {
        bars?.stop();
        bars = null;
        if (tty) process.stderr.write(`${line}\n`);
        return r;
      }
      await new Promise((res) => setTimeout(res, every));
    }
  } finally {
    bars?.stop();
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
        else process.stdout.write(`${summary(v)}\n`);
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
