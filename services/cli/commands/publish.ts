/**
 * `stagecoach publish PATH`: pack, encrypt, upload and sign a bundle. This file parses the flags
 * and prints; what publishing does (streaming, the idempotent re-publish, the early trusted-key
 * check) is services/origin/publish.ts, which the sim fleet calls too.
 */
import type { Command } from 'commander';
import { COMPRESSIONS, NET_FORMATS } from '../../../shared/manifest.js';
import { OriginClient } from '../../origin/client.js';
import { checkPublishRequest, type PublishProgress, type PublishRequest, publish } from '../../origin/publish.js';
import { envOption } from '../defaults.js';
import { byteBar } from '../progress.js';
import { action, collect, loadSigningKey, printJson, readTokenFile } from '../util.js';

interface PublishFlags {
  origin: string;
  name: string;
  version: string;
  role: string;
  tokenFile: string;
  signingKey: string;
  recipient?: string[];
  recipientsFile?: string[];
  compression: string;
  osId?: string;
  osVersion?: string;
  netFormat?: string;
  workDir?: string;
  json?: boolean;
}

/** Registers `stagecoach publish`. */
export function register(program: Command): void {
  program
    .command('publish')
    .description('Pack, encrypt, upload and sign a bundle (re-publishing the same content is a no-op)')
    .argument('<path>', 'root filesystem: a directory, or a tarball (.tar, .tar.gz, .tar.zst)')
    .addOption(envOption('--origin <url>', 'origin URL', 'STAGECOACH_ORIGIN', { required: true }))
    .requiredOption('--name <name>', 'bundle name ([a-z0-9][a-z0-9._-]{0,63})')
    .requiredOption('--version <version>', 'bundle version ([0-9A-Za-z][0-9A-Za-z._+-]{0,63})')
    .requiredOption('--role <role>', 'base (the rescue OS B) or target (the OS C)')
    .addOption(envOption('--token-file <file>', "file holding the origin's write token", 'STAGECOACH_ORIGIN_TOKEN_FILE', { required: true, fallbackEnv: 'STAGECOACH_TOKEN_FILE' }))
    .requiredOption('--signing-key <file>', 'release private key (ed25519 PEM) that signs the manifest')
    .option('--recipient <age1…>', 'age recipient to encrypt to; repeatable', collect)
    .option('--recipients-file <file>', 'age recipients file (one per line, # comments); repeatable', collect)
    .option('--compression <c>', `${COMPRESSIONS.join('|')}`, 'zstd')
    .option('--os-id <id>', 'OS id (default: ID from the bundle’s /etc/os-release)')
    .option('--os-version <v>', 'OS version (default: VERSION_ID from the bundle’s /etc/os-release)')
    .option('--net-format <fmt>', `${NET_FORMATS.join('|')} (default: from the OS id)`)
    .option('--work-dir <dir>', 'where the packed blob is staged before upload (default: the system temp dir)')
    .option('--json', 'print the result as JSON')
    .action(action(async (path: string, flags: PublishFlags) => runPublish(path, flags)));
}

const LABELS = { compare: 'comparing with the published version', pack: 'packing', upload: 'uploading' } as const;

async function runPublish(path: string, flags: PublishFlags): Promise<void> {
  const request: PublishRequest = {
    path,
    name: flags.name,
    version: flags.version,
    role: flags.role,
    compression: flags.compression,
    osId: flags.osId,
    osVersion: flags.osVersion,
    netFormat: flags.netFormat,
    workDir: flags.workDir,
  };
  // Flags first, before the token and the key are read.
  checkPublishRequest(request);
  const token = readTokenFile(flags.tokenFile);
  const signingKey = loadSigningKey(flags.signingKey);
  const tty = Boolean(process.stderr.isTTY) && !flags.json;
  const { result: r } = await publish({
    ...request,
    origin: new OriginClient(flags.origin, { token }),
    signingKey,
    recipients: flags.recipient,
    recipientsFiles: flags.recipientsFile,
    warn: flags.json ? undefined : (m) => process.stderr.write(`warning: ${m}\n`),
    progress: (phase, total): PublishProgress => byteBar(tty, LABELS[phase], total),
  });
  if (flags.json) printJson(r);
  else {
    const b = r.blob;
    process.stdout.write(
      `${r.created ? 'published' : 'already published, nothing to do:'} ${r.name}@${r.version}\n` +
        `manifest ${r.manifestDigest}\n` +
        `blob     ${b.digest} (${b.size} bytes, ${b.compression}, ${b.encryption === 'age' ? 'age-encrypted' : 'not encrypted'})\n`,
    );
  }
}
