/**
 * `stagecoach get NAME@VERSION`: fetch a signed bundle through the nearest healthy stage
 * (falling back to the next one, then origin), verify the manifest signature and the blob
 * digest, and optionally decrypt and unpack it (overlapped with the download when the target
 * directory is empty). Success is reported only after both checks.
 */
import type { KeyObject } from 'node:crypto';
import { envOption, trustKeysOf } from '../defaults.js';
import { byteBar, showsProgress } from '../progress.js';
import { mkdtemp, readdir, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Command } from 'commander';
import { readIdentityFile } from '../../../shared/bundle/age.js';
import { unpackFile } from '../../../shared/bundle/unpack-file.js';
import { isScError, scError } from '../../../shared/errors.js';
import { type FetchProgress, fetchBlob, fetchManifest, selectSources } from '../../../shared/fetch.js';
import { fetchAndUnpack } from '../../../shared/fetch-unpack.js';
import { loadPublicKey } from '../../../shared/manifest.js';
import { parseRef } from '../../../shared/names.js';
import { action, collect, makeDir, printJson, requireParentDir, splitList } from '../util.js';

interface GetFlags {
  from?: string;
  origin?: string;
  out: string;
  trustKey: string[];
  identity?: string;
  unpack?: string;
  force?: boolean;
  probeTimeout: string;
  idleTimeout: string;
  retries: string;
  json?: boolean;
}

/** Registers `stagecoach get`. */
export function register(program: Command): void {
  program
    .command('get')
    .description('Fetch a bundle through the nearest healthy stage, verify signature and digest, optionally unpack it')
    .argument('<ref>', 'NAME@VERSION')
    .option('--from <urls>', 'stage URLs, comma-separated; probed, fastest healthy first')
    .addOption(envOption('--origin <url>', 'origin URL: manifests after every stage; blob bytes only once the stages are used up (--retries passes without progress)', 'STAGECOACH_ORIGIN'))
    .requiredOption('-o, --out <file>', 'where to write the bundle file (downloads go to FILE.partial first)')
    .option('--trust-key <pem>', 'trusted release public key (PEM file); repeatable, at least one (default: STAGECOACH_TRUST_KEY)', collect, [])
    .option('--identity <file>', 'age identity file, to decrypt for --unpack')
    .option('--unpack <dir>', 'decrypt and unpack the bundle into DIR: while it downloads when DIR is empty (into DIR/.stagecoach-unverified-*, moved up once the digest verified), after verifying otherwise')
    .option('--force', 'replace an existing output file whose content differs')
    .option('--probe-timeout <ms>', 'deadline for each /healthz probe', '2000')
    .option('--idle-timeout <ms>', 'abandon a source that sends nothing for this long', '30000')
    .option('--retries <n>', 'extra passes over the sources after a pass without progress', '3')
    .option('--json', 'print the result as JSON')
    .action(action(async (ref: string, flags: GetFlags) => runGet(ref, flags)));
}

/** True when `dir` exists and holds nothing (makeDir created it, or it was empty). */
async function isEmptyDir(dir: string): Promise<boolean> {
  makeDir(dir);
  return (await readdir(dir)).length === 0;
}

/** Removes everything in `dir` (a directory this command made). */
async function emptyDir(dir: string): Promise<void> {
  for (const name of await readdir(dir)) await rm(join(dir, name), { recursive: true, force: true });
}

/** A new directory inside the empty `dir` (same file system, even for a mount point) for the unverified tree. */
async function stagingDir(dir: string): Promise<string | null> {
  return mkdtemp(join(dir, '.stagecoach-unverified-')).catch(() => null);
}

function intFlag(name: string, v: string, min: number): number {
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < min) throw scError('SC_ERR_BAD_CONFIG', `--${name} must be an integer ≥ ${min}, got ${JSON.stringify(v)}`);
  return n;
}

