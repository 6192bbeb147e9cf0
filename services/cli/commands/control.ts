/** `stagecoach control`: run the control plane (HTTP API, rollout engine, dashboard). */
import type { Command } from 'commander';
import { loadControlConfig } from '../../control/config.js';
import { runControl } from '../../control/main.js';
import { scError } from '../../../shared/errors.js';
import { action, collect, loadSigningKey } from '../util.js';

interface ControlFlags {
  listen?: string;
  redis?: string;
  origin?: string;
  tokenFile?: string;
  signingKey?: string;
  prefix?: string;
  stageTokenFile?: string;
  trustKey?: string[];
  stages?: string[];
  tickMs?: string;
  preheatTimeout?: string;
  config?: string;
  logLevel?: string;
  tlsCert?: string;
  tlsKey?: string;
  readTokenFile?: string;
  openReads?: boolean;
  metricsToken?: boolean;
}

/** True for the ioredis failures that mean "no Redis answers" (it gave up retrying, or was refused). */
function redisDown(err: unknown): boolean {
  const e = err as { name?: string; code?: string };
  return e?.name === 'MaxRetriesPerRequestError' || e?.code === 'ECONNREFUSED';
}

/** The Redis URL as it may be shown: the password (from an ACL credentials URL) is left out. */
function withoutPassword(url: string): string {
  try {
    const u = new URL(url);
    u.password = '';
    return u.toString();
  } catch {
    return '(unparsable --redis URL)';
  }
}

/** Registers `stagecoach control`. */
export function register(program: Command): void {
  program
    .command('control')
    .description('Run the control plane: inventory, rollouts in waves, host operations, audit log, dashboard at /')
    .option('--listen <host:port>', 'address to listen on (default 127.0.0.1:7090)')
    .option('--redis <url>', 'Redis URL (redis:// or rediss://), with the control ACL user in production')
    .option('--origin <url>', 'origin base URL: manifests are checked there before a rollout is accepted')
    .option('--token-file <file>', 'write tokens, one per line: NAME:TOKEN (NAME goes into the audit log) or a bare TOKEN')
    .option('--signing-key <pem>', "control's ed25519 private key: signs every step job")
    .option('--prefix <p>', 'Redis key prefix shared with the agents (default stagecoach; {stagecoach} on a cluster)')
    .option('--stage-token-file <file>', "token for the stages' POST /v1/prefetch (preheat); without it preheat is skipped")
    .option('--trust-key <pem>', 'release public key; repeatable. With any, rollout manifests must verify against one of them', collect)
    .option('--stages <colo=url,...>', 'stages per colo, in addition to what agents register; repeatable', collect)
    .option('--tick-ms <ms>', 'engine tick (default 500)')
    .option('--preheat-timeout <s>', 'seconds a wave waits for preheat before starting anyway (default 600)')
    .option('--tls-cert <pem>', 'listen with TLS: certificate (chain) file, with --tls-key (stagecoach tls gen)')
    .option('--tls-key <pem>', 'listen with TLS: private key file of --tls-cert')
    .option('--read-token-file <file>', 'read-only tokens (NAME:TOKEN or TOKEN lines): the API, events and bull-board, for dashboards and monitoring')
    .option('--open-reads', 'reads need no token (a lab, never a fleet)')
    .option('--metrics-token', '/metrics needs a token (read-only or write) too')
    .option('--config <file>', 'YAML config file (keys as in the README: listen, redis, origin, tokenFile, signingKey, …)')
    .option('--log-level <level>', 'fatal|error|warn|info|debug|trace|silent (default info)')
    .action(
      action(async (f: ControlFlags) => {
        const cfg = loadControlConfig({
          file: f.config,
          flagNames: { preheatTimeoutSec: '--preheat-timeout' },
          flags: {
            listen: f.listen,
            redis: f.redis,
            origin: f.origin,
            tokenFile: f.tokenFile,
            signingKey: f.signingKey,
            prefix: f.prefix,
            stageTokenFile: f.stageTokenFile,
            trustKey: f.trustKey,
            stages: f.stages?.flatMap((s) => s.split(',').map((x) => x.trim()).filter(Boolean)),
            tickMs: f.tickMs,
            preheatTimeoutSec: f.preheatTimeout,
            logLevel: f.logLevel,
            tlsCert: f.tlsCert,
            tlsKey: f.tlsKey,
            readTokenFile: f.readTokenFile,
            openReads: f.openReads,
            metricsToken: f.metricsToken,
          },
        });
        loadSigningKey(cfg.signingKey); // a .pub given as the key gets its hint before anything starts
        await runControl(cfg).catch((err: unknown) => {
          throw redisDown(err) ? scError('SC_ERR_REDIS_UNAVAILABLE', `cannot reach Redis at ${withoutPassword(cfg.redis)}`).withHint('check --redis and that Redis is running') : err;
        });
      }),
    );
}
