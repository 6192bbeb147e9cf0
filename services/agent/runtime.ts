/**
 * Running an agent.
 *
 * - `startAgent(config, opts)` runs an agent in this process. Its sim reboots do what a power
 *   cycle does to a real host, in-process: the driver's exit action throws RebootSignal, the
 *   agent instance closes without completing the job (its Redis connection too), the firmware
 *   runs (`simBoot`), and a fresh instance starts and re-adopts the job. The demo and the fleet
 *   benchmark run many hosts in one process this way, through the same code as production.
 * - `runAgentOnce(config, opts)` runs one instance whose reboot really ends the process
 *   (`stagecoach agent` without --supervise; the machine's next start, or the supervisor, boots
 *   it). Both start by running the sim firmware when a reboot is pending (power-on).
 *
 * One agent per machine: each instance holds `DIR/agent.lock` (sim) or the pid file (linux)
 * while it runs (lock.ts).
 */
import { parseRelayToken } from '../../shared/protocol/index.js';
import { trustCa } from '../../shared/tls.js';
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import pkg from '../../package.json' with { type: 'json' };
import { scError } from '../../shared/errors.js';
import { createLogger, type Logger } from '../../shared/log.js';
import { createRedis } from '../../shared/redis.js';
import type { AgentConfig, AgentConfigInput, AgentKeys } from './config.js';
import { agentConfig, loadAgentKeys } from './config.js';
import { crashPoints } from './hooks.js';
import { acquireMachineLock, type MachineLock } from './lock.js';
import { type ExitAction, type MachineDriver, RebootSignal } from './machine/driver.js';
import { LinuxMachine } from './machine/linux.js';
import { type SimBootResult, SimMachine, simBoot } from './machine/sim.js';
import { RelayTransport } from '../relay/client.js';
import { AgentWorker, type WorkerExit } from './worker.js';

/** The agent's version, as registered. */
export const AGENT_VERSION: string = pkg.version;

/** The sim machine directory of a `sim:DIR` spec, or null for `linux`. */
export function simDir(machine: string): string | null {
  return machine.startsWith('sim:') ? resolve(machine.slice(4)) : null;
}

/** Builds the machine driver for a config; `exit` is what a reboot does to the agent. */
export function createDriver(cfg: AgentConfig, exit?: ExitAction): MachineDriver {
  const dir = simDir(cfg.machine);
  if (dir) return new SimMachine(dir, { exit });
  return new LinuxMachine({
    hostId: cfg.hostId,
    disks: { disk1: cfg.disk1, disk2: cfg.disk2 },
    bootMode: cfg.bootMode,
    mountRoot: cfg.mountRoot,
    dryRun: cfg.dryRun,
    kernelArgs: cfg.kernelArgs,
    exit,
    print: (l) => process.stderr.write(`${l}\n`),
  });
}

/** The lock file that keeps a second agent off this machine. */
export function machineLockPath(cfg: AgentConfig): string {
  const dir = simDir(cfg.machine);
  return dir ? join(dir, 'agent.lock') : cfg.pidFile;
}

/** Runs the sim firmware when the machine has a reboot pending or is not running (no-op otherwise, and for linux). */
export async function powerOn(cfg: AgentConfig): Promise<SimBootResult | null> {
  const dir = simDir(cfg.machine);
  return dir ? simBoot(dir) : null;
}

/** Options of startAgent / runAgentOnce. */
export interface AgentRunOptions {
  logger?: Logger;
  /** Pre-loaded keys (default: read from the config's files once). */
  keys?: AgentKeys;
  /** Called after an in-process reboot, once the firmware ran, before the fresh instance starts. */
  onReboot?: (info: { hostId: string; reboots: number; boot: SimBootResult | null }) => void | Promise<void>;
  /** Files the agent needs in the next OS (StepContext.agentFiles); default: its key files. */
  agentFiles?: string[];
  /** Called when an instance is up (registered, taking jobs). */
  onStart?: (info: { hostId: string; instance: number }) => void;
  now?: () => number;
  /** Relay mode: the host's relay token (default: read from the config's relayTokenFile). */
  relayToken?: string;
}

