/**
 * `stagecoach publish PATH`: pack a root filesystem (directory or tarball) into a bundle blob
 * (tar → compression → age), upload it, then sign and upload its manifest.
 *
 * Streaming: the blob goes to a temp file while it is hashed (its digest is needed before the
 * PUT), never into memory.
 *
 * Idempotency. age encryption is randomised, so packing the same tree twice gives two different
 * blobs. A re-publish is recognised by a content fingerprint that is stable across encryptions:
 * `sha256(canonical JSON {v: 1, tree, compression, encryption, recipients})`, where `tree` is
 * the TreeDigest of the plaintext tar (below) and `recipients` the sorted recipient list. The
 * plaintext tar bytes themselves are not stable: node-tar records each file's atime (and
 * ctime) in its headers, and reading the tree to pack it changes atimes. The manifest is a
 * signed contract with a strict schema, so the fingerprint is not in it: the origin keeps it as
 * metadata beside the manifest (header `Stagecoach-Content-Fingerprint` on the manifest PUT
 * and GET). When name@version exists, only the plaintext tar is read and digested (no
 * compression, no encryption, no upload) and compared, with the manifest's role, os and blob
 * format: equal → nothing to do (exit 0); different → SC_ERR_VERSION_EXISTS (exit 1).
 *
 * Before any of that, the origin is asked which release keys it trusts (`GET /v1/trusted-keys`):
 * a signing key it would refuse ends the command with SC_ERR_UNTRUSTED_KEY before a byte is
 * packed or uploaded. A version the origin removed is refused too (SC_ERR_VERSION_EXISTS).
 */
