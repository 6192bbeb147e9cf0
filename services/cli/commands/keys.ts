/**
 * `stagecoach keys gen --out DIR`: the key material of a fleet, in one directory.
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
import type { Command } from 'commander';
import { generateAgeIdentity } from '../../../shared/bundle/index.js';
import { scError } from '../../../shared/errors.js';
import { keyId, loadPrivateKey, loadPublicKey } from '../../../shared/manifest.js';
import { action, describeErrno, makeDir, printJson } from '../util.js';

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

/** Registers `stagecoach keys gen`. */
export function register(program: Command): void {
  const keys = program.command('keys').description('Generate release, control and fleet keys');
  keys
    .command('gen')
    .description('Write release.key/.pub, control.key/.pub (ed25519 PEM) and fleet.age/.age.pub (age X25519) into a directory')
    .requiredOption('--out <dir>', 'output directory (created if missing; existing key files are never overwritten)')
    .option('--json', 'print paths, key ids and the fleet recipient as JSON')
    .action(
      action(async (flags: { out: string; json?: boolean }) => {
        const r = await generateKeys(flags.out);
        if (flags.json) {
          printJson(r);
          return;
        }
        process.stdout.write(
          [
            `wrote ${r.dir}:`,
            `  release.key, release.pub   manifest signing key, id ${r.keyIds.release}`,
            `  control.key, control.pub   step-job signing key, id ${r.keyIds.control}`,
            '  fleet.age, fleet.age.pub   bundle encryption identity and recipient',
            `fleet recipient: ${r.recipient}`,
            'keep *.key and fleet.age secret (mode 0600); distribute *.pub and fleet.age.pub.',
            '',
          ].join('\n'),
        );
      }),
    );
}