/** Reads the relay token file's first line; throws SC_ERR_BAD_CONFIG. */
export function readRelayToken(cfg: Pick<AgentConfig, 'relayTokenFile'>): string {
  let t = '';
  try {
    t = readFileSync(cfg.relayTokenFile ?? '', 'utf8').split('\n')[0].trim();
  } catch (err) {
    throw scError('SC_ERR_BAD_CONFIG', `cannot read relay token file ${cfg.relayTokenFile}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  if (!parseRelayToken(t)) throw scError('SC_ERR_BAD_CONFIG', `relay token file ${cfg.relayTokenFile} does not hold a relay token (KID.HEX: stagecoach acl relay-token)`);
  return t;
}

/** A running in-process agent. */
export interface AgentHandle {
  hostId: string;
  /** Instances started so far (1 + in-process reboots). */
  readonly instances: number;
  /** Settles when the agent has stopped (after stop(), or a fatal error: rejects). */
  readonly done: Promise<void>;
  /**
   * Stops the agent: a step in progress is aborted and its job stays active, as after a crash
   * (the next start runs it again). Idempotent.
   */
  stop(): Promise<void>;
}

interface Instance {
  worker: AgentWorker;
  exit: Promise<WorkerExit>;
  lock: MachineLock;
  close(): Promise<void>;
}

/**
 * What the agent installs into every OS it unpacks (linux), absolute: its config file (when
 * given), key files and relay token, and on a linux machine its runtime directory and systemd
 * unit (when they exist: an agent started by hand has neither).
 */
export function agentFilesOf(cfg: AgentConfig, configFile?: string): string[] {
  const own = [configFile, ...cfg.trustKey, cfg.controlKey, cfg.identity, cfg.relayTokenFile];
  if (cfg.machine === 'linux') own.push(...[cfg.runtimeDir, cfg.unitFile].filter((f) => existsSync(f)));
  return [...new Set(own.filter((f): f is string => !!f && f !== '-').map((f) => resolve(f)))];
}

async function startInstance(
  cfg: AgentConfig,
  keys: AgentKeys,
  exitAction: ExitAction | undefined,
  logger: Logger,
  opts: Pick<AgentRunOptions, 'now' | 'agentFiles' | 'relayToken'>,
): Promise<Instance> {
  const lock = await acquireMachineLock(machineLockPath(cfg));
  try {
    await powerOn(cfg);
    const driver = createDriver(cfg, exitAction);
    const hostId = await driver.hostId();
    if (hostId !== cfg.hostId) throw scError('SC_ERR_BAD_CONFIG', `the machine is host ${hostId}, not ${cfg.hostId}`);
    const redis = cfg.redis ? createRedis(cfg.redis, { forBullmq: true, name: `agent:${cfg.hostId}` }) : null;
    redis?.on('error', (err) => logger.warn({ err: err.message }, 'redis connection error'));
    const transport = redis
      ? undefined
      : new RelayTransport({
          hostId: cfg.hostId,
          relays: cfg.relay ?? [],
          token: opts.relayToken ?? readRelayToken(cfg),
          logger,
          waitSec: cfg.relayWaitSec,
          // A heartbeat only when a whole heartbeat period passed without an answered request.
          quietMs: Math.round(cfg.heartbeatMs * 0.9),
        });
    const worker = new AgentWorker({
      hostId: cfg.hostId,
      colo: cfg.colo,
      prefix: cfg.prefix,
      redis: redis ?? undefined,
      transport,
      keys,
      driver,
      stages: cfg.stages,
      origin: cfg.origin,
      agentFiles: opts.agentFiles ?? agentFilesOf(cfg),
      agentVersion: AGENT_VERSION,
      logger,
      lockDurationMs: cfg.lockDurationMs,
      stalledIntervalMs: cfg.stalledIntervalMs,
      maxStalledCount: cfg.maxStalledCount,
      heartbeatMs: cfg.heartbeatMs,
      reportsMaxLen: cfg.reportsMaxLen,
      crashPoint: crashPoints(cfg.testHookDir),
      now: opts.now,
    });
    let closed = false;
    const close = async () => {
      if (closed) return;
      closed = true;
      if (redis) await redis.quit().catch(() => redis.disconnect());
      await lock.release();
    };
    const exit = worker.run().finally(close);
    return { worker, exit, lock, close };
  } catch (err) {
    await lock.release();
    throw err;
  }
}

/**
 * Starts an agent in this process (see the top of this file). Resolves once the first
 * instance is running. Throws SC_ERR_BAD_CONFIG / SC_ERR_BAD_KEY for a bad config,
 * SC_ERR_CONFLICT when another agent runs this machine.
 */
export async function startAgent(config: AgentConfig | AgentConfigInput, opts: AgentRunOptions = {}): Promise<AgentHandle> {
  const cfg = agentConfig(config as AgentConfigInput);
  if (cfg.ca) trustCa(cfg.ca);
  const logger = (opts.logger ?? createLogger({ level: cfg.logLevel, name: 'agent' })).child({ host: cfg.hostId });
  const keys = opts.keys ?? (await loadAgentKeys(cfg));
  const exitAction: ExitAction | undefined = simDir(cfg.machine)
    ? (reboots) => {
        throw new RebootSignal(reboots);
      }
    : undefined;
  let instances = 0;
  let stopping = false;
  let current: Instance = await startInstance(cfg, keys, exitAction, logger, opts);
  instances++;
  opts.onStart?.({ hostId: cfg.hostId, instance: instances });
  const done = (async () => {
    for (;;) {
      const ex = await current.exit;
      if (ex.reason !== 'reboot' || stopping) return;
      logger.info({ reboots: ex.reboots }, 'machine rebooted; starting the agent again');
      const boot = await powerOn(cfg);
      await opts.onReboot?.({ hostId: cfg.hostId, reboots: ex.reboots, boot });
      if (stopping) return;
      current = await startInstance(cfg, keys, exitAction, logger, opts);
      instances++;
      opts.onStart?.({ hostId: cfg.hostId, instance: instances });
    }
  })();
  done.catch(() => {});
  return {
    hostId: cfg.hostId,
    get instances() {
      return instances;
    },
    done,
    stop: async () => {
      stopping = true;
      await current.worker.stop();
      await current.exit.catch(() => {});
      await current.close();
      await done.catch(() => {});
    },
  };
}

/**
 * Runs one agent instance in this process until it is stopped (SIGTERM/SIGINT: the caller
 * wires them to the returned stop) or the machine reboots: then the process ends through the
 * driver's default exit action, like a real reboot. Resolves with the handle and the exit.
 */
export async function runAgentOnce(
  config: AgentConfig,
  opts: AgentRunOptions = {},
): Promise<{ stop(): Promise<void>; exit: Promise<WorkerExit> }> {
  const logger = (opts.logger ?? createLogger({ level: config.logLevel, name: 'agent' })).child({ host: config.hostId });
  const keys = opts.keys ?? (await loadAgentKeys(config));
  const exitAction: ExitAction = (reboots) => {
    logger.info({ reboots }, 'rebooting: the agent process ends here');
    logger.flush?.();
    process.exit(0);
  };
  const inst = await startInstance(config, keys, exitAction, logger, opts);
  opts.onStart?.({ hostId: config.hostId, instance: 1 });
  return {
    exit: inst.exit,
    stop: async () => {
      await inst.worker.stop();
      await inst.exit.catch(() => {});
      await inst.close();
    },
  };
}
