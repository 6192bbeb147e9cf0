/**
 * `stagecoach bundles`: list the bundles an origin (or a stage) serves; `bundles rm` removes one
 * version from the origin; `bundles prune` applies a retention rule (the newest N versions per
 * name) without ever removing a bundle control says is in use. Removing a manifest frees no
 * blob bytes by itself: `stagecoach origin gc` does, once no manifest references the blob.
 */
import type { Command } from 'commander';
import { envOption } from '../defaults.js';
import { type BundleEntry, OriginClient, ReadClient } from '../../origin/client.js';
import { ControlClient, type RolloutView, ROLLOUT_FINISHED } from '../../control/client.js';
import { isScError, scError } from '../../../shared/errors.js';
import { parseName, parseVersion } from '../../../shared/names.js';
import { action, collect, printJson, readTokenFile } from '../util.js';

/** Formats rows as left-aligned columns separated by two spaces. */
function table(rows: string[][]): string {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]))).join('  ')).join('\n');
}

/** `NAME@VERSION`, validated (SC_ERR_BAD_REQUEST, SC_ERR_BAD_NAME, SC_ERR_BAD_VERSION). */
function parseRef(ref: string): { name: string; version: string } {
  const at = ref.indexOf('@');
  if (at <= 0) throw scError('SC_ERR_BAD_REQUEST', `expected NAME@VERSION, got ${JSON.stringify(ref.slice(0, 200))}`);
  return { name: parseName(ref.slice(0, at)), version: parseVersion(ref.slice(at + 1)) };
}

/** Most rollouts and host operations control's list routes return (their server-side cap). */
const CONTROL_LIST_CAP = 500;

/** Bundle refs (`name@version`) in use, each with why. */
export type InUse = Map<string, string[]>;

/**
 * The bundles control says are in use, derived from its existing read routes (control has no
 * route for this yet). A ref is in use when:
 * - a rollout that is not finished names it as base or target;
 * - a host keeps it: for every host, the rollouts that started on it, newest first, up to and
 *   including the newest one that converted it (that one laid out the disk that holds its rescue
 *   OS B and the packed C; anything older was overwritten by it; anything newer may have left
 *   B or C on the disk, so it counts too);
 * - a host operation installs it (queued or running), or installed it after the host's last
 *   conversion (the host may keep it);
 * - a host's current work (as control reports it) is a rollout or operation naming it.
 * When control's lists are at their cap, older history is out of sight and nothing can be
 * proven: SC_ERR_IN_USE_UNKNOWN.
 */
export async function bundlesInUse(control: ControlClient): Promise<InUse> {
  const inUse: InUse = new Map();
  const add = (ref: string, why: string) => {
    const list = inUse.get(ref) ?? [];
    if (!list.includes(why)) list.push(why);
    inUse.set(ref, list);
  };
  const refOf = (r: { name: string; version: string }) => `${r.name}@${r.version}`;
  const rollouts = await control.rollouts(CONTROL_LIST_CAP);
  const ops = await control.ops(CONTROL_LIST_CAP);
  if (rollouts.length >= CONTROL_LIST_CAP || ops.length >= CONTROL_LIST_CAP) {
    throw scError(
      'SC_ERR_IN_USE_UNKNOWN',
      `control lists only its newest ${CONTROL_LIST_CAP} rollouts and host operations, and has at least that many: older ones may still be kept by hosts`,
    ).withHint("remove versions one by one with 'stagecoach bundles rm' after checking them, until control has a route that lists the bundles in use");
  }
  const finished = (r: RolloutView) => ROLLOUT_FINISHED.includes(r.status.state);
  const seen = new Set<string>();
  const byHost = new Map<string, { rollout: string; at: number; base: string; target: string; converted: boolean }[]>();
  for (const r of [...rollouts].sort((a, b) => b.spec.createdAt - a.spec.createdAt)) {
    seen.add(r.spec.id);
    const base = refOf(r.spec.base);
    const target = refOf(r.spec.target);
    if (!finished(r)) {
      add(base, `rollout ${r.spec.id} is ${r.status.state}`);
      add(target, `rollout ${r.spec.id} is ${r.status.state}`);
    }
    for (const h of (await control.rollout(r.spec.id)).hosts) {
      if (h.startedAt === null && h.status !== 'converted') continue; // nothing ran on this host
      const list = byHost.get(h.host) ?? [];
      list.push({ rollout: r.spec.id, at: h.finishedAt ?? h.startedAt ?? r.spec.createdAt, base, target, converted: h.status === 'converted' });
      byHost.set(h.host, list);
    }
  }
  const convertedAt = new Map<string, number>();
  for (const [host, list] of byHost) {
    for (const e of list) {
      add(e.base, `host ${host} keeps it (rollout ${e.rollout})`);
      add(e.target, `host ${host} keeps it (rollout ${e.rollout})`);
      if (e.converted) {
        convertedAt.set(host, e.at);
        break;
      }
    }
  }
  for (const op of ops) {
    seen.add(op.id);
    if (op.kind !== 'install' || !op.bundle) continue;
    if (op.status === 'queued' || op.status === 'running') add(op.bundle, `operation ${op.id} is ${op.status}`);
    else if (op.createdAt > (convertedAt.get(op.host) ?? Number.NEGATIVE_INFINITY)) add(op.bundle, `host ${op.host} may keep it (operation ${op.id})`);
  }
  for (const h of await control.hosts()) {
    const w = h.work;
    if (!w || seen.has(w.id)) continue;
    if (w.kind === 'rollout') {
      const r = await control.rollout(w.id);
      add(refOf(r.spec.base), `host ${h.hostId} is in rollout ${w.id}`);
      add(refOf(r.spec.target), `host ${h.hostId} is in rollout ${w.id}`);
    } else {
      const op = await control.op(w.id);
      if (op.bundle) add(op.bundle, `host ${h.hostId} is in operation ${w.id}`);
    }
  }
  return inUse;
}

