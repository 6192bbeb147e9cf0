/**
 * Bundles and agent state on the host's own disks.
 *
 * A bundle directory holds, per bundle:
 * - `<hex>.bundle`: the packed blob (age(compress(tar))) exactly as published, named by its
 *   sha256; a download or copy in progress is `<hex>.bundle.partial`;
 * - `<name>@<version>.manifest.json`: its signed manifest, written last, so its presence means
 *   "this bundle is complete here". It is verified again on every read.
 *
 * Two bundle directories exist:
 * - the running OS's state dir, `<root of the running device>/var/lib/stagecoach/bundles`: step 1
 *   (`fetch`) lands there, because disk 2 is not partitioned yet;
 * - the kept store on disk2p2, `<disk2p2>/stagecoach/bundles`: `install-base` copies B and C
 *   there, `fetch-other` downloads D there. It survives wiping disk 1, so rescue and reinstall
 *   work from B without the network.
 *
 * Agent state kept on disk2p2 next to the bundles (`<disk2p2>/stagecoach/`):
 * - `carry.json`: the carried configuration captured from OS A (capture-config);
 * - `kept.json`: `{base, target}` refs of the kept bundles (reinstall uses `target`);
 * - `installed.json`: device → manifest digest of the bundle completely installed there;
 * - `boot.json`: the boot attempt in flight (which job asked to boot which device, at which
 *   boot identity), so that a step run again after the reboot can tell "the boot failed and the
 *   firmware fell back" from "the agent died before rebooting";
 * - `journal.json`: the host's journal of step jobs (journal.ts), also kept in the running OS's
 *   state dir, `<root of the running device>/var/lib/stagecoach/journal.json` (journalPaths).
 * Every file is written atomically and durably (shared/fs-atomic.ts: temp file, fsync, rename,
 * fsync of the directory).
 */
import { createReadStream } from 'node:fs';
import { mkdir, open, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Transform, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { KeyObject } from 'node:crypto';
import type { WriteMark } from '../../shared/bundle/unpack-file.js';
import { type Digest, digestHex, HashingStream } from '../../shared/digest.js';
import { scError } from '../../shared/errors.js';
import { commitFile, fsyncPath, writeFileAtomic } from '../../shared/fs-atomic.js';
import { type Manifest, manifestDigest, parseManifest, verifyManifest } from '../../shared/manifest.js';
import { parseName, parseVersion } from '../../shared/names.js';
import { type BundleRef, refString } from '../../shared/protocol/index.js';
import type { MachineDriver } from './machine/driver.js';

/** Where the kept store and agent state live on disk2p2. */
export const KEPT_DEVICE = 'disk2p2';
/** The rescue / base OS partition. */
export const BASE_DEVICE = 'disk2p1';
/** The target OS partition. */
export const TARGET_DEVICE = 'disk1p1';

/** Validates `{name, version}` from job args; throws SC_ERR_BAD_NAME / SC_ERR_BAD_VERSION / SC_ERR_BAD_REQUEST. */
export function parseBundleRef(v: unknown, what: string): BundleRef {
  const r = v as Partial<BundleRef> | null;
  if (!r || typeof r !== 'object') throw scError('SC_ERR_BAD_REQUEST', `job argument ${what} must be {name, version}`);
  return { name: parseName(r.name), version: parseVersion(r.version) };
}


/** Reads a JSON file; null when it does not exist or does not parse (a torn write is no write). */
export async function readJson<T>(path: string): Promise<T | null> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw scError('SC_ERR_INTERNAL', `cannot read ${path}: ${(err as Error).message}`);
  }
  try {
    return JSON.parse(text) as T;
  } catch {
    return null;
  }
}

/** A directory of bundles (see the layout above). */
export class BundleDir {
  constructor(readonly dir: string) {}

  /** Path of a bundle's manifest. */
  manifestPath(ref: BundleRef): string {
    return join(this.dir, `${parseName(ref.name)}@${parseVersion(ref.version)}.manifest.json`);
  }

  /** Path of a blob. */
  blobPath(digest: Digest): string {
    return join(this.dir, `${digestHex(digest)}.bundle`);
  }

