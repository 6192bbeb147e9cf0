/**
 * The agent's runtime as it is installed on a host: one directory, `/opt/stagecoach`, holding
 * `bin/node` (the Node.js binary, glibc-linked like the distribution's own) and `app/` (the
 * compiled project: package.json, dist/ and the production node_modules). The systemd unit runs
 * `bin/node app/dist/services/cli/main.js agent --config /etc/stagecoach/agent.yaml`. The agent
 * copies this directory into every OS it installs (steps/common.ts, carryAgentFiles).
 *
 * Upgrading an agent = replacing the directory (a new runtime tarball unpacked beside it, then
 * renamed over it) and restarting the unit; the next OS it installs gets the new one.
 */
import { createHash } from 'node:crypto';
import { existsSync, promises as fsp, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { scError } from '../../shared/errors.js';
import { run } from './exec.js';

/** Where the runtime lives on a host. */
export const RUNTIME_DIR = '/opt/stagecoach';

/** The project's root (the directory with package.json and package-lock.json). */
export function projectRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'package-lock.json'))) return dir;
    const up = dirname(dir);
    if (up === dir) throw scError('SC_ERR_INTERNAL', 'cannot find the project root');
    dir = up;
  }
}

/**
 * Lays out the agent's runtime in `dir` (which becomes RUNTIME_DIR on the host): the compiled
 * project's `dist/`, its production dependencies (installed once per lock file into `cache`,
 * copied from there) and this Node binary. Throws SC_ERR_BAD_CONFIG when `dist/` was not
 * built (`npm run build`).
 */
export async function layRuntime(cache: string, dir: string, log: (l: string) => void = () => {}): Promise<void> {
  const root = projectRoot();
  if (!existsSync(join(root, 'dist/services/cli/main.js'))) throw scError('SC_ERR_BAD_CONFIG', `${root}/dist is not built: run npm run build first`);
  const lock = readFileSync(join(root, 'package-lock.json'));
  const modules = join(cache, 'runtime', `modules-${createHash('sha256').update(lock).digest('hex').slice(0, 16)}`);
  if (!existsSync(join(modules, '.complete'))) await installModules(root, modules, log);
  await fsp.rm(dir, { recursive: true, force: true });
  await fsp.mkdir(join(dir, 'bin'), { recursive: true });
  await fsp.mkdir(join(dir, 'app'), { recursive: true });
  await fsp.copyFile(process.execPath, join(dir, 'bin/node'));
  await fsp.chmod(join(dir, 'bin/node'), 0o755);
  await fsp.copyFile(join(root, 'package.json'), join(dir, 'app/package.json'));
  await run(['cp', '-a', join(root, 'dist'), join(dir, 'app/dist')]);
  // Copied, not hardlinked: proofs running side by side would change the shared inodes' ctime
  // (each link and unlink does) while the other's tar reads them ("file changed as we read it").
  await run(['cp', '-a', join(modules, 'node_modules'), join(dir, 'app/node_modules')]);
}

/**
 * Installs the production dependencies into `modules`, safely when several proofs start at once
 * (they share the cache): each installs into its own temporary directory, marks it complete and
 * renames it into place; the first rename wins and a later one finds the directory complete.
 */
async function installModules(root: string, modules: string, log: (l: string) => void): Promise<void> {
  log('runtime: installing the production dependencies…');
  const tmp = `${modules}.tmp-${process.pid}-${Date.now()}`;
  await fsp.mkdir(tmp, { recursive: true });
  try {
    // Without its scripts: `prepare` builds from sources this directory does not have.
    const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as Record<string, unknown>;
    delete pkg.scripts;
    await fsp.writeFile(join(tmp, 'package.json'), `${JSON.stringify(pkg, null, 2)}\n`);
    await fsp.copyFile(join(root, 'package-lock.json'), join(tmp, 'package-lock.json'));
    await run(['npm', 'ci', '--omit=dev', '--no-audit', '--no-fund'], { cwd: tmp, env: process.env, timeoutMs: 15 * 60_000 });
    await fsp.writeFile(join(tmp, '.complete'), '');
    // A directory without the mark is what an interrupted older install left: never another
    // proof's work (which is always complete when it appears under this name).
    if (existsSync(modules) && !existsSync(join(modules, '.complete'))) await fsp.rm(modules, { recursive: true, force: true });
    await fsp.rename(tmp, modules).catch((err: NodeJS.ErrnoException) => {
      if (!existsSync(join(modules, '.complete'))) throw err;
    });
  } finally {
    await fsp.rm(tmp, { recursive: true, force: true });
  }
}

/**
 * Builds an install tarball (`.tar.zst`, paths relative to `/`) of what an operator puts on a
 * host to start its agent: the runtime at RUNTIME_DIR plus `files` (path → [mode, content]).
 */
export async function buildInstallTarball(cache: string, out: string, files: Record<string, [number, string]>, log: (l: string) => void = () => {}): Promise<{ tarball: string; bytes: number }> {
  const stage = `${out}.d`;
  await fsp.rm(stage, { recursive: true, force: true });
  await layRuntime(cache, join(stage, RUNTIME_DIR), log);
  for (const [path, [mode, content]] of Object.entries(files)) {
    const p = join(stage, path);
    await fsp.mkdir(dirname(p), { recursive: true });
    await fsp.writeFile(p, content, { mode });
    await fsp.chmod(p, mode);
  }
  await run(['tar', '--zstd', '--numeric-owner', '--owner=0', '--group=0', '-cf', out, '-C', stage, '.']);
  await fsp.rm(stage, { recursive: true, force: true });
  const bytes = (await fsp.stat(out)).size;
  log(`install tarball: ${(bytes / 2 ** 20).toFixed(1)} MiB (runtime, config, keys, unit)`);
  return { tarball: out, bytes };
}

/** The agent's systemd unit as deployed: infra/systemd/stagecoach-agent.service. */
export function agentUnit(): string {
  return readFileSync(join(projectRoot(), 'infra/systemd/stagecoach-agent.service'), 'utf8');
}
