/**
 * Entry types and metadata, mapped between the file system and tar headers: the ustar + PAX
 * header blocks the packer writes for one entry (long and non-ASCII names, big owners, sizes and
 * times, device numbers, hardlink and symlink targets, extended attributes such as
 * security.capability in `SCHILY.xattr.*`), and the fields the extractor reads back from a
 * parsed header with the PAX overrides applied.
 */
import { basename } from 'node:path';
import * as tar from 'tar';
import { scError } from '../errors.js';
import { encodePax, type PaxRecords, type TarHeader, XATTR_KEY } from './pax.js';
import { xattrAllowed } from './xattr.js';

/** Entry types (tar-stream's names) extracted as regular files, and those skipped as devices. */
export const FILE_TYPES = new Set(['file', 'contiguous-file']);
export const DEVICE_TYPES = new Set(['character-device', 'block-device']);
/** Largest numbers a ustar header holds in octal; above, PAX records (and base-256 in the header). */
const MAX_USTAR_ID = 0o7777777;
const MAX_USTAR_SIZE = 0o77777777777;
const MAX_USTAR_TIME = 0o77777777777;

/** A ustar-safe stand-in for a name carried in PAX (readers use the PAX one). */
function ustarStandIn(name: string, max: number): string {
  const s = name.replace(/[^\x20-\x7e]/g, '_');
  return s.length <= max ? s : s.slice(s.length - max);
}

/** True when `name` fits a ustar header as is: ASCII, ≤100 bytes after a ≤155-byte prefix split at a '/'. */
function fitsUstar(name: string): boolean {
  if (!/^[\x20-\x7e]*$/.test(name)) return false;
  if (name.length <= 100) return true;
  // The prefix takes everything before some '/', the name field the rest.
  for (let i = name.indexOf('/'); i !== -1; i = name.indexOf('/', i + 1)) {
    if (i <= 155 && name.length - i - 1 <= 100 && name.length - i - 1 > 0) return true;
  }
  return false;
}

/** Major and minor numbers of a device, from a Linux `rdev`, as a tar header carries them. */
export function deviceNumbers(rdev: number): { devmaj: number; devmin: number } {
  return {
    devmaj: (Math.floor(rdev / 256) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff),
    devmin: (rdev & 0xff) | (Math.floor(rdev / 4096) & ~0xff),
  };
}

/** Zeros that pad a tar entry's content (and a PAX body) to the next 512-byte block. */
export const ZEROS_512 = Buffer.alloc(512);

/** One entry's fields, as packed. */
export interface PackEntry {
  path: string;
  type: 'File' | 'Link' | 'SymbolicLink' | 'Directory' | 'FIFO' | 'CharacterDevice' | 'BlockDevice';
  mode: number;
  uid: number;
  gid: number;
  size: number;
  /** Whole seconds. */
  mtime: number;
  linkpath: string;
  devmaj: number;
  devmin: number;
  xattrs: [string, Buffer][];
}

/**
 * The header blocks of one entry: a PAX `x` header with its records when something does not
 * fit ustar (path, link target, big numbers) or there are extended attributes, then the ustar
 * header (node-tar's Header encodes the blocks).
 */