  /**
   * The bundle's manifest when the bundle is complete here: the manifest parses, verifies
   * against `trusted`, and its blob file has the declared size. Null otherwise. Throws
   * SC_ERR_BAD_SIGNATURE / SC_ERR_UNTRUSTED_KEY for a stored manifest that no longer verifies.
   */
  async find(ref: BundleRef, trusted: KeyObject[]): Promise<Manifest | null> {
    const raw = await readJson<unknown>(this.manifestPath(ref));
    if (raw === null) return null;
    const m = parseManifest(raw);
    if (m.name !== ref.name || m.version !== ref.version) return null;
    verifyManifest(m, trusted);
    const st = await stat(this.blobPath(m.blob.digest)).catch(() => null);
    if (!st?.isFile() || st.size !== m.blob.size) return null;
    return m;
  }

  /** Writes a manifest (last, after its blob is in place). */
  async saveManifest(m: Manifest): Promise<void> {
    await writeFileAtomic(this.manifestPath(m), `${JSON.stringify(m, null, 2)}\n`, { mkdirs: true });
  }

  /**
   * Copies bundle `m` from `src` into this directory: streamed, sha256-checked against the
   * manifest (SC_ERR_DIGEST_MISMATCH: nothing is left behind), fsynced, renamed, and then the
   * manifest. Skips what is already complete. `onBytes` gets the running byte count; `mark`
   * (with `onStart`, called once the partial file exists) follows the bytes written to
   * `blobPath + '.partial'`, for a reader that unpacks the copy while it is made.
   */
  async copyFrom(
    src: BundleDir,
    m: Manifest,
    trusted: KeyObject[],
    opts: { onBytes?: (n: number) => void; signal?: AbortSignal; mark?: WriteMark; onStart?: (partial: string) => void } = {},
  ): Promise<{ copied: boolean }> {
    if (await this.find(m, trusted)) return { copied: false };
    await mkdir(this.dir, { recursive: true });
    const out = this.blobPath(m.blob.digest);
    const st = await stat(out).catch(() => null);
    if (!st || st.size !== m.blob.size) {
      const partial = `${out}.partial`;
      const hash = new HashingStream();
      const fh = await open(partial, 'w', 0o600);
      opts.onStart?.(partial);
      let at = 0;
      const sink = new Writable({
        write(chunk: Buffer, _enc, cb) {
          fh.write(chunk, 0, chunk.length, at).then(({ bytesWritten }) => {
            at += bytesWritten;
            opts.mark?.raise(at);
            cb(bytesWritten === chunk.length ? null : new Error(`short write to ${partial}`));
          }, cb);
        },
      });
      try {
        await pipeline(createReadStream(src.blobPath(m.blob.digest), { highWaterMark: 1 << 20 }), hash, byteMeter(opts.onBytes), sink, { signal: opts.signal });
      } finally {
        await fh.close();
      }
      if (hash.digest() !== m.blob.digest || hash.bytes !== m.blob.size) {
        await rm(partial, { force: true });
        // A local file that fails its digest does not get better on a retry: permanent.
        throw scError('SC_ERR_DIGEST_MISMATCH', `copy of ${refString(m)} does not match its digest`, { expected: m.blob.digest, actual: hash.digest(), permanent: true });
      }
      await commitFile(partial, out);
    }
    await this.saveManifest(m);
    return { copied: true };
  }
}

/** A pass-through that reports the running byte count to `onBytes`. */
export function byteMeter(onBytes?: (n: number) => void): Transform {
  let n = 0;
  return new Transform({
    transform(chunk: Buffer, _enc, cb) {
      n += chunk.length;
      onBytes?.(n);
      cb(null, chunk);
    },
  });
}

/** The running OS's state directory (holds step 1's bundles). */
export async function stateBundles(driver: MachineDriver): Promise<BundleDir> {
  const running = await driver.running();
  return new BundleDir(join(await driver.mountPath(running.device), 'var/lib/stagecoach/bundles'));
}

/**
 * The directories that hold a copy of the journal (journal.ts), as they exist now: the running
 * OS's state dir `<root of the running device>/var/lib/stagecoach` (absent while no OS runs),
 * then the kept store's directory on disk2p2 (absent until disk2p2 has a filesystem).
 */
