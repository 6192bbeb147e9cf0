/**
 * Stage configuration: one strict zod schema with every default in one place. Validated once
 * (by `loadStageConfig` from flags/env/file, or by `parseStageConfig` for in-process callers),
 * then frozen.
 */
import { z } from 'zod';
import { byteSize, commaList, deepFreeze, loadConfig, parseListen, type ConfigSources } from '../../shared/config.js';
import { scError } from '../../shared/errors.js';
import { clientTlsSettings, serverTlsSettings } from '../../shared/tls.js';
import { UPSTREAM_HEALTH_DEFAULTS } from './upstream-health.js';

const bytes = byteSize;

const ms = (def: number) => z.coerce.number().int().nonnegative().default(def);

const upstreamUrl = z
  .string()
  .url()
  .refine((u) => /^https?:\/\//.test(u), 'upstream must be an http(s) URL')
  .transform((u) => u.replace(/\/+$/, ''));

const list = commaList;

/** The removed fleet-secret settings: refused with what to use instead (the value is never echoed). */
const removedRelaySecret = z
  .undefined({
    error: () =>
      "the fleet relay secret (--relay-secret-file, relaySecretFile, relaySecret) is no longer accepted: a stage holds only its colo's relay keys. Make them with stagecoach acl relay-key --secret-file F --colo C --out FILE (mode 0600) and start the stage with --relay-key-file FILE",
  })
  .optional();

/** The stage config schema (unknown keys rejected). Durations are milliseconds, sizes bytes. */
export const stageConfigSchema = z.strictObject({
  ...serverTlsSettings,
  ...clientTlsSettings,
  /** HOST:PORT to listen on (port 0 picks a free one). */
  listen: z.string().default('127.0.0.1:7080'),
  /** Ordered upstreams (origin or parent stages); the first healthy one is used first. */
  upstreams: list(upstreamUrl, 'at least one upstream URL (--upstream)').pipe(z.array(z.string()).min(1, 'at least one --upstream is required')),
  /** Cache directory (created if missing). */
  cache: z.string().min(1),
  /** Byte budget for cached blobs (`20GiB`, `512MiB`, or a number). */
  cacheSize: bytes.default(20 * 1024 ** 3),
  /**
   * Largest blob passed through (a blob over the whole cache budget is streamed, not cached); a
   * larger one is refused with 507 SC_ERR_PASSTHROUGH_TOO_LARGE before its body is fetched.
   */
  maxPassthroughBytes: bytes.default(64 * 1024 ** 3),
  /** Colo name, reported by /healthz and as a metrics label. */
  colo: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/, 'colo must be [A-Za-z0-9._-], at most 64 characters'),
  /** PEM public keys; when given, manifests must verify against one of them to be cached or served. */
  trustKeys: list(z.string().min(1)).default([]),
  /** File holding the bearer token for POST /v1/prefetch (first line). Without it, prefetch is refused. */
  tokenFile: z.string().optional(),
  /** The prefetch token itself, for in-process callers (never logged). Overrides tokenFile. */
  token: z.string().min(1).optional(),
  /** An upstream response that delivers no byte for this long is abandoned and resumed. */
  idleTimeoutMs: ms(15_000),
  /** First backoff before retrying an upstream; doubles per consecutive failure. */
  backoffMs: ms(250),
  /** Backoff ceiling. */
  maxBackoffMs: ms(5_000),
  /** Retries on the same upstream before moving to the next one. */
  retriesPerUpstream: z.coerce.number().int().nonnegative().default(2),
  /** Consecutive attempts without a single new byte before a fill fails. */
  maxAttempts: z.coerce.number().int().positive().default(12),
  /** An upstream that exhausted its retries is tried last for this long. */
  upstreamDownMs: ms(10_000),
  /** How long a 404 (blob or manifest) is remembered. */
  negativeTtlMs: ms(5_000),
  /** Period of the background /healthz check of each upstream (upstream-health.ts); 0: none. */
  upstreamCheckIntervalMs: ms(UPSTREAM_HEALTH_DEFAULTS.checkIntervalMs),
  /** Deadline of one background check. */
  upstreamCheckTimeoutMs: ms(UPSTREAM_HEALTH_DEFAULTS.checkTimeoutMs),
  /** Failed checks or requests in a row after which an upstream counts as down. */
  upstreamDownAfter: z.coerce.number().int().positive().default(UPSTREAM_HEALTH_DEFAULTS.downAfter),
  /**
   * Period of the reconcile pass (reconcile.ts): cached blobs and manifests of bundles the
   * upstream no longer lists are dropped. 0 disables the timer.
   */
  reconcileIntervalMs: ms(600_000),
  /** Finished fills kept for GET /v1/fills. */
  fillHistory: z.coerce.number().int().nonnegative().default(200),
  /** Log level (pino). */
  logLevel: z.string().default('info'),
  /** Relay on: Redis URL of the control plane; the stage then serves its colo's hosts in relay mode (services/relay/server.ts). */
  redis: z.string().regex(/^rediss?:\/\/\S+$/, 'expected redis://… or rediss://…').optional(),
  /** Redis key prefix of the fleet (relay). */
  prefix: z.string().regex(/^[A-Za-z0-9{}_.-]{1,64}$/).default('stagecoach'),
  /**
   * File of this colo's relay keys, `KID:HEXKEY` lines, current first (`stagecoach acl relay-key`;
   * mode 0600): the relay checks hosts' tokens with them and holds no fleet secret.
   */
  relayKeyFile: z.string().min(1).optional(),
  /** The relay key file's text itself, for in-process callers (never logged). Overrides relayKeyFile. */
  relayKeys: z.string().min(1).optional(),
  /** Removed: a stage holding the fleet secret could mint tokens for every colo's relay. */
  relaySecretFile: removedRelaySecret,
  /** Removed, as relaySecretFile. */
  relaySecret: removedRelaySecret,
  /** BullMQ lock duration of the jobs the relay holds, ms (renewed every third). */
  relayLockDurationMs: z.coerce.number().int().min(1000).default(30_000),
  /** Stalled-job check period of the relay's queue, ms. */
  relayStalledIntervalMs: z.coerce.number().int().min(500).default(15_000),
  /** How often the relay writes the heartbeat of hosts with an open poll, ms. */
  relayHeartbeatMs: z.coerce.number().int().min(100).default(10_000),
  /** Longest long-poll a host may ask for, s. */
  relayMaxWaitSec: z.coerce.number().int().min(1).max(300).default(60),
  /**
   * Hand committed blobs to a front nginx: the internal path prefix its config serves the cache's
   * `blobs/` from (accel.ts; `stagecoach stage --nginx-conf`). Off when unset.
   */
  accelRedirect: z
    .string()
    .regex(/^(\/[A-Za-z0-9._-]+)+$/, 'accelRedirect must be a path prefix such as /_stagecoach (segments of [A-Za-z0-9._-])')
    .refine((p) => !p.split('/').some((s) => s === '.' || s === '..'), 'accelRedirect must not have . or .. segments')
    .optional(),
});

/** Input accepted by `parseStageConfig` / `startStage` (defaults applied on parse). */
export type StageConfigInput = z.input<typeof stageConfigSchema>;
/** A validated, frozen stage config. */
export type StageConfig = Readonly<z.output<typeof stageConfigSchema>>;

/** Validates an in-process config; throws SC_ERR_BAD_CONFIG listing every problem. */
export function parseStageConfig(input: StageConfigInput | StageConfig): StageConfig {
  const r = stageConfigSchema.safeParse(input);
  if (!r.success) {
    throw scError(
      'SC_ERR_BAD_CONFIG',
      `invalid stage configuration: ${r.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ')}`,
    );
  }
  parseListen(r.data.listen);
  return deepFreeze(r.data);
}

/** Loads the stage config from flags, `STAGECOACH_STAGE_*` env and an optional YAML file. */
export function loadStageConfig(src: ConfigSources): StageConfig {
  const c = loadConfig(stageConfigSchema, { envPrefix: 'STAGECOACH_STAGE_', ...src });
  parseListen(c.listen);
  return c;
}
