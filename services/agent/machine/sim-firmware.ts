/**
 * The sim machine's firmware: which device boots (simBoot), the boot log, and boot faults.
 *
 * Boot semantics (simBoot): the candidates are the one-shot entry (consumed whether or not it
 * boots), then the default entry, then the rescue entry. A candidate fails when a fail-boot
 * fault is set for it or when it has no bootable OS (no filesystem, or no etc/os-release with an
 * ID); the next one is tried. None bootable: the machine is `down`. SimMachine.reboot() only
 * records the reboot (counter, pending flag, running = rebooting) and ends the agent through the
 * exit action; whoever (re)starts the agent calls `simBoot(dir)` first.
 */
import { scError } from '../../../shared/errors.js';
import type { RunningOs } from './driver.js';
import { readOsReleaseAt } from './os.js';
import {
  type BootRecord,
  cleanLeftovers,
  logAction,
  partitionOf,
  paths,
  readSimRunning,
  readSimState,
  type SimRunning,
  type SimState,
  simStateSchema,
  splitDevice,
  updateState,
  withLock,
  writeJsonAtomic,
} from './sim-state.js';

const BOOT_LOG_MAX = 50;

async function bootableOs(dir: string, s: SimState, device: string): Promise<{ ok: true; id: string; version: string } | { ok: false; reason: string }> {
  let where: { disk: string; part: string; p: { filesystem: string | null } };
  try {
    where = partitionOf(s, device);
  } catch {
    return { ok: false, reason: 'no such partition' };
  }
  if (!where.p.filesystem) return { ok: false, reason: 'no filesystem' };
  const rel = await readOsReleaseAt(paths(dir).part(where.disk, where.part));
  if (!rel) return { ok: false, reason: 'no bootable OS (no etc/os-release)' };
  return { ok: true, id: rel.ID, version: rel.VERSION_ID ?? '' };
}

/** What one run of the firmware did. `booted` is false when nothing was pending (no-op). */
export interface SimBootResult {
  booted: boolean;
  running: RunningOs | null;
  fellBack: boolean;
  record: BootRecord | null;
}

/**
 * The sim firmware: boots the machine if a reboot is pending or it is not running (or always
 * with `force`, a power cycle), and writes running.json. One-shot entry first (consumed), then
 * default, then rescue; a candidate with a fail-boot fault or without an OS is skipped (a
 * `once` fault is consumed when it fails a boot). Returns {booted: false} when the machine was
 * already running and nothing was pending, so a supervisor can call it on every (re)start.
 */
export async function simBoot(dir: string, opts: { force?: boolean } = {}): Promise<SimBootResult> {
  return withLock(dir, async () => {
    await cleanLeftovers(dir);
    const s = await readSimState(dir);
    const cur = await readSimRunning(dir);
    if (!opts.force && !s.pendingReboot && cur.state === 'running') {
      return { booted: false, running: { id: cur.id, version: cur.version, device: cur.device }, fellBack: false, record: null };
    }
    const candidates = [...new Set([s.boot.once, s.boot.default, s.boot.rescue].filter((d): d is string => d !== null))];
    const tried: BootRecord['tried'] = [];
    let running: RunningOs | null = null;
    for (const device of candidates) {
      const fault = s.faults.failBoot[device];
      if (fault) {
        tried.push({ device, ok: false, reason: `fail-boot fault (${fault})` });
        if (fault === 'once') delete s.faults.failBoot[device];
        continue;
      }
      const b = await bootableOs(dir, s, device);
      if (!b.ok) {
        tried.push({ device, ok: false, reason: b.reason });
        continue;
      }
      tried.push({ device, ok: true });
      running = { id: b.id, version: b.version, device };
      break;
    }
    const at = new Date().toISOString();
    s.boots += 1;
    s.boot.once = null;
    s.pendingReboot = false;
    const record: BootRecord = { boot: s.boots, at, tried, booted: running?.device ?? null };
    s.bootLog = [...s.bootLog, record].slice(-BOOT_LOG_MAX);
    await writeJsonAtomic(paths(dir).state, simStateSchema.parse(s));
    const r: SimRunning = running
      ? { state: 'running', ...running, boot: s.boots, at }
      : { state: 'down', at, reason: tried.length ? tried.map((t) => `${t.device}: ${t.reason}`).join('; ') : 'no boot entry' };
    await writeJsonAtomic(paths(dir).running, r);
    await logAction(dir, 'boot', { boot: s.boots, booted: record.booted, tried });
    return { booted: true, running, fellBack: running !== null && running.device !== candidates[0], record };
  });
}

/** True when the machine has been told to reboot and the firmware has not run since. */
export async function simRebootPending(dir: string): Promise<boolean> {
  return (await readSimState(dir)).pendingReboot;
}

/**
 * Sets a fault: `fail-boot` makes boots from `device` fail (the firmware falls back to the
 * next entry) until cleared, or only the next such boot with `mode: 'once'`.
 */
export async function simFault(dir: string, fault: 'fail-boot', device: string, mode: 'always' | 'once' = 'always'): Promise<void> {
  if (fault !== 'fail-boot') throw scError('SC_ERR_BAD_REQUEST', `unknown fault ${JSON.stringify(String(fault).slice(0, 40))}`);
  splitDevice(device);
  await updateState(dir, (s) => {
    s.faults.failBoot[device] = mode;
    return [true, undefined];
  });
  await logAction(dir, 'fault', { fault, device, mode });
}

/** Clears every fault. */
export async function simClearFaults(dir: string): Promise<void> {
  await updateState(dir, (s) => {
    const had = Object.keys(s.faults.failBoot).length > 0;
    s.faults.failBoot = {};
    return [had, undefined];
  });
  await logAction(dir, 'clear-faults');
}
