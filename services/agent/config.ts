/**
 * Agent configuration: schema, defaults and loading (YAML file, then `STAGECOACH_AGENT_*`
 * environment variables, then flags). Validated once, then frozen. `resolveAgentConfig` reads
 * the key files once and returns what the runtime needs (keys as KeyObjects, the age identities).
 */
import type { KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { z } from 'zod';
import { type ConfigSources, loadConfig, stringList } from '../../shared/config.js';
import { readIdentityFile } from '../../shared/bundle/index.js';
import { scError } from '../../shared/errors.js';
import { loadPublicKey } from '../../shared/manifest.js';
import { NAME_RE } from '../../shared/names.js';
import { HOST_ID_RE } from '../../shared/protocol/index.js';
import { DEFAULT_KERNEL_ARGS } from './machine/linux-boot.js';
import { clientTlsSettings } from '../../shared/tls.js';

/** Environment variable prefix: `STAGECOACH_AGENT_HOST_ID`, `STAGECOACH_AGENT_REDIS`, … */
export const AGENT_ENV_PREFIX = 'STAGECOACH_AGENT_';

const list = stringList;

const httpUrl = z.string().refine((s) => {
  try {
    const u = new URL(s);
    return (u.protocol === 'http:' || u.protocol === 'https:') && !u.search && !u.hash;
  } catch {
    return false;
  }
}, 'expected an http(s) URL without query or fragment');

/** A boolean from a flag, YAML, or an environment string (`1`, `true`, `yes` / `0`, `false`, `no`). */
const bool = z.preprocess((v) => (typeof v === 'string' ? /^(1|true|yes|on)$/i.test(v.trim()) : v), z.boolean());

/** `sim:DIR` (a sim machine directory) or `linux` (real commands). */
const machineSpec = z.string().regex(/^(sim:.+|linux)$/, 'expected sim:DIR or linux');

/** The agent's configuration schema; unknown keys are rejected. */
export const agentConfigSchema = z.strictObject({
  ...clientTlsSettings,
  /** This host's id; the agent consumes queue `host.<hostId>`. */
  hostId: z.string().regex(HOST_ID_RE, 'expected [a-z0-9][a-z0-9._-]{0,63}'),
  /** The colo this host lives in. */
  colo: z.string().regex(NAME_RE, 'expected [a-z0-9][a-z0-9._-]{0,63}'),
  /** Redis URL (`redis://` or `rediss://` for TLS): direct mode. Exactly one of `redis` and `relay`. */
  redis: z.string().regex(/^rediss?:\/\/\S+$/, 'expected redis://… or rediss://…').optional(),
  /** Relay mode: the colo's relay (stage) URLs in failover order; the host then has no Redis connection. */
  relay: list.pipe(z.array(httpUrl)).optional(),
  /** Relay mode: file with this host's relay token (`stagecoach acl relay-token`). */
  relayTokenFile: z.string().min(1).optional(),
  /**
   * Relay mode: long-poll wait in seconds (the relay answers after at most its relayMaxWaitSec,
   * 60). Each idle poll costs the relay about half a millisecond of CPU: a colo's waiting hosts
   * cost it in proportion to hosts ÷ wait. 55 keeps the poll under the common 60 s idle timeout of
   * proxies and load balancers.
   */
  relayWaitSec: z.coerce.number().int().min(1).max(300).default(55),
  /** `sim:DIR` or `linux`. */
  machine: machineSpec,
  /** The colo's stages, in any order (they are probed, fastest healthy first). */
  stages: list.pipe(z.array(httpUrl)).default([]),
  /** Origin URL, the last resort after every stage. */
  origin: httpUrl.optional(),
  /** Release public keys (PEM files) that bundle manifests must be signed with. */
  trustKey: list.pipe(z.array(z.string().min(1)).min(1, 'at least one --trust-key is required')),
  /** Control's public key (PEM file): step jobs must be signed with it. */
  controlKey: z.string().min(1),
  /** The fleet's age identity file (`AGE-SECRET-KEY-1…` lines; `#` comments). */
  identity: z.string().min(1),
  /** Redis key prefix (use `{stagecoach}` on Redis Cluster). */
  prefix: z.string().regex(/^[A-Za-z0-9{}_.-]{1,64}$/).default('stagecoach'),
  /** Run the agent as a child process and restart it after reboots (sim firmware) and crashes. */
  supervise: bool.default(false),
  /** Linux only: the pid file that keeps a second agent off the machine. */
  pidFile: z.string().min(1).default('/run/stagecoach-agent.pid'),
  /** Linux only: print commands instead of running them. */
  dryRun: bool.default(false),
  /** Linux only: device of disk 1 (OS A, then C). */
  disk1: z.string().min(1).default('/dev/sda'),
  /** Linux only: device of disk 2 (B and the kept bundles). */
  disk2: z.string().min(1).default('/dev/sdb'),
  /** Linux only: boot loader flavour. */
  bootMode: z.enum(['bios-grub', 'uefi']).default('bios-grub'),
  /** Linux only: where partitions are mounted. */
  mountRoot: z.string().min(1).default('/mnt/stagecoach'),
  /** Linux only: kernel arguments of the boot entries besides `root=` (console, panic reboot). */
  kernelArgs: z.string().regex(/^[\x21-\x7e]+( [\x21-\x7e]+)*$/, 'expected space-separated kernel arguments').default(DEFAULT_KERNEL_ARGS),
  /** Linux only: the agent's runtime (Node and the compiled project), installed into every OS it unpacks. */
  runtimeDir: z.string().regex(/^\/[A-Za-z0-9._/-]+$/, 'expected an absolute path').default('/opt/stagecoach'),
  /** Linux only: the agent's systemd unit, installed and enabled in every OS it unpacks. */
  unitFile: z.string().regex(/^\/[A-Za-z0-9._/@-]+$/, 'expected an absolute path').default('/etc/systemd/system/stagecoach-agent.service'),
  /** Job lock duration in ms; the lock is renewed every third of it (shared/protocol/consumer.ts). */
  lockDurationMs: z.coerce.number().int().min(1000).max(3_600_000).default(60_000),
  /** How often the stalled-job check runs on this host's queue, in ms (the backstop after long reboots). */
  stalledIntervalMs: z.coerce.number().int().min(1000).max(3_600_000).default(30_000),
  /** How many times a job may stall (lose its lock) before BullMQ fails it; reboots are expected. */
  maxStalledCount: z.coerce.number().int().min(1).default(1000),
  /** Heartbeat period in ms. */
  heartbeatMs: z.coerce.number().int().min(100).max(600_000).default(10_000),
  /** Approximate cap on the host's own reports stream (XADD MAXLEN ~). */
  reportsMaxLen: z.coerce.number().int().min(1000).default(1_000_000),
  /**
   * Tests only: a directory of crash points. At a point named `<step>:<where>` the agent, once per
   * point, writes `<dir>/<point>.reached` (its pid) and stops making progress, so that a test can
   * kill -9 it exactly there (see hooks.ts). Unset in production: the points are no-ops.
   */
  testHookDir: z.string().min(1).optional(),
  /** pino level: fatal, error, warn, info, debug, trace, silent. */
  logLevel: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
})
  .refine((c) => (c.redis ? 1 : 0) + (c.relay?.length ? 1 : 0) === 1, { message: 'give exactly one of --redis (direct mode) and --relay (relay mode)', path: ['redis'] })
  .refine((c) => !c.relay?.length || !!c.relayTokenFile, { message: 'relay mode needs --relay-token-file', path: ['relayTokenFile'] });

/** Validated, frozen agent configuration. */
export type AgentConfig = Readonly<z.infer<typeof agentConfigSchema>>;
/** What callers may pass to build an AgentConfig (defaults filled in). */
export type AgentConfigInput = z.input<typeof agentConfigSchema>;

/** Loads the agent config from a YAML file, the environment and flags; throws SC_ERR_BAD_CONFIG. */
export function loadAgentConfig(src: ConfigSources): AgentConfig {
  return loadConfig(agentConfigSchema, { envPrefix: AGENT_ENV_PREFIX, ...src });
}

/** Validates an in-process config object (no environment, no file); throws SC_ERR_BAD_CONFIG. */
export function agentConfig(input: AgentConfigInput): AgentConfig {
  return loadConfig(agentConfigSchema, { flags: input as Record<string, unknown>, env: {} });
}

/** The agent's keys, loaded once at start. */
export interface AgentKeys {
  /** Release keys that manifests must be signed with. */
  trusted: KeyObject[];
  /** Control's key that step jobs must be signed with. */
  control: KeyObject;
  /** age identities (`AGE-SECRET-KEY-1…`) that decrypt bundles. Never logged. */
  identities: string[];
}

function readFile(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw scError('SC_ERR_BAD_CONFIG', `cannot read ${what} ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

/** Reads the trust keys, the control key and the identity file; throws SC_ERR_BAD_CONFIG / SC_ERR_BAD_KEY. */
export async function loadAgentKeys(cfg: Pick<AgentConfig, 'trustKey' | 'controlKey' | 'identity'>): Promise<AgentKeys> {
  return {
    trusted: cfg.trustKey.map((p) => loadPublicKey(readFile(p, 'trust key'))),
    control: loadPublicKey(readFile(cfg.controlKey, 'control key')),
    identities: await readIdentityFile(cfg.identity),
  };
}