export function headerBlocks(e: PackEntry): Buffer[] {
  const pax: [string, string | Buffer][] = [];
  let path = e.path;
  let linkpath = e.linkpath;
  if (!fitsUstar(path)) {
    pax.push(['path', path]);
    path = ustarStandIn(path, 100);
  }
  if (linkpath && (linkpath.length > 100 || !/^[\x20-\x7e]*$/.test(linkpath))) {
    pax.push(['linkpath', linkpath]);
    linkpath = ustarStandIn(linkpath, 100);
  }
  const fields = { uid: e.uid, gid: e.gid };
  for (const k of ['uid', 'gid'] as const) {
    if (e[k] > MAX_USTAR_ID) {
      pax.push([k, String(e[k])]);
      fields[k] = 0;
    }
  }
  if (e.size > MAX_USTAR_SIZE) pax.push(['size', String(e.size)]);
  let mtime = e.mtime;
  if (mtime < 0 || mtime > MAX_USTAR_TIME) {
    pax.push(['mtime', String(mtime)]);
    mtime = 0;
  }
  for (const [name, value] of e.xattrs) pax.push([`${XATTR_KEY}${name}`, value]);
  const blocks: Buffer[] = [];
  if (pax.length) {
    const body = encodePax(pax);
    const h = new tar.Header({
      path: `PaxHeader/${ustarStandIn(basename(e.path), 80)}`,
      type: 'ExtendedHeader',
      mode: 0o644,
      uid: 0,
      gid: 0,
      size: body.length,
      mtime: new Date(mtime * 1000),
    });
    h.encode();
    blocks.push(h.block as Buffer, body, ZEROS_512.subarray(0, (512 - (body.length % 512)) % 512));
  }
  const h = new tar.Header({
    path,
    type: e.type,
    mode: e.mode,
    uid: fields.uid,
    gid: fields.gid,
    size: e.size,
    mtime: new Date(mtime * 1000),
    linkpath: linkpath || undefined,
    uname: '',
    gname: '',
    devmaj: e.devmaj,
    devmin: e.devmin,
  });
  h.encode();
  blocks.push(h.block as Buffer);
  return blocks;
}

/** The pieces of one entry's header that extraction uses, PAX overrides applied. */
export interface EntryMeta {
  path: string;
  type: string;
  linkname: string;
  mode: number;
  uid: number;
  gid: number;
  mtime: Date;
  size: number;
  xattrs: [string, Buffer][];
}

/**
 * An entry's header as extraction uses it, PAX overrides applied. Throws SC_ERR_BAD_ARCHIVE (GNU
 * sparse entry, bad PAX number) or SC_ERR_UNSUPPORTED_XATTR.
 */
export function entryMeta(h: TarHeader): EntryMeta {
  const pax: PaxRecords = h.pax ?? Object.create(null);
  const path = String(h.name ?? '');
  const xattrs: [string, Buffer][] = [];
  for (const key of Object.keys(pax).sort()) {
    if (key.startsWith('GNU.sparse.')) throw scError('SC_ERR_BAD_ARCHIVE', `${path}: GNU sparse entries (tar --sparse) are not supported; re-create the tarball without --sparse`, { path });
    if (!key.startsWith(XATTR_KEY)) continue;
    const name = key.slice(XATTR_KEY.length);
    if (!xattrAllowed(name)) {
      throw scError('SC_ERR_UNSUPPORTED_XATTR', `${path}: extended attribute ${name} is not carried (only security.*, trusted.*, user.* and POSIX ACLs)`, { path, name });
    }
    const v = pax[key];
    xattrs.push([name, Buffer.isBuffer(v) ? v : Buffer.from(v, 'utf8')]);
  }
  const num = (k: string, fallback: number) => {
    const v = pax[k];
    if (v === undefined) return fallback;
    const n = Number(String(v));
    if (!Number.isFinite(n) || n < 0) throw scError('SC_ERR_BAD_ARCHIVE', `${path}: bad PAX ${k} ${JSON.stringify(String(v).slice(0, 40))}`, { path });
    return n;
  };
  const mtimeSec = pax.mtime !== undefined ? Number(String(pax.mtime)) : undefined;
  return {
    path,
    type: h.type ?? 'unknown',
    linkname: String(h.linkname ?? ''),
    mode: (h.mode ?? 0) & 0o7777,
    uid: num('uid', h.uid ?? 0),
    gid: num('gid', h.gid ?? 0),
    mtime: mtimeSec !== undefined && Number.isFinite(mtimeSec) ? new Date(Math.floor(mtimeSec * 1000)) : h.mtime,
    size: h.size ?? 0,
    xattrs,
  };
}