async function readKeys(paths: string[]): Promise<KeyObject[]> {
  if (paths.length === 0) throw scError('SC_ERR_BAD_CONFIG', 'at least one --trust-key (or STAGECOACH_TRUST_KEY) is required');
  return Promise.all(
    paths.map(async (p) => {
      let pem: Buffer;
      try {
        pem = await readFile(p);
      } catch (err) {
        throw scError('SC_ERR_BAD_CONFIG', `cannot read --trust-key ${p}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
      }
      return loadPublicKey(pem);
    }),
  );
}

/**
 * The answer to a typo in NAME@VERSION: the ref once, the sources asked once each, and where to
 * look up what is published (`bundles` reads any stage as well as origin).
 */
function notPublished(name: string, version: string, sources: readonly string[], details?: Record<string, unknown>) {
  return scError('SC_ERR_MANIFEST_NOT_FOUND', `${name}@${version} is not published (asked ${sources.join(', ')})`, details).withHint(
    `run 'stagecoach bundles --origin ${sources.at(-1)}' to see what is published`,
  );
}

async function runGet(ref: string, flags: GetFlags): Promise<void> {
  const { name, version } = parseRef(ref);
  const stages = splitList(flags.from);
  if (stages.length === 0 && !flags.origin) throw scError('SC_ERR_BAD_CONFIG', 'give --from and/or --origin');
  const trusted = await readKeys(trustKeysOf(flags.trustKey));
  const probeTimeout = intFlag('probe-timeout', flags.probeTimeout, 1);
  const idleTimeoutMs = intFlag('idle-timeout', flags.idleTimeout, 1);
  const retries = intFlag('retries', flags.retries, 0);
  if (flags.identity && !flags.unpack) throw scError('SC_ERR_BAD_CONFIG', '--identity is only used with --unpack');
  const identities = flags.identity ? await readIdentityFile(flags.identity) : [];
  requireParentDir(flags.out, '--out');

  const { sources, stages: stageList, origin, probes } = await selectSources(stages, { origin: flags.origin, timeoutMs: probeTimeout });
  const fm = await fetchManifest(sources, name, version, trusted).catch((err: unknown) => {
    throw isScError(err, 'SC_ERR_MANIFEST_NOT_FOUND') ? notPublished(name, version, sources, err.details) : err;
  });
  const m = fm.manifest;
  if (flags.unpack && m.blob.encryption === 'age' && identities.length === 0) {
    throw scError('SC_ERR_BAD_CONFIG', `${name}@${version} is encrypted: --unpack needs --identity`);
  }

  const fetchOpts = {
    sources: stageList,
    origin,
    digest: m.blob.digest,
    size: m.blob.size,
    out: flags.out,
    overwrite: flags.force === true,
    idleTimeoutMs,
    retries,
  };
  let res: Awaited<ReturnType<typeof fetchBlob>>;
  let unpacked: { dir: string; entries: number; skipped: number; overlapped: boolean } | undefined;
  const bar = byteBar(showsProgress(flags.json), flags.unpack ? 'fetching + unpacking' : 'fetching', m.blob.size);
  const onProgress = (p: FetchProgress) => bar.update(p.bytes, p.source ?? '');
  const unpackDir = flags.unpack;
  try {
    const staging = unpackDir && (await isEmptyDir(unpackDir)) ? await stagingDir(unpackDir) : null;
    if (unpackDir && staging) {
      // Unpacked while it downloads (shared/fetch-unpack.ts) into DIR/.stagecoach-unverified-*,
      // whose entries move up into DIR only once the blob verified. A failure removes it; a run
      // killed midway leaves DIR holding only that directory, named for what it is.
      try {
        const r = await fetchAndUnpack({ ...fetchOpts, onProgress }, m.blob, { dir: staging, identities }, () => emptyDir(staging));
        for (const entry of await readdir(staging)) await rename(join(staging, entry), join(unpackDir, entry));
        res = r.fetched;
        unpacked = { dir: unpackDir, entries: r.unpacked.entries, skipped: r.unpacked.skipped, overlapped: r.overlapped };
      } finally {
        await rm(staging, { recursive: true, force: true });
      }
    } else {
      res = await fetchBlob({ ...fetchOpts, onProgress });
    }
  } finally {
    bar.stop();
  }

  if (unpackDir && !unpacked) {
    // Into a directory that already holds files: after the verified download, never before.
    const r = await unpackFile(res.path, m.blob, { dir: unpackDir, identities, verified: true });
    unpacked = { dir: unpackDir, entries: r.entries, skipped: r.skipped, overlapped: false };
  }

  const result = {
    name,
    version,
    manifestDigest: fm.manifestDigest,
    keyId: fm.keyId,
    manifestSource: fm.source,
    path: res.path,
    digest: res.digest,
    size: res.size,
    sources: res.sources,
    resumedFrom: res.resumedFrom,
    downloaded: res.downloaded,
    alreadyPresent: res.alreadyPresent,
    probes,
    ...(unpacked ? { unpacked } : {}),
  };
  if (flags.json) {
    printJson(result);
    return;
  }
  const lines = [
    `fetched ${name}@${version} (manifest signed by ${fm.keyId}, from ${fm.source})`,
    `  file    ${res.path}`,
    `  digest  ${res.digest} (verified)`,
    `  size    ${res.size} bytes`,
    `  from    ${res.alreadyPresent ? '(already present)' : res.sources.join(', ') || '(resumed file)'}`,
  ];
  if (res.resumedFrom > 0) lines.push(`  resumed ${res.resumedFrom} bytes from ${res.path}.partial`);
  if (unpacked) lines.push(`  unpacked ${unpacked.entries} entries into ${unpacked.dir}`);
  process.stdout.write(`${lines.join('\n')}\n`);
}