/** What a prune decided for one bundle. */
export interface PruneDecision {
  name: string;
  version: string;
  publishedAt: string;
  action: 'keep' | 'remove';
  /** Why it is kept: `newest` (within --keep-last) or the in-use reasons. */
  reasons: string[];
}

/**
 * The retention rule: per name (or only `onlyName`), the newest `keepLast` versions by
 * publishedAt (then version) are kept, and so is everything in `inUse`; the rest is removed.
 * Bundles of other names are not listed.
 */
export function planPrune(list: readonly BundleEntry[], keepLast: number, inUse: InUse, onlyName?: string): PruneDecision[] {
  const byName = new Map<string, BundleEntry[]>();
  for (const b of list) {
    if (onlyName !== undefined && b.name !== onlyName) continue;
    byName.set(b.name, [...(byName.get(b.name) ?? []), b]);
  }
  const out: PruneDecision[] = [];
  for (const [, group] of [...byName].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
    group.sort((a, b) => (a.publishedAt !== b.publishedAt ? (a.publishedAt < b.publishedAt ? 1 : -1) : a.version < b.version ? 1 : a.version > b.version ? -1 : 0));
    group.forEach((b, i) => {
      const reasons = [...(i < keepLast ? ['newest'] : []), ...(inUse.get(`${b.name}@${b.version}`) ?? [])];
      out.push({ name: b.name, version: b.version, publishedAt: b.publishedAt, action: reasons.length ? 'keep' : 'remove', reasons });
    });
  }
  return out;
}

interface PruneFlags {
  origin: string;
  tokenFile: string;
  keepLast: string;
  name?: string;
  dryRun?: boolean;
  control?: string;
  controlTokenFile?: string;
  forceWithoutControl?: boolean;
  json?: boolean;
}

async function runPrune(f: PruneFlags): Promise<void> {
  if (!/^\d+$/.test(f.keepLast) || Number(f.keepLast) < 1) throw scError('SC_ERR_BAD_REQUEST', `--keep-last must be a whole number of at least 1, got ${JSON.stringify(f.keepLast)}`);
  const keepLast = Number(f.keepLast);
  const onlyName = f.name === undefined ? undefined : parseName(f.name);
  if (!f.control && !f.forceWithoutControl) {
    throw scError('SC_ERR_IN_USE_UNKNOWN', 'prune needs control to know which bundles rollouts and hosts still use').withHint(
      "give --control URL and --control-token-file FILE (a read token), or --force-without-control to keep only the newest N versions and nothing else",
    );
  }
  const origin = new OriginClient(f.origin, { token: readTokenFile(f.tokenFile) });
  let inUse: InUse = new Map();
  if (f.control) {
    const control = new ControlClient(f.control, { token: f.controlTokenFile ? readTokenFile(f.controlTokenFile) : undefined });
    inUse = await bundlesInUse(control);
  }
  // The listing is read after control's answer: a version published meanwhile is newer than
  // everything, so it only pushes older ones out (and is never removed itself).
  const plan = planPrune(await origin.listBundles(), keepLast, inUse, onlyName);
  const removed: PruneDecision[] = [];
  for (const d of plan) {
    if (d.action !== 'remove') continue;
    if (!f.dryRun) {
      try {
        await origin.removeManifest(d.name, d.version);
      } catch (err) {
        if (!isScError(err, 'SC_ERR_MANIFEST_NOT_FOUND')) throw err; // removed meanwhile: fine
      }
    }
    removed.push(d);
  }
  const result = { dryRun: f.dryRun === true, keepLast, control: f.control ?? null, bundles: plan, removed: removed.map((d) => `${d.name}@${d.version}`) };
  if (f.json) {
    printJson(result);
    return;
  }
  if (!f.control) process.stderr.write('warning: --force-without-control: bundles rollouts and hosts use were not checked\n');
  for (const d of plan) {
    const what = d.action === 'remove' ? (f.dryRun ? 'would remove' : 'removed') : 'kept';
    process.stdout.write(`${what.padEnd(12)} ${d.name}@${d.version}${d.reasons.length ? `  (${d.reasons.join('; ')})` : ''}\n`);
  }
  process.stdout.write(
    `${f.dryRun ? 'would remove' : 'removed'} ${removed.length} of ${plan.length} bundle(s)${removed.length && !f.dryRun ? "; run 'stagecoach origin gc' to free their blobs" : ''}\n`,
  );
}

