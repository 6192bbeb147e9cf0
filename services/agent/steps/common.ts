/**
 * What several steps share: reading their job arguments, the carried configuration, installing
 * a bundle onto a partition, and booting into a device with a one-shot entry.
 */
import { refString } from '../../../shared/protocol/index.js';
import { execFile } from 'node:child_process';
import { mkdir, readFile, rm, stat, symlink } from 'node:fs/promises';
import { promisify } from 'node:util';
import { dirname } from 'node:path';
import { Transform } from 'node:stream';
import { type ErrorCode, isScError, type ScError, scError } from '../../../shared/errors.js';
import { type Manifest, manifestDigest } from '../../../shared/manifest.js';
import { fingerprint, parseCarryConfig } from '../carry/index.js';
import type { CarryConfig } from '../carry/types.js';
import { readInside, resolveInside, writeInside } from '../carry/rootfs.js';
import { render } from '../carry/index.js';
import type { NetFormat } from '../../../shared/manifest.js';
import type { BundleRef } from '../../../shared/protocol/index.js';
import type { MachineDriver } from '../machine/driver.js';
import { unpackFile, type WriteMark } from '../../../shared/bundle/unpack-file.js';
import { type BundleDir, KeptStore, parseBundleRef } from '../bundles.js';
import type { StepContext } from './step.js';

const execFileP = promisify(execFile);

/** A failure that retrying cannot fix: the worker fails the job without using its remaining attempts. */
export function permanent(code: ErrorCode, message: string, details?: Record<string, unknown>): ScError {
  return scError(code, message, { ...details, permanent: true });
}

/** True for an error made by `permanent`, or whose code can never be cured by a retry. */
export function isPermanent(err: unknown): boolean {
  const e = err as { code?: string; details?: { permanent?: boolean } };
  if (e?.details?.permanent) return true;
  return (
    e?.code === 'SC_ERR_JOB_REJECTED' ||
    e?.code === 'SC_ERR_ABORTED' ||
    e?.code === 'SC_ERR_BOOT_FAILED' ||
    e?.code === 'SC_ERR_BAD_SIGNATURE' ||
    e?.code === 'SC_ERR_UNTRUSTED_KEY' ||
    e?.code === 'SC_ERR_DECRYPT' ||
    e?.code === 'SC_ERR_UNSAFE_ARCHIVE' ||
    e?.code === 'SC_ERR_NO_SPACE' ||
    e?.code === 'SC_ERR_UNSUPPORTED_XATTR' ||
    e?.code === 'SC_ERR_BUNDLE_TOO_LARGE' ||
    e?.code === 'SC_ERR_BAD_MANIFEST' ||
    e?.code === 'SC_ERR_BAD_NAME' ||
    e?.code === 'SC_ERR_BAD_VERSION' ||
    e?.code === 'SC_ERR_BAD_REQUEST'
  );
}

/** `args.base` of the job. */
export function baseArg(ctx: StepContext): BundleRef {
  return parseBundleRef(ctx.payload.args.base, 'base');
}

/** `args.target` of the job, or null when absent. */
export function targetArg(ctx: StepContext): BundleRef | null {
  return ctx.payload.args.target === undefined ? null : parseBundleRef(ctx.payload.args.target, 'target');
}

/** The kept store; a permanent SC_ERR_CONFLICT when disk 2 is not laid out (the sequence cannot work on this machine). */
export async function keptStore(ctx: StepContext): Promise<KeptStore> {
  const k = await KeptStore.tryOpen(ctx.driver);
  if (!k) throw permanent('SC_ERR_CONFLICT', 'disk2p2 has no filesystem: this host was never converted (no rescue OS, no kept bundles)');
  return k;
}

/** The carried configuration from disk2p2; permanent SC_ERR_CONFLICT when capture-config never ran. */
export async function carried(k: KeptStore): Promise<CarryConfig> {
  const raw = await k.readCarry();
  if (raw === null) throw permanent('SC_ERR_CONFLICT', 'no carried configuration on disk2p2 (capture-config has not run)');
  return parseCarryConfig(raw);
}

