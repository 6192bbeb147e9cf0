/**
 * Extended attributes of files in a root filesystem: `security.capability` (ping's
 * cap_net_raw), `security.selinux` labels, IMA/EVM, `trusted.*` and `user.*`.
 *
 * Decision: `@napi-rs/xattr` (1.0.x). Node has no xattr API. This package is N-API with
 * prebuilt binaries shipped as per-platform optional dependencies (x86_64/aarch64, glibc and
 * musl), so a fresh `npm ci` installs it with no install script to approve (npm 11 holds those
 * back) and no compiler; it loads on Node 20 from ESM. It calls the l* syscalls (llistxattr,
 * lgetxattr, lsetxattr): symlinks are never followed. Its errors carry only "… (os error N)",
 * which is mapped back to an errno name here. The alternatives: `fs-xattr` needs node-gyp at
 * install time; `getfattr`/`setfattr` (Debian `attr`) would need a tool on every host and a
 * batched text protocol. If the binding is missing on some platform, `loadXattr` fails with
 * SC_ERR_INTERNAL when a tree with attributes is packed or unpacked, never silently.
 *
 * Policy: attributes in the `security.`, `trusted.` and `user.` namespaces are carried, and the
 * POSIX ACLs (`system.posix_acl_access`, `system.posix_acl_default`: Debian's
 * /var/log/journal has them, and `tar --xattrs` records them so). Any other name is refused
 * with SC_ERR_UNSUPPORTED_XATTR, on packing and on extraction, naming the file: it is never
 * dropped silently.
 */
import { constants } from 'node:os';
import { scError, type ScError } from '../errors.js';

/** Namespaces of the attributes a bundle carries. */
export const XATTR_NAMESPACES = ['security.', 'trusted.', 'user.'] as const;

/** The POSIX ACLs, carried as the attributes the kernel stores them in. */
export const XATTR_ACLS = ['system.posix_acl_access', 'system.posix_acl_default'] as const;

/** True when an attribute name is one a bundle carries. */
export function xattrAllowed(name: string): boolean {
  if ((XATTR_ACLS as readonly string[]).includes(name)) return true;
  return XATTR_NAMESPACES.some((ns) => name.startsWith(ns) && name.length > ns.length) && !name.includes('\0');
}

type Binding = typeof import('@napi-rs/xattr');
let binding: Promise<Binding> | undefined;

/** Loads the binding once; fails with SC_ERR_INTERNAL when this platform has no prebuilt one. */
function loadXattr(): Promise<Binding> {
  binding ??= import('@napi-rs/xattr').catch((err: unknown) => {
    binding = undefined;
    throw scError('SC_ERR_INTERNAL', `extended attributes are not available on this platform: ${(err as Error).message}`);
  });
  return binding;
}

const ERRNO_NAMES = new Map<number, string>(Object.entries(constants.errno).map(([k, v]) => [v, k]));

/** The errno name (`ENOTSUP`) in a binding error's "(os error 95)", if any. */
export function xattrErrno(err: unknown): string | undefined {
  const m = /os error (\d+)/.exec(String((err as Error)?.message ?? err));
  return m ? ERRNO_NAMES.get(Number(m[1])) : undefined;
}

function failure(what: string, path: string, err: unknown): ScError {
  const errno = xattrErrno(err);
  const code = errno === 'ENOSPC' || errno === 'EDQUOT' ? 'SC_ERR_NO_SPACE' : 'SC_ERR_INTERNAL';
  const hint = errno === 'ENOTSUP' || errno === 'EOPNOTSUPP' ? ' (the file system does not support these extended attributes)' : '';
  return scError(code, `${what} ${path}: ${errno ?? (err as Error)?.message ?? String(err)}${hint}`, { path, ...(errno ? { errno } : {}) }, err);
}

/**
 * Reads the extended attributes of `path` (not following a symlink), sorted by name. A file
 * system without xattr support has none. Throws SC_ERR_UNSUPPORTED_XATTR for a name outside
 * the carried namespaces (`display` names the file in the message), SC_ERR_INTERNAL otherwise.
 */
export async function readXattrs(path: string, display = path): Promise<[string, Buffer][]> {
  const x = await loadXattr();
  const names = await xattrNames(path, display);
  if (names.length === 0) return [];
  const out: [string, Buffer][] = [];
  for (const name of names.sort()) {
    if (!xattrAllowed(name)) {
      throw scError(
        'SC_ERR_UNSUPPORTED_XATTR',
        `${display} has the extended attribute ${name}: only ${XATTR_NAMESPACES.map((n) => `${n}*`).join(', ')} and POSIX ACLs are carried (remove it)`,
        { path: display, name },
      );
    }
    let value: Buffer | null;
    try {
      value = await x.getAttribute(path, name);
    } catch (err) {
      throw failure(`cannot read the extended attribute ${name} of`, display, err);
    }
    if (value) out.push([name, Buffer.from(value)]);
  }
  return out;
}

/**
 * Whether the directory `path` has a default ACL: true or false, or undefined when that cannot
 * be known (no binding on this platform, or the listing failed). A file system without xattr
 * support has none.
 */
export async function hasDefaultAcl(path: string): Promise<boolean | undefined> {
  try {
    return (await xattrNames(path, path)).includes('system.posix_acl_default');
  } catch {
    return undefined;
  }
}

/** The names of `path`'s extended attributes (not following a symlink); none where the file system has no support. */
async function xattrNames(path: string, display: string): Promise<string[]> {
  const x = await loadXattr();
  try {
    return await x.listAttributes(path);
  } catch (err) {
    const errno = xattrErrno(err);
    if (errno === 'ENOTSUP' || errno === 'EOPNOTSUPP') return [];
    throw failure('cannot list the extended attributes of', display, err);
  }
}

/**
 * Sets extended attributes on `path` (not following a symlink). Throws SC_ERR_UNSUPPORTED_XATTR
 * for a name outside the carried namespaces, SC_ERR_NO_SPACE when the file system is full,
 * SC_ERR_INTERNAL otherwise (e.g. ENOTSUP: the target file system cannot hold them).
 */
export async function writeXattrs(path: string, attrs: [string, Buffer][], display = path): Promise<void> {
  if (attrs.length === 0) return;
  const x = await loadXattr();
  for (const [name, value] of attrs) {
    if (!xattrAllowed(name)) throw scError('SC_ERR_UNSUPPORTED_XATTR', `${display}: extended attribute ${name} is not carried`, { path: display, name });
    try {
      await x.setAttribute(path, name, value);
    } catch (err) {
      throw failure(`cannot set the extended attribute ${name} on`, display, err);
    }
  }
}