/** Registers `stagecoach bundles`, `bundles rm` and `bundles prune`. */
export function register(program: Command): void {
  const bundles = program
    .command('bundles')
    .description('List published bundles (works against origin or any stage); rm and prune remove them from the origin')
    .addOption(envOption('--origin <url>', 'origin (or stage) URL', 'STAGECOACH_ORIGIN'))
    .option('--json', 'print the list as JSON')
    .option('--ca <pem>', 'trust this CA for HTTPS besides the system store; repeatable (also STAGECOACH_CA)', collect);
  bundles.action(async (flags: { origin?: string; json?: boolean }, cmd: Command) => {
    // Checked here rather than by commander: a required option of this command would be
    // required by its subcommands too.
    if (flags.origin === undefined) cmd.error("error: required option '--origin <url>' not specified", { code: 'commander.missingMandatoryOptionValue' });
    await action(async (f: { origin: string; json?: boolean }) => {
      const list = await new ReadClient(f.origin).listBundles();
      if (f.json) {
        printJson(list);
        return;
      }
      if (list.length === 0) {
        process.stdout.write('no bundles\n');
        return;
      }
      const rows = [['NAME', 'VERSION', 'ROLE', 'PUBLISHED', 'MANIFEST']];
      for (const b of list) rows.push([b.name, b.version, b.role, b.publishedAt, b.manifestDigest]);
      process.stdout.write(`${table(rows)}\n`);
    })(flags as { origin: string; json?: boolean });
  });

  const originToken = () =>
    envOption('--token-file <file>', "file holding the origin's write token", 'STAGECOACH_ORIGIN_TOKEN_FILE', { required: true, fallbackEnv: 'STAGECOACH_TOKEN_FILE' });

  bundles
    .command('rm')
    .description('Remove one version from the origin (its blob is freed by the next origin gc; the version is never reused)')
    .argument('<name@version>', 'the bundle to remove')
    .addOption(envOption('--origin <url>', 'origin URL', 'STAGECOACH_ORIGIN', { required: true }))
    .addOption(originToken())
    .option('--json', 'print the result as JSON')
    .action(
      action(async (ref: string, f: { origin: string; tokenFile: string; json?: boolean }) => {
        const { name, version } = parseRef(ref);
        const origin = new OriginClient(f.origin, { token: readTokenFile(f.tokenFile) });
        const r = await origin.removeManifest(name, version);
        if (f.json) printJson(r);
        else process.stdout.write(`removed ${name}@${version} (manifest ${r.manifestDigest}); run 'stagecoach origin gc' to free blob ${r.blob.digest} once nothing references it\n`);
      }),
    );

  bundles
    .command('prune')
    .description('Keep the newest N versions of each name, and every version control says is in use; remove the rest from the origin')
    .addOption(envOption('--origin <url>', 'origin URL', 'STAGECOACH_ORIGIN', { required: true }))
    .addOption(originToken())
    .requiredOption('--keep-last <n>', 'versions to keep per name, newest by publish time (at least 1)')
    .option('--name <name>', 'prune only this bundle name')
    .option('--dry-run', 'print what would be removed, remove nothing')
    .addOption(envOption('--control <url>', 'control plane URL: asked which bundles rollouts and hosts use (required unless --force-without-control)', 'STAGECOACH_CONTROL'))
    .option('--control-token-file <file>', "control token file, read-only or write (NAME:TOKEN or TOKEN lines; the first is sent)")
    .option('--force-without-control', 'prune without asking control: a bundle a host keeps or a rollout uses may be removed')
    .option('--json', 'print the decisions as JSON')
    .action(action(async (f: PruneFlags) => runPrune(f)));
}