/** The target bundle of a job: `args.target`, else the kept target (reinstall). */
export async function targetRef(ctx: StepContext, k: KeptStore): Promise<BundleRef> {
  const t = targetArg(ctx) ?? (await k.readKept()).target;
  if (!t) throw permanent('SC_ERR_CONFLICT', 'no target bundle: none in the job and none kept on disk2p2');
  return parseBundleRef(t, 'target');
}

/** A kept bundle's verified manifest; permanent SC_ERR_CONFLICT when it is not (completely) on disk2p2. */
export async function keptManifest(ctx: StepContext, k: KeptStore, ref: BundleRef): Promise<Manifest> {
  const m = await k.bundles.find(ref, ctx.trusted);
  if (!m) throw permanent('SC_ERR_CONFLICT', `bundle ${refString(ref)} is not kept on disk2p2`);
  return m;
}

/** The IPv4 address (no prefix) the host must keep: the first address of the carried first interface. */
export function carriedIp(cfg: CarryConfig): string | null {
  return cfg.interfaces[0]?.addresses[0]?.split('/')[0] ?? null;
}

/** Fingerprints of the carried host keys, by type. */
export function carriedFingerprints(cfg: CarryConfig): Record<string, string> {
  return Object.fromEntries(cfg.hostKeys.map((k) => [k.type, fingerprint(k.public)]));
}

/** True when every file the carried config renders for `fmt` is already on `root` with that content. */
export async function configInPlace(root: string, cfg: CarryConfig, fmt: NetFormat): Promise<boolean> {
  for (const f of render(cfg, fmt)) {
    if ((await readInside(root, f.path).catch(() => null)) !== f.content) return false;
  }
  return true;
}

/** True when `device` holds bundle `m`, completely installed (driver marker and our record agree). */
export async function installedHere(ctx: StepContext, k: KeptStore, device: string, m: Manifest): Promise<boolean> {
  const os = await ctx.driver.installedOs(device);
  return !!os?.complete && (await k.installed(device)) === manifestDigest(m);
}

/**
 * Installs bundle `m` from `dir` onto `device`: forget any earlier record, format the device
 * (whatever a crashed earlier run left is gone), stream blob → age → decompress → safe tar into
 * it, with the blob's sha256 checked in the same pass (shared/bundle/unpack-file.ts). Then
 * `afterUnpack` (install-target applies the config there), the agent's files, and last the
 * driver marker and our record: only a verified tree is ever marked installed.
 *
 * Bytes that fail the signed digest, or any other failed unpack, wipe the device again, so no
 * half tree (and no tree from bad bytes) can look like an OS: SC_ERR_DIGEST_MISMATCH is
 * permanent (a local file does not get better on a retry).
 *
 * `follow` unpacks a file (open descriptor `file`) while a writer that hashes what it writes
 * (the kept copy of install-base) is still making it: `verifiedBy` is that writer's promise, and
 * the tree counts only once it resolved. `progress` replaces the default progress report (bytes of this blob).
 */
