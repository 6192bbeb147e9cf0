/**
 * Origin configuration: schema, defaults and loading (YAML file, then `STAGECOACH_ORIGIN_*`
 * environment variables, then flags). Validated once, then frozen.
 */
import { z } from 'zod';
import { byteSize, type ConfigSources, loadConfig, parseListen, readTokenFile, stringList } from '../../shared/config.js';
import { serverTlsSettings } from '../../shared/tls.js';

/** Environment variable prefix: `STAGECOACH_ORIGIN_LISTEN`, `STAGECOACH_ORIGIN_DATA`, … */
export const ORIGIN_ENV_PREFIX = 'STAGECOACH_ORIGIN_';

const pathList = stringList;

/** The origin's configuration schema; unknown keys are rejected. */
export const originConfigSchema = z.strictObject({
  ...serverTlsSettings,
  /** HOST:PORT to listen on; port 0 picks a free port. */
  listen: z
    .string()
    .default('127.0.0.1:7070')
    .refine((s) => {
      try {
        parseListen(s);
        return true;
      } catch {
        return false;
      }
    }, 'expected HOST:PORT'),
  /** The data directory (blobs, manifests, temp files). */
  data: z.string().min(1),
  /** A file whose first line is the bearer token that writes need. */
  tokenFile: z.string().min(1),
  /** Release public keys (PEM files). When given, only manifests signed by one of them are accepted. */
  trustKey: pathList.default([]),
  /** pino level: fatal, error, warn, info, debug, trace, silent. */
  logLevel: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  /** Largest accepted manifest body in bytes. */
  maxManifestBytes: z.coerce.number().int().min(1024).max(16 << 20).default(1 << 20),
  /**
   * Largest accepted blob in bytes (`64GiB`, `512MiB`, or a number). A PUT that declares more is
   * refused before its body is read; a chunked one is cut off once it passes the cap (413).
   */
  maxBlobSize: byteSize.pipe(z.number().int().min(1)).default(64 * 1024 ** 3),
  /** A connection with no bytes moving for this many seconds is closed (0 disables). */
  idleTimeoutSec: z.coerce.number().int().min(0).default(120),
});

/** Validated, frozen origin configuration. */
export type OriginConfig = Readonly<z.infer<typeof originConfigSchema>>;
/** What callers may pass to build an OriginConfig (defaults filled in). */
export type OriginConfigInput = z.input<typeof originConfigSchema>;

/** Loads the origin config from a YAML file, the environment and flags; throws SC_ERR_BAD_CONFIG. */
export function loadOriginConfig(src: ConfigSources): OriginConfig {
  return loadConfig(originConfigSchema, { envPrefix: ORIGIN_ENV_PREFIX, ...src });
}

/** Validates an in-process config object (no environment, no file); throws SC_ERR_BAD_CONFIG. */
export function originConfig(input: OriginConfigInput): OriginConfig {
  return loadConfig(originConfigSchema, { flags: input as Record<string, unknown>, env: {} });
}

/** Reads the write token (first line of the file, trimmed); throws SC_ERR_BAD_CONFIG. */
export function readOriginToken(path: string): string {
  return readTokenFile(path);
}
