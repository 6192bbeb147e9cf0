/**
 * The unpacker: the stream plumbing from a plaintext tar stream to the file system
 * (`safeExtract`: byte cap, end-of-archive check, back-pressure, one entry at a time through
 * the guard to the writers, error mapping), and `scanTar`, which reads a few entries without
 * writing anything.
 */
import { linkSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { resolve } from 'node:path';
import type { Readable } from 'node:stream';
import * as tar from 'tar';
import { fsFailure, isScError, type ScError, scError } from '../errors.js';
import { createTarExtract } from './pax.js';
import { DEVICE_TYPES, entryMeta, FILE_TYPES } from './tar-entry.js';
import { archivePath, EntryGuard } from './tar-guard.js';
import { Breather, drained } from './tar-io.js';
import { applyFixups, clearPath, DirCache, type Fixup, makeDirEntry, under, writeFileContent } from './tar-write.js';

/** What `safeExtract` did. */
export interface ExtractResult {
  /** Archive entries read (PAX and GNU long-name headers excluded), skipped ones included. */
  entries: number;
  /** Character and block devices that were not created. */
  skipped: number;
}

/** Options for `safeExtract`. */
export interface ExtractOptions {
  /** Most plaintext tar bytes to read; one more fails with SC_ERR_BUNDLE_TOO_LARGE. */
  maxBytes?: number;
  /**
   * Called with offsets of the tar stream, rising, below which the extractor holds no reference
   * to `src`'s bytes any more: the headers before it are decoded and the contents before it
   * written. A source that refills its buffers may refill any buffer lying wholly below it (the
   * unpack worker's, unpack-file.ts); without this, every chunk is left to the garbage collector.
   */
  released?: (offset: number) => void;
  /**
   * How long the extractor works before it gives the event loop a turn, ms (default 50): its
   * writes are synchronous, and without turns a caller's timers and sockets (a step's progress
   * reports, its deadline) would wait for as long as data is buffered.
   */
  breatheMs?: number;
}

/** Default of ExtractOptions.breatheMs. */
export const EXTRACT_BREATHE_MS = 50;

/** Files whose finishing may run while later entries are written. */
const MAX_PENDING_FILES = 16;

/**
 * Extracts the tar stream `src` into `targetDir` (created if missing), refusing anything that
 * could escape it (see tar-guard.ts). Modes are kept exactly (setuid, setgid, sticky,
 * regardless of the process umask), owners by number when running as root, extended
 * attributes, hardlinks (one inode), mtimes.
 *
 * Rejects with SC_ERR_UNSAFE_ARCHIVE for an unsafe entry (nothing of that entry is written),
 * SC_ERR_BAD_ARCHIVE for a corrupt or truncated archive or an unsupported entry type,
 * SC_ERR_UNSUPPORTED_XATTR, SC_ERR_BUNDLE_TOO_LARGE past `opts.maxBytes`, SC_ERR_NO_SPACE when
 * the target file system is full, the error `src` failed with, or SC_ERR_INTERNAL for another
 * file system error (details.errno, details.path). On failure `src` is destroyed and entries
 * before the failing one may already be written (inside the target): callers clean it up.
 */
export async function safeExtract(src: Readable, targetDir: string, opts: ExtractOptions = {}): Promise<ExtractResult> {
  const root = resolve(targetDir);
  // Listen before the first await: an upstream stage may fail while the target is created.
  let early: unknown;
  const onEarly = (err: unknown) => {
    early ??= err;
  };
  src.on('error', onEarly);
  try {
    await mkdir(root, { recursive: true });
  } catch (err) {
    src.destroy();
    throw fsFailure(err, `cannot create ${root}`, root);
  }
  const asRoot = process.getuid?.() === 0;
  const guard = new EntryGuard(root);
  const fixups = new Map<string, Fixup>();
  const maxBytes = opts.maxBytes ?? Number.POSITIVE_INFINITY;
  const released = opts.released;
  let entries = 0;
  let skipped = 0;
  const ex = createTarExtract();
  const dirs = new DirCache(root);
  await dirs.checkRoot();
  const breath = new Breather(opts.breatheMs ?? EXTRACT_BREATHE_MS);
  /** Files whose finishing (owner, mode, mtime, xattrs) still runs, by path. */
  const pending = new Map<string, Promise<void>>();
  const settle = async (rel: string) => {
    const p = pending.get(rel);
    if (p) await p;
  };

  // Feeds the extractor, counting plaintext bytes; keeps the last 1 KiB to check the end marker.
  const feed = async () => {
    let bytes = 0;
    let tail: Buffer = Buffer.alloc(0);
    src.off('error', onEarly);
    if (early !== undefined) throw early;
    for await (const c of src) {
      const chunk = c as Buffer;
      bytes += chunk.length;
      if (bytes > maxBytes) {
        throw scError('SC_ERR_BUNDLE_TOO_LARGE', `the unpacked tar exceeds ${maxBytes} bytes`, { maxBytes });
      }
      // A copy: the chunk itself may be refilled once released.
      tail = chunk.length >= 1024 ? Buffer.from(chunk.subarray(chunk.length - 1024)) : Buffer.concat([tail, chunk]).subarray(-1024);
      // The consumer may have failed (and destroyed the extractor) while this chunk was read.
      if (ex.destroying) return;
      if (!ex.write(chunk)) await drained(ex);
      if (breath.due()) await breath.breathe();
      if (ex.destroying) return;
    }
    if (bytes > 0 && (tail.length < 1024 || !tail.equals(Buffer.alloc(1024)))) {
      throw scError('SC_ERR_BAD_ARCHIVE', 'tar archive truncated (no end-of-archive blocks)');
    }
    ex.end(undefined);
  };

  const consume = async () => {
    for await (const entry of ex) {
      // Entries come one at a time: this one's headers are decoded and every earlier one's content
      // was read to its end (written, or drained), so nothing before its content is referenced.
      // That rests on tar-stream 3 (pinned in package-lock.json): it emits the next entry only
      // once the consumer asks for it, decodes headers into strings and numbers (binary PAX values
      // are copied, pax.ts), and keeps no view of a chunk it has passed. The "released offsets"
      // test of bundle-tar.test.ts refills released chunks with other bytes and checks the tree.
      const at = released ? entry.header.byteOffset : undefined;
      if (at !== undefined) released?.(at);
      if (breath.due()) await breath.breathe();
      const meta = entryMeta(entry.header);
      entries++;
      const rel = guard.check(meta.path, meta.type, meta.linkname);
      // The last entry for a path decides what is there: forget earlier plans for it.
      fixups.delete(rel);
      if (FILE_TYPES.has(meta.type)) {
        if (pending.size > 0) await settle(rel);
        const finish = await writeFileContent(root, rel, meta, entry, asRoot, dirs, at === undefined ? undefined : (n) => released?.(at + n));
        guard.wrote(rel);
        if (!finish) continue;
        const done: Promise<void> = finish().finally(() => {
          if (pending.get(rel) === done) pending.delete(rel);
        });
        done.catch(() => {});
        pending.set(rel, done);
        if (pending.size >= MAX_PENDING_FILES) await Promise.race(pending.values());
        continue;
      }
      // Entries without content: drain whatever the header declared (most declare none; a
      // directory's declared size is no content to tar-stream, and its stream never ends).
      if (entry.header.size && entry.header.type !== 'directory') {
        for await (const _ of entry) {
          /* nothing: only files have content */
        }
      }
      if (pending.size > 0) await settle(rel);
      if (meta.type === 'directory') {
        await makeDirEntry(root, rel, meta, asRoot, dirs);
        guard.wrote(rel);
        fixups.set(rel, { kind: 'dir', mode: meta.mode, mtime: meta.mtime });
      } else if (meta.type === 'symlink') {
        fixups.set(rel, { kind: 'symlink', target: meta.linkname, mtime: meta.mtime, uid: meta.uid, gid: meta.gid, xattrs: meta.xattrs });
      } else if (meta.type === 'link') {
        const target = archivePath(meta.linkname, 'hardlink target');
        const k = fixups.get(target)?.kind;
        if (k === 'symlink' || k === 'hardlink') {
          fixups.set(rel, { kind: 'hardlink', target });
        } else {
          const p = under(root, rel);
          if (pending.size > 0) await settle(target);
          dirs.ensureParent(p);
          clearPath(p, rel, dirs);
          try {
            linkSync(under(root, target), p);
          } catch (err) {
            if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw scError('SC_ERR_BAD_ARCHIVE', `hardlink ${rel}: its target ${target} is not in the archive before it`, { path: rel });
            throw err;
          }
          guard.wrote(rel);
        }
      } else if (meta.type === 'fifo') {
        fixups.set(rel, { kind: 'fifo', mode: meta.mode, mtime: meta.mtime, uid: meta.uid, gid: meta.gid, xattrs: meta.xattrs });
      } else if (DEVICE_TYPES.has(meta.type)) {
        skipped++;
      } else {
        throw scError('SC_ERR_BAD_ARCHIVE', `unsupported tar entry type ${meta.type} at ${rel}`, { path: rel });
      }
    }
    await Promise.all(pending.values());
    if (entries === 0) throw scError('SC_ERR_BAD_ARCHIVE', 'the tar archive has no entries');
    await applyFixups(root, fixups, guard, asRoot, dirs, breath);
  };

  const failures: unknown[] = [];
  const stop = (err: unknown) => {
    failures.push(err);
    src.destroy();
    ex.destroy(isScError(err) ? err : new Error(String((err as Error)?.message ?? err)));
  };
  await Promise.all([feed().catch(stop), consume().catch(stop)]);
  // Nothing of this extraction may still be running once it has settled.
  await Promise.allSettled(pending.values());
  if (failures.length) {
    // The first ScError is the cause; a library's error only when there is nothing better.
    const err = failures.find((e) => isScError(e)) ?? failures[0];
    throw toExtractError(err);
  }
  return { entries, skipped };
}

/** Maps a failure met while extracting to an ScError. */
function toExtractError(err: unknown): ScError {
  if (isScError(err)) return err;
  const e = err as NodeJS.ErrnoException;
  if (typeof e?.code === 'string' && /^E[A-Z0-9]+$/.test(e.code)) return fsFailure(err, 'tar extraction failed', e.path ? String(e.path) : undefined);
  if (e?.code) return scError('SC_ERR_INTERNAL', `tar extraction failed: ${e.message}`, undefined, err);
  // tar-stream's own errors: corrupt headers, short data, oversized or malformed PAX.
  const msg = String(e?.message ?? err);
  const why = /Invalid tar header/.test(msg)
    ? msg.includes('unknown format')
      ? 'a header is in no tar format we read (not ustar, pax or GNU)'
      : 'a header checksum does not match (corrupt, or not a plain tar)'
    : /Unexpected end of data/.test(msg)
      ? 'the archive is truncated'
      : /Header exceeds max size/.test(msg)
        ? 'a pax or long-name header is too large'
        : msg;
  return scError('SC_ERR_BAD_ARCHIVE', `tar archive unreadable: ${why}`, undefined, err);
}

/**
 * Reads a tar stream until `wanted` has collected what it needs. `wanted(path)` is called with
 * each entry's normalised path ('etc/os-release'); entries it returns true for are passed,
 * with their content (regular files, at most `maxBytes`) or link target, to `onEntry`, which
 * returns true to stop early. The source is destroyed when the scan stops early. Rejects with
 * SC_ERR_BAD_ARCHIVE on a corrupt archive.
 */
export function scanTar(
  src: Readable,
  wanted: (path: string) => boolean,
  onEntry: (e: { path: string; type: string; data?: Buffer; linkpath?: string }) => boolean,
  maxBytes = 1 << 20,
): Promise<void> {
  return new Promise<void>((resolvePromise, reject) => {
    let done = false;
    const finish = (err?: unknown) => {
      if (done) return;
      done = true;
      src.unpipe(parser);
      if (err) {
        src.destroy();
        reject(isScError(err) ? err : scError('SC_ERR_BAD_ARCHIVE', `tar: ${(err as Error)?.message ?? String(err)}`, undefined, err));
      } else {
        if (!src.readableEnded) src.destroy();
        resolvePromise();
      }
    };
    const parser = new tar.Parser({
      strict: true,
      zstd: false,
      brotli: false,
      onReadEntry: (entry) => {
        let rel: string | undefined;
        try {
          rel = archivePath(String(entry.path), 'path');
        } catch {
          rel = undefined;
        }
        if (done || rel === undefined || !wanted(rel)) {
          entry.resume();
          return;
        }
        const path = rel;
        if (entry.type === 'File' || entry.type === 'OldFile' || entry.type === 'ContiguousFile') {
          const parts: Buffer[] = [];
          let size = 0;
          entry.on('data', (c: Buffer) => {
            size += c.length;
            if (size <= maxBytes) parts.push(c);
          });
          entry.on('end', () => {
            if (!done && onEntry({ path, type: entry.type, data: Buffer.concat(parts) })) finish();
          });
        } else {
          entry.resume();
          if (onEntry({ path, type: entry.type, linkpath: entry.linkpath })) finish();
        }
      },
    });
    parser.on('error', (err: Error) => finish(err));
    parser.on('end', () => finish());
    src.on('error', (err) => finish(err));
    src.pipe(parser);
  });
}
