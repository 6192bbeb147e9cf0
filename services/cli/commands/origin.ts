/**
 * `stagecoach origin`: run the origin bundle store; `stagecoach origin gc`: collect the blobs no
 * manifest references on a running origin, through its API.
 */
import type { Command } from 'commander';
import { DEFAULT_GC_GRACE_SEC, OriginClient } from '../../origin/client.js';
import { loadOriginConfig } from '../../origin/config.js';
import { runOrigin } from '../../origin/main.js';
import { scError } from '../../../shared/errors.js';
import { envOption } from '../defaults.js';
import { action, collect, printJson, readTokenFile } from '../util.js';

interface OriginFlags {
  listen?: string;
  data?: string;
  tokenFile?: string;
  trustKey?: string[];
  config?: string;
  logLevel?: string;
  maxBlobSize?: string;
  tlsCert?: string;
  tlsKey?: string;
}

interface GcFlags {
  origin: string;
  tokenFile: string;
  grace?: string;
  dryRun?: boolean;
  json?: boolean;
}

const UNITS: Record<string, number> = { s: 1, m: 60, h: 3600, d: 86400 };

/** `90`, `90s`, `30m`, `1h`, `7d` (or combinations such as `1h30m`) → whole seconds; SC_ERR_BAD_REQUEST otherwise. */
export function parseDuration(text: string): number {
  const s = text.trim();
  if (/^\d+$/.test(s)) return Number(s);
  const parts = [...s.matchAll(/(\d+)([smhd])/g)];
  if (parts.length === 0 || parts.map((p) => p[0]).join('') !== s) {
    throw scError('SC_ERR_BAD_REQUEST', `--grace: expected a duration such as 90s, 30m, 1h or 7d, got ${JSON.stringify(text.slice(0, 40))}`);
  }
  return parts.reduce((n, p) => n + Number(p[1]) * UNITS[p[2]], 0);
}

function mib(n: number): string {
  return `${(n / 1048576).toFixed(1)} MiB`;
}

async function runGc(f: GcFlags): Promise<void> {
  const graceSec = f.grace === undefined ? DEFAULT_GC_GRACE_SEC : parseDuration(f.grace);
  const origin = new OriginClient(f.origin, { token: readTokenFile(f.tokenFile) });
  const r = await origin.collectGarbage({ graceSec, dryRun: f.dryRun });
  if (f.json) {
    printJson(r);
    return;
  }
  const verb = r.dryRun ? 'would free' : 'freed';
  process.stdout.write(
    `${verb} ${r.removed.bytes} bytes (${mib(r.removed.bytes)}) in ${r.removed.blobs} blob(s) of ${r.scanned.blobs} (${mib(r.scanned.bytes)})\n` +
      `kept: ${r.kept.referenced} referenced by ${r.manifests} manifest(s), ${r.kept.young} younger than ${graceSec}s, ${r.kept.uploading} being uploaded\n`,
  );
}

/** Registers `stagecoach origin` and `stagecoach origin gc`. */
export function register(program: Command): void {
  const origin = program
    .command('origin')
    .description('Run the origin bundle store (blobs by sha256, signed manifests by name@version); origin gc collects unreferenced blobs')
    .option('--listen <host:port>', 'address to listen on (default 127.0.0.1:7070)')
    .option('--data <dir>', 'data directory (blobs/, manifests/, meta/, removed/, tmp/)')
    .option('--token-file <file>', 'the bearer token that writes need: a token file as control reads it (NAME:TOKEN or TOKEN lines; the first counts)')
    .option('--trust-key <pem>', 'release public key (PEM); repeatable. When given, only manifests signed by one of them are accepted', collect)
    .option('--tls-cert <pem>', 'listen with TLS: certificate (chain) file, with --tls-key (stagecoach tls gen)')
    .option('--tls-key <pem>', 'listen with TLS: private key file of --tls-cert')
    .option('--config <file>', 'YAML config file (keys: listen, data, tokenFile, trustKey, logLevel, maxManifestBytes, maxBlobSize, idleTimeoutSec)')
    .option('--max-blob-size <bytes>', 'largest accepted blob, e.g. 64GiB (default 64GiB); larger uploads get 413')
    .option('--log-level <level>', 'fatal|error|warn|info|debug|trace|silent (default info)')
    .option('--ca <pem>', 'trust this CA for HTTPS besides the system store; repeatable (also STAGECOACH_CA)', collect)
    .action(
      action(async (flags: OriginFlags) => {
        const cfg = loadOriginConfig({
          file: flags.config,
          flags: { listen: flags.listen, data: flags.data, tokenFile: flags.tokenFile, trustKey: flags.trustKey, logLevel: flags.logLevel, maxBlobSize: flags.maxBlobSize, tlsCert: flags.tlsCert, tlsKey: flags.tlsKey },
        });
        await runOrigin(cfg);
      }),
    );

  origin
    .command('gc')
    .description('Remove the blobs no manifest references on a running origin (mark and sweep; uploads in flight and young blobs are kept)')
    .addOption(envOption('--origin <url>', 'origin URL', 'STAGECOACH_ORIGIN', { required: true }))
    .addOption(envOption('--token-file <file>', "file holding the origin's write token", 'STAGECOACH_ORIGIN_TOKEN_FILE', { required: true, fallbackEnv: 'STAGECOACH_TOKEN_FILE' }))
    .option('--grace <duration>', `keep blobs written or re-uploaded more recently than this: 90s, 30m, 1h, 7d (default ${DEFAULT_GC_GRACE_SEC / 3600}h)`)
    .option('--dry-run', 'report what would be removed, remove nothing')
    .option('--json', 'print the report as JSON')
    .action(action(async (f: GcFlags) => runGc(f)));
}
