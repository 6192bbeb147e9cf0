/**
 * `stagecoach agent --supervise`: runs the agent as a child process and starts it again when it
 * ends, the way init does on a real host. Before every restart it runs the sim firmware
 * (`simBoot`) when the machine has a reboot pending (a sim reboot ended the child), so the
 * child comes back in whatever OS the boot entries lead to; a plain crash (kill -9, an error)
 * just restarts it (after 100 ms; with a growing backoff, up to 10 s, while it keeps exiting with
 * an error right after it started). SIGTERM/SIGINT are
 * passed to the child, and the supervisor ends when the child has.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import type { Logger } from '../../shared/log.js';
import type { AgentConfig } from './config.js';
import { simRebootPending, simBoot } from './machine/sim.js';
import { simDir } from './runtime.js';

/** Exit code of an agent that found another agent running its machine: not restarted. */
export const EXIT_MACHINE_BUSY = 3;

/** Options of superviseAgent. */
export interface SuperviseOptions {
  cfg: AgentConfig;
  /** argv of the child after the node executable (script and arguments), without --supervise. */
  childArgs: string[];
  logger: Logger;
  env?: NodeJS.ProcessEnv;
  /** Delay after the first fast crash, ms (doubled per further fast crash, capped at 10 s). Default 250. */
  backoffMs?: number;
  /** A child that exits with an error sooner than this after its start is a fast crash, ms. Default 2000. */
  fastCrashMs?: number;
  /** Called with each child when it starts (tests). */
  onChild?: (child: ChildProcess) => void;
}

/**
 * Supervises the agent until SIGTERM/SIGINT (resolves 0) or until the child reports that the
 * machine is busy (resolves EXIT_MACHINE_BUSY). Never throws for a child's failure.
 */
export async function superviseAgent(o: SuperviseOptions): Promise<number> {
  const dir = simDir(o.cfg.machine);
  const log = o.logger.child({ host: o.cfg.hostId, supervisor: true });
  const backoff = o.backoffMs ?? 250;
  const fastMs = o.fastCrashMs ?? 2000;
  let stopping = false;
  let child: ChildProcess | null = null;
  const onSignal = (sig: NodeJS.Signals) => {
    stopping = true;
    child?.kill(sig);
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  let fastCrashes = 0;
  try {
    while (!stopping) {
      const started = Date.now();
      const c = spawn(process.execPath, [...process.execArgv, ...o.childArgs], { stdio: 'inherit', env: o.env ?? process.env });
      child = c;
      o.onChild?.(c);
      const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((res) => {
        c.once('exit', (cd, sg) => res([cd, sg]));
        c.once('error', () => res([null, null]));
      });
      child = null;
      if (stopping) break;
      if (dir && (await simRebootPending(dir).catch(() => false))) {
        const b = await simBoot(dir);
        log.info({ running: b.running, fellBack: b.fellBack }, 'machine rebooted; starting the agent again');
        fastCrashes = 0;
        continue;
      }
      if (code === EXIT_MACHINE_BUSY) {
        log.error('another agent runs this machine; not restarting');
        return EXIT_MACHINE_BUSY;
      }
      // A child killed by a signal (kill -9, the OOM killer) is restarted at once; a child that
      // keeps exiting with an error right after it started backs off (a bad config, Redis down).
      fastCrashes = signal === null && Date.now() - started < fastMs ? fastCrashes + 1 : 0;
      const delay = fastCrashes === 0 ? 100 : Math.min(10_000, backoff * 2 ** (fastCrashes - 1));
      log.warn({ code, signal, restartInMs: delay }, 'agent ended; restarting it');
      if (delay) await new Promise((r) => setTimeout(r, delay));
    }
    return 0;
  } finally {
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
  }
}
