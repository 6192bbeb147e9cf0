/**
 * Garbage collection of the origin's blobs: mark and sweep of the blobs no manifest references,
 * with a grace period, safe while uploads and publishes run.
 *
 * Safety argument (what FsBlobStore and this module guarantee together):
 * 1. A manifest is written only under the store's lock (StoreGuard.exclusive), and only after
 *    its blob was found there, under that same lock, with the size it states. The sweep runs
 *    under that lock too and marks (reads every manifest) inside it, after which no manifest
 *    can appear until it is done. So a blob referenced by a manifest, or by one being written,
 *    is never removed, and no manifest ever names a blob that is gone.
 * 2. An upload pins its digest from its first byte until it returns. While it streams, its
 *    bytes are in tmp/, which the sweep never looks at; a pinned digest is skipped even when a
 *    finished upload of the same digest already put it in blobs/.
 * 3. An upload that finds its blob already stored checks that under the lock and refreshes the
 *    blob's mtime there: it either ran before the sweep (the blob is young again, so kept) or
 *    after it (it sees the blob gone and stores it again).
 * 4. A blob younger than the grace period (by mtime: the time its last byte was written, or an
 *    upload last refreshed it) is kept. The grace covers the gap between a publish's blob PUT
 *    and its manifest PUT. If it is set shorter than that gap and the blob is swept, the
 *    manifest PUT is refused with SC_ERR_MISSING_BLOB (by 1): the publish fails cleanly and
 *    can be run again; nothing is half-published.
 * Readers of a blob being swept keep their open file (unlink(2) semantics).
 */
import { readdir, stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import type { Digest } from '../../shared/digest.js';
import { isErrno } from './fs-util.js';
import type { StoreGuard } from './guard.js';

const HEX = /^[0-9a-f]{64}$/;
const FANOUT = /^[0-9a-f]{2}$/;

/** What a collection is asked to do. */
export interface GcOptions {
  /** Blobs whose mtime is younger than this many ms are kept. */
  graceMs: number;
  /** Report what would be removed, remove nothing. */
  dryRun?: boolean;
  /** The current time in ms since the epoch (injectable for tests). Default Date.now(). */
  now?: () => number;
}

/** What a collection did (`removed`: what it removed, or would remove with dryRun). */
export interface GcReport {
  dryRun: boolean;
  graceMs: number;
  /** Blobs found in the store, and their bytes. */
  scanned: { blobs: number; bytes: number };
  /** Blobs kept, by reason. */
  kept: { referenced: number; young: number; uploading: number };
  /** Blobs removed (or that would be), and the bytes freed. */
  removed: { blobs: number; bytes: number; digests: Digest[] };
  /** Manifests read by the mark phase. */
  manifests: number;
}

/** What the collector needs from a store. */
export interface GcSite {
  /** The directory holding `<hex[0:2]>/<hex>` blob files. */
  blobsRoot: string;
  guard: StoreGuard;
  /**
   * Reads every stored manifest and returns the blob digests they reference, and how many
   * manifests there are. Called under the lock. Must throw (aborting the collection) rather
   * than skip a manifest it cannot read.
   */
  referenced(): Promise<{ digests: Set<Digest>; manifests: number }>;
}

interface Found {
  digest: Digest;
  path: string;
  size: number;
}

/** Every blob file under `root` (outside the lock: it only proposes candidates). */
async function walk(root: string): Promise<Found[]> {
  const out: Found[] = [];
  for (const dir of await readdir(root)) {
    if (!FANOUT.test(dir)) continue;
    let names: string[];
    try {
      names = await readdir(join(root, dir));
    } catch (err) {
      if (isErrno(err, 'ENOENT', 'ENOTDIR')) continue;
      throw err;
    }
    for (const hex of names) {
      if (!HEX.test(hex) || hex.slice(0, 2) !== dir) continue;
      const path = join(root, dir, hex);
      try {
        const st = await stat(path);
        if (st.isFile()) out.push({ digest: `sha256:${hex}`, path, size: st.size });
      } catch (err) {
        if (!isErrno(err, 'ENOENT', 'ENOTDIR')) throw err;
      }
    }
  }
  return out;
}

/**
 * Runs one mark-and-sweep collection (see the module comment). Throws what the filesystem or
 * `site.referenced()` throws; blobs removed before a failure stay removed and were unreferenced.
 */
export async function collectGarbage(site: GcSite, opts: GcOptions): Promise<GcReport> {
  const now = opts.now ?? Date.now;
  const dryRun = opts.dryRun === true;
  const found = await walk(site.blobsRoot);
  const report: GcReport = {
    dryRun,
    graceMs: opts.graceMs,
    scanned: { blobs: found.length, bytes: found.reduce((n, b) => n + b.size, 0) },
    kept: { referenced: 0, young: 0, uploading: 0 },
    removed: { blobs: 0, bytes: 0, digests: [] },
    manifests: 0,
  };
  return site.guard.exclusive(async () => {
    const marked = await site.referenced();
    report.manifests = marked.manifests;
    for (const b of found) {
      if (marked.digests.has(b.digest)) {
        report.kept.referenced++;
        continue;
      }
      if (site.guard.pinned(b.digest)) {
        report.kept.uploading++;
        continue;
      }
      let st: Awaited<ReturnType<typeof stat>>;
      try {
        st = await stat(b.path);
      } catch (err) {
        if (isErrno(err, 'ENOENT', 'ENOTDIR')) continue;
        throw err;
      }
      if (now() - st.mtimeMs < opts.graceMs) {
        report.kept.young++;
        continue;
      }
      if (!dryRun) {
        try {
          await unlink(b.path);
        } catch (err) {
          if (isErrno(err, 'ENOENT', 'ENOTDIR')) continue;
          throw err;
        }
      }
      report.removed.blobs++;
      report.removed.bytes += st.size;
      report.removed.digests.push(b.digest);
    }
    return report;
  });
}