export async function journalPaths(driver: MachineDriver): Promise<string[]> {
  const out: string[] = [];
  const running = await driver.running().catch(() => null);
  const root = running ? await driver.mountPath(running.device).catch(() => null) : null;
  if (root) out.push(join(root, 'var/lib/stagecoach'));
  const kept = await KeptStore.tryOpen(driver);
  if (kept) out.push(kept.dir);
  return out;
}

/** The agent's persistent state on disk2p2 (see the layout above). */
export class KeptStore {
  readonly bundles: BundleDir;

  constructor(readonly dir: string) {
    this.bundles = new BundleDir(join(dir, 'bundles'));
  }

  /** Opens the kept store; SC_ERR_CONFLICT / SC_ERR_NO_DEVICE from the driver when disk2p2 has no filesystem yet. */
  static async open(driver: MachineDriver): Promise<KeptStore> {
    return new KeptStore(join(await driver.mountPath(KEPT_DEVICE), 'stagecoach'));
  }

  /** The kept store, or null while disk 2 is not laid out (no partition or no filesystem). */
  static async tryOpen(driver: MachineDriver): Promise<KeptStore | null> {
    try {
      return await KeptStore.open(driver);
    } catch {
      return null;
    }
  }

  /** The raw carry.json (null when absent or torn); callers validate it. */
  async readCarry(): Promise<unknown | null> {
    return readJson<unknown>(join(this.dir, 'carry.json'));
  }

  /** Writes carry.json atomically, mode 0600 (it holds private host keys). */
  async writeCarry(cfg: unknown): Promise<void> {
    await writeFileAtomic(join(this.dir, 'carry.json'), `${JSON.stringify(cfg, null, 2)}\n`, { mode: 0o600, mkdirs: true });
  }

  /** The kept bundle refs (`{}` when none). */
  async readKept(): Promise<{ base?: BundleRef; target?: BundleRef }> {
    return (await readJson<{ base?: BundleRef; target?: BundleRef }>(join(this.dir, 'kept.json'))) ?? {};
  }

  /** Records the kept bundle refs. */
  async writeKept(k: { base?: BundleRef; target?: BundleRef }): Promise<void> {
    await writeFileAtomic(join(this.dir, 'kept.json'), `${JSON.stringify(k, null, 2)}\n`, { mkdirs: true });
  }

  /** Manifest digest of the bundle completely installed on `device`, if recorded. */
  async installed(device: string): Promise<string | null> {
    const rec = (await readJson<Record<string, string>>(join(this.dir, 'installed.json'))) ?? {};
    return typeof rec[device] === 'string' ? rec[device] : null;
  }

  /** Records (or, with null, forgets) the bundle installed on `device`. */
  async setInstalled(device: string, m: Manifest | null): Promise<void> {
    const rec = (await readJson<Record<string, string>>(join(this.dir, 'installed.json'))) ?? {};
    if (m) rec[device] = manifestDigest(m);
    else delete rec[device];
    await writeFileAtomic(join(this.dir, 'installed.json'), `${JSON.stringify(rec, null, 2)}\n`, { mkdirs: true });
  }

  /** The boot attempt in flight, if any. */
  async readBootAttempt(): Promise<BootAttempt | null> {
    return readJson<BootAttempt>(join(this.dir, 'boot.json'));
  }

  /** Records a boot attempt (before rebooting). */
  async writeBootAttempt(a: BootAttempt): Promise<void> {
    await writeFileAtomic(join(this.dir, 'boot.json'), `${JSON.stringify(a, null, 2)}\n`, { mkdirs: true });
  }

  /** Forgets the boot attempt (its outcome was seen). */
  async clearBootAttempt(): Promise<void> {
    await rm(join(this.dir, 'boot.json'), { force: true });
    await fsyncPath(this.dir).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'ENOENT') throw err;
    });
  }
}

/** A boot the agent asked for and has not seen the outcome of. */
export interface BootAttempt {
  /** The job that asked (`<rollout>.<seq>.<step>`). */
  job: string;
  /** The device the one-shot entry points at. */
  device: string;
  /** The machine's boot identity when the entry was set, before rebooting (see bootIdentity in steps/common.ts). */
  bootId: string;
  at: string;
}