export async function installBundle(
  ctx: StepContext,
  k: KeptStore,
  dir: BundleDir,
  m: Manifest,
  device: string,
  opts: {
    hookPoint: string;
    follow?: { file: number; mark: WriteMark; verifiedBy: Promise<unknown> };
    signal?: AbortSignal;
    progress?: (bytes: number) => void;
    afterUnpack?: (root: string) => Promise<void>;
  },
): Promise<{ entries: number }> {
  await k.setInstalled(device, null);
  await ctx.driver.mkfs(device);
  const root = await ctx.driver.mountPath(device);
  let n = 0;
  let half = false;
  const size = m.blob.size;
  const progress = opts.progress ?? ((bytes: number) => ctx.progress({ bytes, total: size }));
  const meter = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      n += chunk.length;
      progress(n);
      if (!half && n >= size / 2) {
        half = true;
        ctx.crashPoint(opts.hookPoint);
      }
      cb(null, chunk);
    },
  });
  let res: { entries: number };
  try {
    const file = opts.follow?.file ?? dir.blobPath(m.blob.digest);
    res = await unpackFile(file, m.blob, {
      dir: root,
      identities: ctx.identities,
      signal: opts.signal ?? ctx.signal,
      meter: () => meter,
      verified: opts.follow !== undefined,
      follow: opts.follow?.mark,
      workerMinBytes: ctx.unpackWorkerMinBytes,
    });
    await opts.follow?.verifiedBy;
  } catch (err) {
    // Never leave a half-unpacked tree, or one from bytes that failed, that could look like an OS.
    await ctx.driver.wipe(device).catch(() => {});
    if (isScError(err, 'SC_ERR_DIGEST_MISMATCH')) throw permanent('SC_ERR_DIGEST_MISMATCH', `${refString(m)}: the blob does not match its signed digest`, err.details);
    throw err;
  }
  const os = await ctx.driver.installedOs(device);
  if (!os) {
    await ctx.driver.wipe(device).catch(() => {});
    throw permanent('SC_ERR_BAD_MANIFEST', `${refString(m)} holds no etc/os-release: it is not an OS root filesystem`);
  }
  if (os.id !== m.os.id || os.version !== m.os.version) {
    await ctx.log(`note: ${refString(m)} says ${m.os.id} ${m.os.version}, its os-release says ${os.id} ${os.version}`);
  }
  if (opts.afterUnpack) await opts.afterUnpack(root);
  await carryAgentFiles(ctx, root);
  await ctx.driver.markInstalled(device, { id: os.id, version: os.version, netFormat: m.os.netFormat });
  await k.setInstalled(device, m);
  return { entries: res.entries };
}

/**
 * Installs the agent into the OS at `root`, so that it starts there after the reboot and the
 * sequence resumes (linux only: a sim machine's agent runs outside the machine). Each of
 * StepContext.agentFiles is copied to the same path inside `root`, with its mode:
 * - a file (config, keys, identity, relay token) as it is;
 * - a directory (the runtime: Node and the compiled project, /opt/stagecoach) as a whole tree,
 *   replacing what was there, symlinks verbatim;
 * - a systemd unit under /etc/systemd/system is also enabled (multi-user.target.wants link).
 * Paths are resolved chroot-style, so nothing is written outside `root`.
 */
export async function carryAgentFiles(ctx: Pick<StepContext, 'driver' | 'agentFiles'>, root: string): Promise<string[]> {
  if (ctx.driver.kind !== 'linux') return [];
  const done: string[] = [];
  for (const f of ctx.agentFiles) {
    const st = await stat(f).catch(() => null);
    if (st?.isDirectory()) {
      const dest = await resolveInside(root, f, false);
      await rm(dest, { recursive: true, force: true });
      await mkdir(dirname(dest), { recursive: true });
      // cp(1): thousands of small files (node_modules) copy several times faster than through fs.cp.
      await execFileP('cp', ['-a', '--no-target-directory', f, dest]);
      done.push(f);
      continue;
    }
    if (!st?.isFile()) continue;
    await writeInside(root, f, await readFile(f, 'utf8'), st.mode & 0o777);
    const unit = /^\/etc\/systemd\/system\/([A-Za-z0-9@._-]+\.service)$/.exec(f);
    if (unit) {
      const link = await resolveInside(root, `/etc/systemd/system/multi-user.target.wants/${unit[1]}`, false);
      await mkdir(dirname(link), { recursive: true });
      await rm(link, { force: true });
      await symlink(f, link);
    }
    done.push(f);
  }
  return done;
}

/**
 * Something that changes at every boot of the machine: the kernel's boot_id on Linux, the
 * reboot counter on a sim machine. Compared, never interpreted.
 */
