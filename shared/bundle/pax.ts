/**
 * PAX extended header records (POSIX.1-2001 `x` entries), binary-safe, and a tar-stream
 * extractor that reads them so.
 *
 * Why this exists: extended attributes travel as `SCHILY.xattr.<name>=<raw bytes>` records (the
 * format GNU tar `--xattrs` and bsdtar write), and `security.capability` is binary. node-tar 7
 * drops PAX keys it does not know, and tar-stream 3 decodes every PAX value as UTF-8 (bytes
 * ≥ 0x80 become U+FFFD). So records are encoded here, and the tar-stream extractor is extended
 * to decode them: values of `SCHILY.xattr.*` keys stay Buffers, every other value is UTF-8 text.
 * Everything else (ustar headers, GNU long names, checksums, padding, streaming) is
 * tar-stream's.
 */
import tarStream from 'tar-stream';

/** The PAX key prefix of an extended attribute. */
export const XATTR_KEY = 'SCHILY.xattr.';

/** Decoded PAX records: text values, except `SCHILY.xattr.*` values, which are raw bytes. */
export type PaxRecords = Record<string, string | Buffer>;

/** Encodes PAX records (`"<len> <key>=<value>\n"`, len counting itself) into one body. */
export function encodePax(records: [string, string | Buffer][]): Buffer {
  const parts: Buffer[] = [];
  for (const [key, value] of records) {
    const body = Buffer.concat([Buffer.from(` ${key}=`, 'utf8'), Buffer.isBuffer(value) ? value : Buffer.from(value, 'utf8'), Buffer.from('\n')]);
    let len = body.length + 1;
    while (String(len).length + body.length !== len) len = String(len).length + body.length;
    parts.push(Buffer.from(String(len), 'latin1'), body);
  }
  return Buffer.concat(parts);
}

/** Decodes a PAX body; throws an Error on a malformed record (the caller maps it to SC_ERR_BAD_ARCHIVE). */
export function decodePax(buf: Buffer): PaxRecords {
  const out: PaxRecords = Object.create(null);
  let off = 0;
  while (off < buf.length) {
    if (buf[off] === 0) break; // NUL padding after the last record
    const sp = buf.indexOf(0x20, off);
    const lenText = sp > off ? buf.toString('latin1', off, sp) : '';
    const len = /^[0-9]{1,8}$/.test(lenText) ? Number(lenText) : Number.NaN;
    if (!(len > 0) || off + len > buf.length || buf[off + len - 1] !== 0x0a) throw new Error('malformed PAX extended header record');
    const eq = buf.indexOf(0x3d, sp + 1);
    if (eq < 0 || eq >= off + len - 1) throw new Error('malformed PAX extended header record (no "=")');
    const key = buf.toString('utf8', sp + 1, eq);
    const raw = buf.subarray(eq + 1, off + len - 1);
    out[key] = key.startsWith(XATTR_KEY) ? Buffer.from(raw) : raw.toString('utf8');
    off += len;
  }
  return out;
}

/** A tar header as tar-stream's extractor gives it, with `pax` decoded by `decodePax`. */
export type TarHeader = Omit<tarStream.Header, 'type' | 'pax'> & {
  type: string;
  pax: PaxRecords | null;
  /** Where the entry's content starts in the tar stream (set by tar-stream 3's extractor, not in its types). */
  byteOffset?: number;
};

/** One entry from `createTarExtract`: its header and its content stream (consume it before the next). */
export interface TarEntry extends AsyncIterable<Buffer> {
  header: TarHeader;
  resume(): void;
}

interface ExtractInternals {
  _header: { type: string };
  _pax: PaxRecords | null;
  _paxGlobal: PaxRecords | null;
  _decodeLongHeader(buf: Buffer): void;
}

// tar-stream exports a factory, not its class; the class is taken from one instance.
const Extract = Object.getPrototypeOf(tarStream.extract()).constructor as new (opts?: object) => tarStream.Extract;

/**
 * tar-stream 3's extractor, with PAX bodies decoded by `decodePax` (binary-safe xattrs). It
 * overrides the one method that decodes long headers; tar-stream is pinned in
 * package-lock.json and the bundle tests cover this path (xattr round trips, GNU tar interop).
 */
class BinaryPaxExtract extends Extract {
  _decodeLongHeader(buf: Buffer): void {
    const self = this as unknown as ExtractInternals;
    const type = self._header.type;
    if (type === 'pax-header') {
      const own = decodePax(buf);
      self._pax = self._paxGlobal ? Object.assign(Object.create(null), self._paxGlobal, own) : own;
    } else if (type === 'pax-global-header') {
      self._paxGlobal = decodePax(buf);
    } else {
      (Extract.prototype as unknown as ExtractInternals)._decodeLongHeader.call(this, buf);
    }
  }
}

/**
 * A tar-stream extractor (write tar bytes in, iterate entries out) that keeps binary PAX values.
 * It buffers up to 4 MiB of input before asking writers to wait (streamx's default, 16 KiB,
 * would make every 1 MiB write wait for the reader).
 */
export function createTarExtract(): tarStream.Extract & AsyncIterable<TarEntry> {
  return new BinaryPaxExtract({ highWaterMark: 4 << 20 }) as unknown as tarStream.Extract & AsyncIterable<TarEntry>;
}