import { envOption } from '../defaults.js';
import { createWriteStream, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createHash } from 'node:crypto';
import { type Readable, Transform, type TransformCallback, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import cliProgress from 'cli-progress';
import type { Command } from 'commander';
import * as tar from 'tar';
import { type Digest, HashingStream, sha256Of } from '../../../shared/digest.js';
import { isScError, scError } from '../../../shared/errors.js';
import {
  COMPRESSIONS,
  type Compression,
  canonicalJson,
  keyId,
  type Manifest,
  NET_FORMATS,
  type NetFormat,
  parseManifest,
  signManifest,
} from '../../../shared/manifest.js';
import { parseName, parseVersion } from '../../../shared/names.js';
import {
  compressStream,
  createTarExtract,
  defaultNetFormat,
  encryptStream,
  packBundle,
  parseRecipient,
  readOsRelease,
  readRecipientsFile,
  XATTR_KEY,
} from '../../../shared/bundle/index.js';
import { type ManifestRecord, OriginClient } from '../../origin/client.js';
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

/** What `publish --json` prints. */
export interface PublishResult {
  name: string;
  version: string;
  manifestDigest: Digest;
  blob: Manifest['blob'];
  created: boolean;
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

/** A progress bar on stderr when it is a terminal (and not --json); no-ops otherwise. */
function progressBar(enabled: boolean, label: string, total?: number): { update(n: number): void; stop(): void } {
  if (!enabled) return { update: () => {}, stop: () => {} };
  const mib = (n: number) => (n / 1048576).toFixed(1);
  const bar = new cliProgress.SingleBar({
    stream: process.stderr,
    hideCursor: true,
    format: total === undefined ? `${label} {done} MiB` : `${label} |{bar}| {percentage}% {done}/{all} MiB`,
  });
  bar.start(total ?? 1, 0, { done: '0.0', all: mib(total ?? 0) });
  return {
    update: (n) => bar.update(total === undefined ? 0 : n, { done: mib(n) }),
    stop: () => bar.stop(),
  };
}

/** Counts bytes passing through without copying them. */
function byteCounter(onBytes: (n: number) => void): Transform {
  let n = 0;
  return new Transform({
    highWaterMark: 1 << 20,
    transform(chunk: Buffer, _enc, cb) {
      n += chunk.length;
      onBytes(n);
      cb(null, chunk);
    },
  });
}

function sink(): Writable {
  return new Writable({
    highWaterMark: 1 << 20,
    write(_c, _e, cb) {
      cb();
    },
  });
}

/**
 * A pass-through that digests a plaintext tar by its meaning, not its bytes: for every entry
 * (in archive order) its normalised path, type, mode, owner, mtime, link target, device
 * numbers and size, then its content. atime, ctime and header encoding do not count.
 * Extended attributes (pax SCHILY.xattr records) count too: when any entry has some, the
 * digest is that of the above and of every (entry index, path, attributes); a tree without
 * attributes digests as it did before attributes were carried, so its fingerprint is stable.
 */
export class TreeDigest extends Transform {
  readonly #hash = createHash('sha256');
  readonly #parser: tar.Parser;
  /** A second parser for the attributes only: node-tar drops pax keys it does not know. */
  readonly #xattrs = createTarExtract();
  readonly #xhash = createHash('sha256');
  #xentries = 0;
  #done: Promise<unknown>;
  #digest?: Digest;

  constructor() {
    super({ highWaterMark: 1 << 20 });
    this.#parser = new tar.Parser({
      strict: true,
      zstd: false,
      brotli: false,
      onReadEntry: (e) => {
        const path = String(e.path).replace(/^(\.\/)+/, '').replace(/\/+$/, '');
        const head = canonicalJson({
          path,
          type: e.type,
          mode: e.mode ?? null,
          uid: e.uid ?? null,
          gid: e.gid ?? null,
          uname: e.uname ?? '',
          gname: e.gname ?? '',
          mtime: e.mtime ? e.mtime.getTime() : null,
          linkpath: e.linkpath ?? '',
          dev: [e.header.devmaj ?? 0, e.header.devmin ?? 0],
          size: e.size,
        });
        this.#hash.update(`${Buffer.byteLength(head)}:${head}`);
        e.on('data', (c: Buffer) => this.#hash.update(c));
      },
    });
    const parsed = new Promise<void>((resolve, reject) => {
      this.#parser.on('end', () => resolve());
      this.#parser.on('error', reject);
    });
    const attrs = (async () => {
      let index = 0;
      for await (const entry of this.#xattrs) {
        const pax = entry.header.pax;
        const keys = pax ? Object.keys(pax).filter((k) => k.startsWith(XATTR_KEY)).sort() : [];
        if (pax && keys.length) {
          this.#xentries++;
          const xattrs = Object.fromEntries(keys.map((k) => [k.slice(XATTR_KEY.length), Buffer.from(pax[k]).toString('base64')]));
          const path = String(entry.header.name).replace(/^(\.\/)+/, '').replace(/\/+$/, '');
          const head = canonicalJson({ index, path, xattrs });
          this.#xhash.update(`${Buffer.byteLength(head)}:${head}`);
        }
        index++;
        for await (const _ of entry) {
          /* content is digested by the other parser */
        }
      }
    })();
    this.#done = Promise.all([parsed, attrs]);
    this.#done.catch(() => {});
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    const waits: Promise<void>[] = [];
    if (!this.#parser.write(chunk)) waits.push(new Promise((res) => this.#parser.once('drain', () => res())));
    if (!this.#xattrs.write(chunk)) {
      waits.push(
        new Promise((res) => {
          const done = () => {
            this.#xattrs.off('drain', done);
            this.#xattrs.off('close', done);
            res();
          };
          this.#xattrs.once('drain', done);
          this.#xattrs.once('close', done);
        }),
      );
    }
    if (waits.length === 0) cb(null, chunk);
    else Promise.all(waits).then(() => cb(null, chunk));
  }

  override _flush(cb: TransformCallback): void {
    this.#parser.end();
    this.#xattrs.end(undefined);
    this.#done.then(
      () => {
        const tree = this.#hash.digest('hex');
        this.#digest = this.#xentries === 0 ? `sha256:${tree}` : sha256Of(`${tree}\nxattrs:${this.#xhash.digest('hex')}`);
        cb();
      },
      (err) => cb(scError('SC_ERR_BAD_ARCHIVE', `the tree to publish is not a readable tar: ${(err as Error).message}`)),
    );
  }

  /** The tree digest; valid once the stream has ended. */
  digest(): Digest {
    if (!this.#digest) throw scError('SC_ERR_INTERNAL', 'TreeDigest.digest() before the stream ended');
    return this.#digest;
  }
}

function fingerprintOf(plaintext: Digest, compression: Compression, encryption: 'age' | 'none', recipients: string[]): Digest {
  return sha256Of(canonicalJson({ v: 1, tree: plaintext, compression, encryption, recipients: [...recipients].sort() }));
}

async function loadRecipients(flags: PublishFlags): Promise<string[]> {
  const out = new Set<string>();
  for (const r of flags.recipient ?? []) out.add(parseRecipient(r).text);
  for (const f of flags.recipientsFile ?? []) for (const r of await readRecipientsFile(f)) out.add(r);
  return [...out];
}

function bundleInput(path: string): { dir?: string; tarball?: string } {
  let st: ReturnType<typeof statSync>;
  try {
    st = statSync(path);
  } catch (err) {
    throw scError('SC_ERR_BAD_REQUEST', `cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  if (st.isDirectory()) return { dir: resolve(path) };
  if (st.isFile()) return { tarball: resolve(path) };
  throw scError('SC_ERR_BAD_REQUEST', `${path} is neither a directory nor a tarball file`);
}

/** Explains why an existing manifest does not match what this publish would produce, or null. */
function difference(existing: ManifestRecord, want: Pick<Manifest, 'role' | 'os'> & { blob: Pick<Manifest['blob'], 'compression' | 'encryption'> }, fingerprint: Digest): string | null {
  const m = existing.manifest;
  if (m.role !== want.role) return `its role is ${m.role}, not ${want.role}`;
  if (canonicalJson(m.os) !== canonicalJson(want.os)) return `its os is ${canonicalJson(m.os)}, not ${canonicalJson(want.os)}`;
  if (m.blob.compression !== want.blob.compression) return `its compression is ${m.blob.compression}, not ${want.blob.compression}`;
  if (m.blob.encryption !== want.blob.encryption) return `its encryption is ${m.blob.encryption}, not ${want.blob.encryption}`;
  if (!existing.fingerprint) return 'it was published without a content fingerprint, so identical content cannot be proven';
  if (existing.fingerprint !== fingerprint) return 'its content (the tree or the recipients) differs';
  return null;
}

async function runPublish(path: string, flags: PublishFlags): Promise<void> {
  const name = parseName(flags.name);
  const version = parseVersion(flags.version);
  if (flags.role !== 'base' && flags.role !== 'target') throw scError('SC_ERR_BAD_REQUEST', `--role must be base or target, got ${JSON.stringify(flags.role)}`);
  const role = flags.role;
  if (!(COMPRESSIONS as readonly string[]).includes(flags.compression)) {
    throw scError('SC_ERR_BAD_REQUEST', `--compression must be one of ${COMPRESSIONS.join(', ')}`);
  }
  const compression = flags.compression as Compression;
  if (flags.netFormat !== undefined && !(NET_FORMATS as readonly string[]).includes(flags.netFormat)) {
    throw scError('SC_ERR_BAD_REQUEST', `--net-format must be one of ${NET_FORMATS.join(', ')}`);
  }
  const input = bundleInput(path);
  const token = readTokenFile(flags.tokenFile);
  const key = loadSigningKey(flags.signingKey);
  const client = new OriginClient(flags.origin, { token });
  // Refused before reading the tree or uploading a byte when the origin would refuse the
  // signature (the origin still verifies the signed manifest itself).
  await client.checkSigningKey(keyId(key));
  const recipients = await loadRecipients(flags);
  const encryption = recipients.length > 0 ? 'age' : 'none';
  const tty = Boolean(process.stderr.isTTY) && !flags.json;
  if (encryption === 'none' && !flags.json) process.stderr.write('warning: no --recipient given: the bundle is published unencrypted\n');

  // OS facts: flags first, then the bundle's own os-release.
  const osr = flags.osId && flags.osVersion ? {} : await readOsRelease(input);
  const osId = (flags.osId ?? osr.ID ?? '').toLowerCase();
  const osVersion = flags.osVersion ?? osr.VERSION_ID ?? osr.BUILD_ID ?? '';
  if (!osId) throw scError('SC_ERR_BAD_REQUEST', 'the bundle has no os-release ID: pass --os-id');
  if (!osVersion) throw scError('SC_ERR_BAD_REQUEST', 'the bundle has no os-release VERSION_ID: pass --os-version');
  const os = {
    id: osId,
    version: osVersion,
    family: osId === 'windows' ? ('windows' as const) : ('linux' as const),
    netFormat: (flags.netFormat as NetFormat | undefined) ?? defaultNetFormat(osId),
  };
  // Validate everything but the blob now, before the expensive part.
  const draft = (blob: Manifest['blob']): Manifest =>
    parseManifest({ schema: 1, name, version, role, os, blob, publishedAt: new Date().toISOString(), signatures: [] });
  draft({ digest: sha256Of(''), size: 0, compression, encryption });

  const report = (r: PublishResult) => {
    if (flags.json) printJson(r);
    else {
      const b = r.blob;
      process.stdout.write(
        `${r.created ? 'published' : 'already published, nothing to do:'} ${r.name}@${r.version}\n` +
          `manifest ${r.manifestDigest}\n` +
          `blob     ${b.digest} (${b.size} bytes, ${b.compression}, ${b.encryption === 'age' ? 'age-encrypted' : 'not encrypted'})\n`,
      );
    }
  };
  const noop = (rec: ManifestRecord): PublishResult => ({ name, version, manifestDigest: rec.manifestDigest, blob: rec.manifest.blob, created: false });
  const conflict = (why: string) =>
    scError('SC_ERR_VERSION_EXISTS', `${name}@${version} is already published and ${why}; versions are immutable: publish a new version`, {
      name,
      version,
    });

  const existing = await client.lookupManifest(name, version);
  if (existing === 'removed') {
    throw scError('SC_ERR_VERSION_EXISTS', `${name}@${version} was removed from the origin; a removed version is never reused`, { name, version }).withHint(
      'publish it under a new version',
    );
  }
  if (existing) {
    // Hash the plaintext tar only: enough to decide, and no upload either way.
    const plain = new TreeDigest();
    const bar = progressBar(tty, 'comparing with the published version');
    try {
      await pipeline(packBundle(input, { compression: 'none', recipients: [] }), plain, byteCounter(bar.update), sink());
    } finally {
      bar.stop();
    }
    const why = difference(existing, { role, os, blob: { compression, encryption } }, fingerprintOf(plain.digest(), compression, encryption, recipients));
    if (why) throw conflict(why);
    report(noop(existing));
    return;
  }

  const work = mkdtempSync(join(flags.workDir ?? tmpdir(), 'stagecoach-publish-'));
  try {
    const blobFile = join(work, 'bundle.blob');
    const plain = new TreeDigest();
    const packed = new HashingStream();
    let unpackedSize = 0;
    const plainBytes = byteCounter((n) => {
      unpackedSize = n;
    });
    const stages: (Readable | Transform | Writable)[] = [packBundle(input, { compression: 'none', recipients: [] }), plain, plainBytes, compressStream(compression)];
    if (encryption === 'age') stages.push(encryptStream(recipients));
    const bar = progressBar(tty, 'packing');
    stages.push(packed, byteCounter(bar.update), createWriteStream(blobFile, { highWaterMark: 1 << 20 }));
    try {
      await pipeline(stages as [Readable, ...Transform[], Writable]);
    } finally {
      bar.stop();
    }
    const blob: Manifest['blob'] = { digest: packed.digest(), size: packed.bytes, compression, encryption, unpackedSize };
    const fingerprint = fingerprintOf(plain.digest(), compression, encryption, recipients);

    const up = progressBar(tty, 'uploading', blob.size);
    try {
      await client.putBlob(blobFile, blob.digest, blob.size, { onProgress: (sent) => up.update(sent) });
    } finally {
      up.stop();
    }
    const manifest = signManifest(draft(blob), key);
    try {
      const r = await client.putManifest(manifest, { fingerprint });
      report({ name, version, manifestDigest: r.manifestDigest, blob, created: r.created });
    } catch (err) {
      // Another publisher won the race for this version: fine if it was the same content.
      if (!isScError(err, 'SC_ERR_VERSION_EXISTS')) throw err;
      const now = await client.findManifest(name, version);
      const why = now ? difference(now, { role, os, blob: { compression, encryption } }, fingerprint) : 'it changed while publishing';
      if (why || !now) throw conflict(why ?? 'it changed while publishing');
      report(noop(now));
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}