export async function bootIdentity(driver: MachineDriver): Promise<string> {
  if (driver.kind === 'linux') {
    const id = (await readFile('/proc/sys/kernel/random/boot_id', 'utf8').catch(() => '')).trim();
    if (id) return `boot_id:${id}`;
  }
  return `reboots:${(await driver.inspect()).reboots}`;
}

/** What a boot step expects to find running after its reboot. */
export interface BootExpectation {
  device: string;
  /** Checked once running from `device`; returns a problem or null. */
  verify(ctx: StepContext): Promise<string | null>;
}

/**
 * The reboot half of boot-base, boot-target and rescue. Called when the step's effect is not
 * in place. Three cases, told apart by the boot attempt recorded on disk2p2:
 * - no attempt for this job, or one recorded in this same boot (the agent died between
 *   recording and rebooting): set the one-shot entry, record the attempt with the current boot
 *   identity, reboot. The one-shot entry means a failed boot falls back to
 *   the default entry: the machine is never left without a bootable OS.
 * - an attempt for this job and the machine booted since (another boot identity), but is not running the device:
 *   the firmware fell back. The attempt is cleared and the step fails with SC_ERR_BOOT_FAILED
 *   (permanent: retrying blindly is not what an operator wants; control decides).
 * - running the device but its checks fail: SC_ERR_BOOT_FAILED with the problem.
 */
export async function bootInto(ctx: StepContext, k: KeptStore, exp: BootExpectation): Promise<never | { booted: string }> {
  const job = `${ctx.payload.rollout}.${ctx.payload.seq}.${ctx.payload.step}`;
  const running = await ctx.driver.running();
  const attempt = await k.readBootAttempt();
  const bootId = await bootIdentity(ctx.driver);
  if (running.device === exp.device) {
    const problem = await exp.verify(ctx);
    if (attempt) await k.clearBootAttempt();
    if (problem) throw permanent('SC_ERR_BOOT_FAILED', `running from ${exp.device}, but ${problem}`);
    return { booted: exp.device };
  }
  if (attempt && attempt.job === job && attempt.device === exp.device && bootId !== attempt.bootId) {
    await k.clearBootAttempt();
    throw permanent('SC_ERR_BOOT_FAILED', `the boot from ${exp.device} failed: the machine came back on ${running.device} (${running.id} ${running.version})`, {
      device: exp.device,
      running,
    });
  }
  await ctx.driver.setBootOnce(exp.device);
  await k.writeBootAttempt({ job, device: exp.device, bootId, at: new Date(ctx.now()).toISOString() });
  await ctx.log(`booting ${exp.device} once`);
  return ctx.reboot();
}

/** Identity checks after a boot: same IP as carried, and (optionally) the same host keys. */
export async function identityProblem(ctx: StepContext, cfg: CarryConfig, keysToo: boolean): Promise<string | null> {
  const ins = await ctx.driver.inspect();
  const ip = carriedIp(cfg);
  if (ip && ins.ip !== ip) return `the IP is ${ins.ip ?? 'none'}, expected ${ip}`;
  if (keysToo) {
    const want = carriedFingerprints(cfg);
    for (const [type, fp] of Object.entries(want)) {
      if (ins.hostKeyFingerprints[type] !== fp) return `the ${type} host key is ${ins.hostKeyFingerprints[type] ?? 'missing'}, expected ${fp}`;
    }
  }
  return null;
}

/** The OS expected on `device` from what was installed there; a problem string or null. */
export async function runningInstalledProblem(ctx: StepContext, device: string): Promise<string | null> {
  const r = await ctx.driver.running();
  const os = await ctx.driver.installedOs(device);
  if (!os?.complete) return `${device} holds no completely installed OS`;
  if (r.id !== os.id || r.version !== os.version) return `running ${r.id} ${r.version}, but ${device} holds ${os.id} ${os.version}`;
  return null;
}
