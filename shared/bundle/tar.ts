/**
 * Tar for root filesystems: a deterministic packer and an extractor that can never write
 * outside its target. Packing encodes header blocks with node-tar 7's `Header`; extraction
 * parses with tar-stream 3; PAX records are ours in both directions (pax.ts: binary-safe, for
 * extended attributes); extended attributes are read and set through xattr.ts. Every entry is
 * written by this module (no library writes to the file system).
 *
 * This file is the public surface of the tar codec; the work is split by what each part owns:
 * - tar-pack.ts: the packer (`packDirStream`), and what a packed archive carries;
 * - tar-entry.ts: entry types and metadata, between the file system and tar headers;
 * - tar-guard.ts: the safe extraction guard (paths and symlink resolution), and what is refused;
 * - tar-write.ts: writing extracted entries to disk, and what is created;
 * - tar-extract.ts: the unpacker's stream plumbing (`safeExtract`) and `scanTar`;
 * - tar-io.ts: back-pressure and file system error mapping shared by packer and extractor.
 */
export { type ExtractOptions, type ExtractResult, safeExtract, scanTar } from './tar-extract.js';
export { packDirStream } from './tar-pack.js';
