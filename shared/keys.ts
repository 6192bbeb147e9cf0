/**
 * The key material of a fleet, generated into one directory (`stagecoach keys gen`, the demo and
 * the sim fleet all call generateKeys).
 *
 * | file | what | mode |
 * |---|---|---|
 * | release.key / release.pub | ed25519 (PKCS8 / SPKI PEM): signs manifests | 0600 / 0644 |
 * | control.key / control.pub | ed25519 (PKCS8 / SPKI PEM): signs step jobs | 0600 / 0644 |
 * | fleet.age | age X25519 identity, `age-keygen` layout: decrypts bundles | 0600 |
 * | fleet.age.pub | the matching `age1…` recipient line: publishers encrypt to it | 0644 |
 *
 * Existing files are never overwritten: all six names are checked first, and every file is
 * created with O_EXCL, so either all six are written or none is (a file created before a
 * failure is removed again).
 */
import { generateKeyPairSync } from 'node:crypto';
import { existsSync } from 'node:fs';
import { open, unlink } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { generateAgeIdentity } from './bundle/index.js';
import { scError } from './errors.js';
import { describeErrno, makeDir } from './files.js';
import { keyId, loadPrivateKey, loadPublicKey } from './manifest.js';

/** File names written by `keys gen`, relative to the output directory. */
export const KEY_FILES = {
  releaseKey: 'release.key',
  releasePub: 'release.pub',
  controlKey: 'control.key',
  controlPub: 'control.pub',
  fleetIdentity: 'fleet.age',
  fleetRecipient: 'fleet.age.pub',
} as const;

/** What `generateKeys` wrote: absolute paths, key ids (16 hex) and the fleet recipient. */
export interface GeneratedKeys {
  dir: string;
  files: Record<keyof typeof KEY_FILES, string>;
  keyIds: { release: string; control: string };
  recipient: string;
}

function ed25519Pem(): { key: string; pub: string } {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  return {
    key: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(),
    pub: publicKey.export({ type: 'spki', format: 'pem' }).toString(),
  };
}

/** age-keygen's `# created:` timestamp: RFC 3339, seconds precision. */
function created(now: Date): string {
  return now.toISOString().replace(/\.\d{3}Z$/, 'Z');
}

/**
 * Writes the six key files into `outDir` (created with mode 0700 if missing). Throws
 * SC_ERR_FILE_EXISTS, writing nothing, when any of them already exists; file system errors
 * become SC_ERR_FILE_ACCESS (at once: see makeDir), and files created before the failure are
 * removed.
 */
export async function generateKeys(outDir: string): Promise<GeneratedKeys> {
  const dir = resolve(outDir);
  const files = Object.fromEntries(Object.entries(KEY_FILES).map(([k, f]) => [k, join(dir, f)])) as GeneratedKeys['files'];
  const existing = Object.values(files).filter((p) => existsSync(p));
  if (existing.length) throw scError('SC_ERR_FILE_EXISTS', `refusing to overwrite ${existing.join(', ')}`, { files: existing });
  makeDir(dir, 0o700);

  const release = ed25519Pem();
  const control = ed25519Pem();
  const age = await generateAgeIdentity();
  const contents: [string, string, number][] = [
    [files.releaseKey, release.key, 0o600],
    [files.releasePub, release.pub, 0o644],
    [files.controlKey, control.key, 0o600],
    [files.controlPub, control.pub, 0o644],
    [files.fleetIdentity, `# created: ${created(new Date())}\n# public key: ${age.recipient}\n${age.identity}\n`, 0o600],
    [files.fleetRecipient, `${age.recipient}\n`, 0o644],
  ];

  const written: string[] = [];
  try {
    for (const [path, text, mode] of contents) {
      // 'wx' = O_CREAT|O_EXCL: never follows or replaces an existing file, even one created meanwhile.
      const fh = await open(path, 'wx', mode);
      written.push(path);
      try {
        await fh.writeFile(text);
        await fh.chmod(mode); // the umask must not loosen or tighten what is documented
      } finally {
        await fh.close();
      }
    }
  } catch (err) {
    await Promise.all(written.map((p) => unlink(p).catch(() => {})));
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') throw scError('SC_ERR_FILE_EXISTS', `refusing to overwrite ${(err as NodeJS.ErrnoException).path}`);
    throw scError('SC_ERR_FILE_ACCESS', `cannot write keys into ${dir}: ${describeErrno(err)}`, { path: dir });
  }

  return {
    dir,
    files,
    keyIds: { release: keyId(loadPrivateKey(release.key)), control: keyId(loadPublicKey(control.pub)) },
    recipient: age.recipient,
  };
}
