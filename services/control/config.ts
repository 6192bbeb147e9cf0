/**
 * Control-plane configuration: schema, defaults and loading (YAML file, then
 * `STAGECOACH_CONTROL_*` environment variables, then flags). Validated once, then frozen.
 * Secrets are read from files here, once, at startup.
 */
import { readFileSync } from 'node:fs';
import type { KeyObject } from 'node:crypto';
import { z } from 'zod';
import { type ConfigSources, loadConfig, type NamedToken, parseListen, parseTokenLines, stringList } from '../../shared/config.js';
import { scError } from '../../shared/errors.js';
import { loadPrivateKey, loadPublicKey } from '../../shared/manifest.js';
import { NAME_RE } from '../../shared/names.js';
import { clientTlsSettings, serverTlsSettings } from '../../shared/tls.js';

/** Environment variable prefix: `STAGECOACH_CONTROL_LISTEN`, `STAGECOACH_CONTROL_REDIS`, … */
export const CONTROL_ENV_PREFIX = 'STAGECOACH_CONTROL_';

const list = stringList;

const listenAddr = z.string().refine((s) => {
  try {
    parseListen(s);
    return true;
  } catch {
    return false;
  }
}, 'expected HOST:PORT');

/** The control plane's configuration schema; unknown keys are rejected. */
export const controlConfigSchema = z.strictObject({
  ...serverTlsSettings,
  ...clientTlsSettings,
  /** HOST:PORT to listen on; port 0 picks a free port. */
  listen: listenAddr.default('127.0.0.1:7090'),
  /** Redis URL (`redis://` or `rediss://`), with credentials of the control ACL user in production. */
  redis: z.string().regex(/^rediss?:\/\//, 'expected redis:// or rediss:// URL'),
  /** Origin base URL: manifests are checked there before a rollout is accepted. */
  origin: z.string().url(),
  /** Write tokens: one per line, `NAME:TOKEN` (the name goes into the audit log) or a bare `TOKEN` (name `admin`). They read too. */
  tokenFile: z.string().min(1),
  /** Read-only tokens (same format): the API's reads, events, bull-board; for dashboards and monitoring. */
  readTokenFile: z.string().min(1).optional(),
  /** Reads (the API's GETs, events, bull-board) without a token, as before read tokens existed: a lab, never a fleet. */
  openReads: z.union([z.boolean(), z.enum(['true', 'false']).transform((v) => v === 'true')]).default(false),
  /** `/metrics` needs a token (read or write) too. */
  metricsToken: z.union([z.boolean(), z.enum(['true', 'false']).transform((v) => v === 'true')]).default(false),
  /** Control's ed25519 private key (PEM): signs every step job. */
  signingKey: z.string().min(1),
  /** Key prefix shared with the agents (a Redis Cluster hash tag such as `{stagecoach}` on a cluster). */
  prefix: z
    .string()
    .regex(/^[A-Za-z0-9{}_.-]{1,64}$/)
    .default('stagecoach'),
  /** Token for the stages' `POST /v1/prefetch` (first line of the file). Without it preheat is skipped. */
  stageTokenFile: z.string().min(1).optional(),
  /** Release public keys (PEM files): with any, a rollout's manifests must verify against one of them. */
  trustKey: list.default([]),
  /** Stages per colo in addition to what agents register: `colo=URL` items. */
  stages: list.default([]),
  /** Engine tick in ms: how often waves, budgets and preheats are re-evaluated. */
  tickMs: z.coerce.number().int().min(20).max(10_000).default(500),
  /** Shortest time between two engine passes in ms: reports arriving meanwhile are applied in one batch. */
  passMs: z.coerce.number().int().min(0).max(5_000).default(250),
  /** How long a preheat may take before the wave starts anyway (seconds). */
  preheatTimeoutSec: z.coerce.number().int().min(0).max(86_400).default(600),
  /** Lifetime of signed step jobs (seconds): an agent refuses a job older than this. */
  jobTtlSec: z.coerce.number().int().min(60).max(30 * 86_400).default(86_400),
  /**
   * A host in flight with no report for this long (seconds) is marked failed with SC_ERR_TIMEOUT,
   * so a dead machine cannot hold a wave forever (0: never). Longer than the slowest step.
   */
  hostTimeoutSec: z.coerce.number().int().min(0).max(30 * 86_400).default(3600),
  /** A host whose last heartbeat is older than this (seconds) is shown offline. */
  staleSec: z.coerce.number().int().min(1).default(30),
  /** How many host queues bull-board shows at most (the first N host ids). */
  boardQueues: z.coerce.number().int().min(0).max(100_000).default(500),
  /** Name of this control instance in the reports consumer group. */
  consumer: z
    .string()
    .regex(/^[A-Za-z0-9_.-]{1,64}$/)
    .default('control-1'),
  /** pino level. */
  logLevel: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
});

/** Validated, frozen control configuration. */
export type ControlConfig = Readonly<z.infer<typeof controlConfigSchema>>;
/** What callers may pass to build a ControlConfig (defaults filled in). */
export type ControlConfigInput = z.input<typeof controlConfigSchema>;

/** Loads the control config from a YAML file, the environment and flags; throws SC_ERR_BAD_CONFIG. */
export function loadControlConfig(src: ConfigSources): ControlConfig {
  return loadConfig(controlConfigSchema, { envPrefix: CONTROL_ENV_PREFIX, ...src });
}

/** Validates an in-process config object (no environment, no file); throws SC_ERR_BAD_CONFIG. */
export function controlConfig(input: ControlConfigInput): ControlConfig {
  return loadConfig(controlConfigSchema, { flags: input as Record<string, unknown>, env: {} });
}

/** A named token (the name goes into the audit log). */
export type { NamedToken };

/** The control token file format is the one of every token file (shared/config.ts). */
export const parseTokens = parseTokenLines;

function readText(path: string, what: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    throw scError('SC_ERR_BAD_CONFIG', `cannot read ${what} ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

/** Everything secret or parsed that the config points at, read once at startup. */
export interface ControlSecrets {
  tokens: NamedToken[];
  /** Read-only tokens (none without readTokenFile). */
  readTokens: NamedToken[];
  signingKey: KeyObject;
  stageToken: string | null;
  trustKeys: KeyObject[];
  /** colo → stage URLs from `--stages`. */
  stages: Map<string, string[]>;
}

/** Parses `colo=URL` items into a map; throws SC_ERR_BAD_CONFIG. */
export function parseStagesFlag(items: readonly string[]): Map<string, string[]> {
  const m = new Map<string, string[]>();
  for (const it of items) {
    const eq = it.indexOf('=');
    const colo = it.slice(0, eq);
    const url = it.slice(eq + 1).replace(/\/+$/, '');
    if (eq <= 0 || !NAME_RE.test(colo) || !/^https?:\/\/[^\s/]+/.test(url)) {
      throw scError('SC_ERR_BAD_CONFIG', `bad --stages item ${JSON.stringify(it.slice(0, 200))}: expected colo=http://host:port`);
    }
    m.set(colo, [...(m.get(colo) ?? []), url]);
  }
  return m;
}

/** Reads tokens, keys and the stage list the config names; throws SC_ERR_BAD_CONFIG / SC_ERR_BAD_KEY. */
export function readControlSecrets(c: ControlConfig): ControlSecrets {
  let stageToken: string | null = null;
  if (c.stageTokenFile) {
    stageToken = readText(c.stageTokenFile, 'stage token file').split('\n')[0].trim();
    if (!stageToken) throw scError('SC_ERR_BAD_CONFIG', `stage token file ${c.stageTokenFile} is empty`);
  }
  return {
    tokens: parseTokens(readText(c.tokenFile, 'token file'), c.tokenFile),
    readTokens: c.readTokenFile ? parseTokens(readText(c.readTokenFile, 'read token file'), c.readTokenFile) : [],
    signingKey: loadPrivateKey(readText(c.signingKey, 'signing key')),
    stageToken,
    trustKeys: c.trustKey.map((p) => loadPublicKey(readText(p, 'trust key'))),
    stages: parseStagesFlag(c.stages),
  };
}
