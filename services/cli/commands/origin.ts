/** `stagecoach origin`: run the origin bundle store. */
import type { Command } from 'commander';
import { loadOriginConfig } from '../../origin/config.js';
import { runOrigin } from '../../origin/main.js';
import { action, collect } from '../util.js';

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

/** Registers `stagecoach origin`. */
export function register(program: Command): void {
  program
    .command('origin')
    .description('Run the origin bundle store (blobs by sha256, signed manifests by name@version)')
    .option('--listen <host:port>', 'address to listen on (default 127.0.0.1:7070)')
    .option('--data <dir>', 'data directory (blobs/, manifests/, meta/, tmp/)')
    .option('--token-file <file>', 'the bearer token that writes need: a token file as control reads it (NAME:TOKEN or TOKEN lines; the first counts)')
    .option('--trust-key <pem>', 'release public key (PEM); repeatable. When given, only manifests signed by one of them are accepted', collect)
    .option('--tls-cert <pem>', 'listen with TLS: certificate (chain) file, with --tls-key (stagecoach tls gen)')
    .option('--tls-key <pem>', 'listen with TLS: private key file of --tls-cert')
    .option('--config <file>', 'YAML config file (keys: listen, data, tokenFile, trustKey, logLevel, maxManifestBytes, maxBlobSize, idleTimeoutSec)')
    .option('--max-blob-size <bytes>', 'largest accepted blob, e.g. 64GiB (default 64GiB); larger uploads get 413')
    .option('--log-level <level>', 'fatal|error|warn|info|debug|trace|silent (default info)')
    .action(
      action(async (flags: OriginFlags) => {
        const cfg = loadOriginConfig({
          file: flags.config,
          flags: { listen: flags.listen, data: flags.data, tokenFile: flags.tokenFile, trustKey: flags.trustKey, logLevel: flags.logLevel, maxBlobSize: flags.maxBlobSize, tlsCert: flags.tlsCert, tlsKey: flags.tlsKey },
        });
        await runOrigin(cfg);
      }),
    );
}
