/**
 * Publishing a bundle to the origin, written once: `stagecoach publish` parses its flags and
 * prints; the sim fleet (services/demo/fleet.ts) calls the same functions with plain values.
 * Pack a root filesystem (directory or tarball) into a bundle blob (tar → compression → age),
 * upload it, then sign and upload its manifest.
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
 * format: equal → nothing to do; different → SC_ERR_VERSION_EXISTS.
 *
 * Before any of that, the origin is asked which release keys it trusts (`GET /v1/trusted-keys`):
 * a signing key it would refuse ends the publish with SC_ERR_UNTRUSTED_KEY before a byte is
 * packed or uploaded. A version the origin removed is refused too (SC_ERR_VERSION_EXISTS).
 */
import type { KeyObject } from 'node:crypto';
import { createHash } from 'node:crypto';
import { createWriteStream, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { type Readable, Transform, type TransformCallback, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import * as tar from 'tar';
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
} from '../../shared/bundle/index.js';
import { type Digest, HashingStream, sha256Of } from '../../shared/digest.js';
import { isScError, scError } from '../../shared/errors.js';
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
} from '../../shared/manifest.js';
import { parseName, parseVersion } from '../../shared/names.js';
import type { ManifestRecord, OriginClient } from './client.js';

/** What `stagecoach publish --json` prints. */
export interface PublishResult {
  name: string;
  version: string;
  manifestDigest: Digest;
  blob: Manifest['blob'];
  created: boolean;
}

/** What to publish, as plain values (checked by checkPublishRequest). */
export interface PublishRequest {
  /** The root filesystem: a directory, or a tarball (.tar, .tar.gz, .tar.zst). */
  path: string;
  name: string;
  version: string;
  /** `base` (the rescue OS B) or `target` (the OS C). */
  role: string;
  /** One of COMPRESSIONS (default zstd). */
  compression?: string;
  /** OS facts; the bundle's own /etc/os-release fills in what is not given. */
  osId?: string;
  osVersion?: string;
  /** One of NET_FORMATS (default: from the OS id). */
  netFormat?: string;
  /** Default: `windows` for the OS id windows, else `linux`. */
  osFamily?: 'linux' | 'windows';
  /** Where the packed blob is staged before upload (default: the system temp dir). */
  workDir?: string;
}

/** A progress display for one long phase: bytes so far, then stop. */
export interface PublishProgress {
  update(bytes: number): void;
  stop(): void;
}

/** What publish needs besides the request. */
export interface PublishOptions extends PublishRequest {
  origin: OriginClient;
  /** The release private key that signs the manifest. */
  signingKey: KeyObject;
  /** age recipients (`age1…`) to encrypt to; none at all (here and in files) = unencrypted. */
  recipients?: string[];
  /** age recipients files (one per line, # comments). */
  recipientsFiles?: string[];
  /** Called with a warning a person should see (an unencrypted bundle). */
  warn?: (message: string) => void;
  /** Opens a progress display for a phase (`total` in bytes when known). */
  progress?: (phase: 'compare' | 'pack' | 'upload', total?: number) => PublishProgress;
}

/** The checked request. */
export interface CheckedRequest {
  name: string;
  version: string;
  role: 'base' | 'target';
  compression: Compression;
  input: { dir?: string; tarball?: string };
}

/** What publish did: the result `publish --json` prints, and the manifest now on the origin. */
export interface PublishOutcome {
  result: PublishResult;
  manifest: Manifest;
}

/**
 * Checks names, role, compression and net format, and that `path` is a directory or a file,
 * before anything is read or sent. Throws SC_ERR_BAD_NAME, SC_ERR_BAD_VERSION, SC_ERR_BAD_REQUEST.
 */
export function checkPublishRequest(r: PublishRequest): CheckedRequest {
  const name = parseName(r.name);
  const version = parseVersion(r.version);
  if (r.role !== 'base' && r.role !== 'target') throw scError('SC_ERR_BAD_REQUEST', `--role must be base or target, got ${JSON.stringify(r.role)}`);
  const role = r.role;
  const compression = r.compression ?? 'zstd';
  if (!(COMPRESSIONS as readonly string[]).includes(compression)) {
    throw scError('SC_ERR_BAD_REQUEST', `--compression must be one of ${COMPRESSIONS.join(', ')}`);
  }
  if (r.netFormat !== undefined && !(NET_FORMATS as readonly string[]).includes(r.netFormat)) {
    throw scError('SC_ERR_BAD_REQUEST', `--net-format must be one of ${NET_FORMATS.join(', ')}`);
  }
  return { name, version, role, compression: compression as Compression, input: bundleInput(r.path) };
}

/** The manifest fields that are not the blob's, validated, unsigned (signatures: []). */
export function draftManifest(m: Pick<Manifest, 'name' | 'version' | 'role' | 'os'>, blob: Manifest['blob']): Manifest {
  return parseManifest({ schema: 1, name: m.name, version: m.version, role: m.role, os: m.os, blob, publishedAt: new Date().toISOString(), signatures: [] });
}

/**
 * Packs `input` (tar → compression → age to `recipients`, none = unencrypted) into the file
 * `out` while hashing it; `onBytes` sees the packed bytes written so far. Returns the blob's
 * manifest entry and the content fingerprint (see the top of this file).
 */
