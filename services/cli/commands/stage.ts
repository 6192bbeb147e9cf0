/** `stagecoach stage`: runs a per-colo pull-through stage (see README, "Stage"). */
import type { Command } from 'commander';
import { action, collect, splitList } from '../util.js';

/** Settings whose flag is not `--` + the key in kebab case (for naming a missing setting). */
const STAGE_FLAG_NAMES = { upstreams: '--upstream', trustKeys: '--trust-key', idleTimeoutMs: '--idle-timeout', negativeTtlMs: '--negative-ttl', reconcileIntervalMs: '--reconcile-interval' };

/** Registers the `stage` command. */
export function register(program: Command): void {
  program
    .command('stage')
    .description('Run a stage: a pull-through blob cache that fetches every bundle once per colo')
    .option('--listen <host:port>', 'address to listen on (default 127.0.0.1:7080)')
    .option('--upstream <urls>', 'upstream origin or parent stage URLs, comma-separated, in order of preference', (v: string, prev: string[] = []) => [
      ...prev,
      ...splitList(v),
    ])
    .option('--cache <dir>', 'cache directory')
    .option('--cache-size <bytes>', 'byte budget for cached blobs, e.g. 20GiB (default 20GiB)')
    .option('--max-passthrough-bytes <bytes>', 'largest blob streamed through uncached when over the cache budget, e.g. 64GiB (default 64GiB); larger ones get 507')
    .option('--colo <name>', 'colo name (reported in /healthz and metrics)')
    .option('--trust-key <pem>', 'trusted manifest signing public key (repeatable); untrusted manifests are refused', collect)
    .option('--token-file <file>', 'bearer token file protecting POST /v1/prefetch')
    .option('--idle-timeout <ms>', 'abandon and resume an upstream response idle this long (default 15000)')
    .option('--negative-ttl <ms>', 'remember upstream 404s this long (default 5000)')
    .option('--reconcile-interval <ms>', 'drop cached bundles the upstream no longer lists, every this many ms (default 600000; 0: never)')
    .option('--redis <url>', "relay on: the fleet's Redis URL; this stage then serves its colo's hosts in relay mode")
    .option('--prefix <p>', 'relay: Redis key prefix of the fleet (default stagecoach)')
    .option('--relay-key-file <file>', "relay: this colo's relay keys (KID:HEXKEY lines, current first; mode 0600), made by stagecoach acl relay-key")
    .option('--relay-secret-file <file>', 'removed (refused): a stage no longer holds the fleet secret; use --relay-key-file')
    .option('--tls-cert <pem>', 'listen with TLS: certificate (chain) file, with --tls-key (stagecoach tls gen)')
    .option('--tls-key <pem>', 'listen with TLS: private key file of --tls-cert')
    .option('--accel-redirect <prefix>', 'behind nginx: hand committed blobs to it with X-Accel-Redirect under this internal path, e.g. /_stagecoach')
    .option('--nginx-conf <host:port>', "print the nginx config that fronts this stage on HOST:PORT (needs --accel-redirect), and exit")
    .option('--config <file>', 'YAML config file (keys as in the README)')
    .option('--log-level <level>', 'pino log level (default info)')
    .action(
      action(async (o: Record<string, string | string[] | undefined>) => {
        const flags = {
          listen: o.listen,
          upstreams: o.upstream,
          cache: o.cache,
          cacheSize: o.cacheSize,
          maxPassthroughBytes: o.maxPassthroughBytes,
          colo: o.colo,
          trustKeys: o.trustKey,
          tokenFile: o.tokenFile,
          idleTimeoutMs: o.idleTimeout,
          negativeTtlMs: o.negativeTtl,
          reconcileIntervalMs: o.reconcileInterval,
          logLevel: o.logLevel,
          redis: o.redis,
          prefix: o.prefix,
          relayKeyFile: o.relayKeyFile,
          relaySecretFile: o.relaySecretFile,
          tlsCert: o.tlsCert,
          tlsKey: o.tlsKey,
          accelRedirect: o.accelRedirect,
        };
        const src = { file: o.config as string | undefined, flagNames: STAGE_FLAG_NAMES };
        if (typeof o.nginxConf === 'string') {
          const [{ loadStageConfig }, { renderNginxSite }] = await Promise.all([import('../../stage/config.js'), import('../../stage/accel.js')]);
          process.stdout.write(renderNginxSite(loadStageConfig({ ...src, flags }), { front: o.nginxConf }));
          return;
        }
        const { runStage } = await import('../../stage/main.js'); // loaded only when this command runs
        await runStage(flags, src);
      }),
    );
}