export async function packBlob(
  input: { dir?: string; tarball?: string },
  o: { compression: Compression; recipients: string[] },
  out: string,
  onBytes?: (n: number) => void,
): Promise<{ blob: Manifest['blob']; fingerprint: Digest }> {
  const encryption = o.recipients.length > 0 ? 'age' : 'none';
  const plain = new TreeDigest();
  const packed = new HashingStream();
  let unpackedSize = 0;
  const plainBytes = byteCounter((n) => {
    unpackedSize = n;
  });
  const stages: (Readable | Transform | Writable)[] = [packBundle(input, { compression: 'none', recipients: [] }), plain, plainBytes, compressStream(o.compression)];
  if (encryption === 'age') stages.push(encryptStream(o.recipients));
  stages.push(packed);
  if (onBytes) stages.push(byteCounter(onBytes));
  stages.push(createWriteStream(out, { highWaterMark: 1 << 20 }));
  await pipeline(stages as [Readable, ...Transform[], Writable]);
  const blob: Manifest['blob'] = { digest: packed.digest(), size: packed.bytes, compression: o.compression, encryption, unpackedSize };
  return { blob, fingerprint: fingerprintOf(plain.digest(), o.compression, encryption, o.recipients) };
}

const quiet: PublishProgress = { update: () => {}, stop: () => {} };

/**
 * Publishes `o.path` as name@version (see the top of this file). Resolves with `created: false`
 * when the same content is published already. Throws SC_ERR_UNTRUSTED_KEY before reading the
 * tree when the origin would refuse the signing key, SC_ERR_VERSION_EXISTS when the version
 * exists with other content or was removed, and what checkPublishRequest throws.
 */
export async function publish(o: PublishOptions): Promise<PublishOutcome> {
  const { name, version, role, compression, input } = checkPublishRequest(o);
  const client = o.origin;
  const progress = (phase: 'compare' | 'pack' | 'upload', total?: number) => o.progress?.(phase, total) ?? quiet;
  // Refused before reading the tree or uploading a byte when the origin would refuse the
  // signature (the origin still verifies the signed manifest itself).
  await client.checkSigningKey(keyId(o.signingKey));
  const recipients = await loadRecipients(o.recipients ?? [], o.recipientsFiles ?? []);
  const encryption = recipients.length > 0 ? 'age' : 'none';
  if (encryption === 'none') o.warn?.('no --recipient given: the bundle is published unencrypted');

  // OS facts: given values first, then the bundle's own os-release.
  const osr = o.osId && o.osVersion ? {} : await readOsRelease(input);
  const osId = (o.osId ?? osr.ID ?? '').toLowerCase();
  const osVersion = o.osVersion ?? osr.VERSION_ID ?? osr.BUILD_ID ?? '';
  if (!osId) throw scError('SC_ERR_BAD_REQUEST', 'the bundle has no os-release ID: pass --os-id');
  if (!osVersion) throw scError('SC_ERR_BAD_REQUEST', 'the bundle has no os-release VERSION_ID: pass --os-version');
  const os = {
    id: osId,
    version: osVersion,
    family: o.osFamily ?? (osId === 'windows' ? ('windows' as const) : ('linux' as const)),
    netFormat: (o.netFormat as NetFormat | undefined) ?? defaultNetFormat(osId),
  };
  // Validate everything but the blob now, before the expensive part.
  const draft = (blob: Manifest['blob']): Manifest => draftManifest({ name, version, role, os }, blob);
  draft({ digest: sha256Of(''), size: 0, compression, encryption });

  const noop = (rec: ManifestRecord): PublishOutcome => ({
    result: { name, version, manifestDigest: rec.manifestDigest, blob: rec.manifest.blob, created: false },
    manifest: rec.manifest,
  });
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
    const bar = progress('compare');
    try {
      await pipeline(packBundle(input, { compression: 'none', recipients: [] }), plain, byteCounter(bar.update), sink());
    } finally {
      bar.stop();
    }
    const why = difference(existing, { role, os, blob: { compression, encryption } }, fingerprintOf(plain.digest(), compression, encryption, recipients));
    if (why) throw conflict(why);
    return noop(existing);
  }

  const work = mkdtempSync(join(o.workDir ?? tmpdir(), 'stagecoach-publish-'));
  try {
    const blobFile = join(work, 'bundle.blob');
    const bar = progress('pack');
    let packed: Awaited<ReturnType<typeof packBlob>>;
    try {
      packed = await packBlob(input, { compression, recipients }, blobFile, bar.update);
    } finally {
      bar.stop();
    }
    const { blob, fingerprint } = packed;

    const up = progress('upload', blob.size);
    try {
      await client.putBlob(blobFile, blob.digest, blob.size, { onProgress: (sent) => up.update(sent) });
    } finally {
      up.stop();
    }
    const manifest = signManifest(draft(blob), o.signingKey);
    try {
      const r = await client.putManifest(manifest, { fingerprint });
      return { result: { name, version, manifestDigest: r.manifestDigest, blob, created: r.created }, manifest };
    } catch (err) {
      // Another publisher won the race for this version: fine if it was the same content.
      if (!isScError(err, 'SC_ERR_VERSION_EXISTS')) throw err;
      const now = await client.findManifest(name, version);
      const why = now ? difference(now, { role, os, blob: { compression, encryption } }, fingerprint) : 'it changed while publishing';
      if (why || !now) throw conflict(why ?? 'it changed while publishing');
      return noop(now);
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
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

async function loadRecipients(given: string[], files: string[]): Promise<string[]> {
  const out = new Set<string>();
  for (const r of given) out.add(parseRecipient(r).text);
  for (const f of files) for (const r of await readRecipientsFile(f)) out.add(r);
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
