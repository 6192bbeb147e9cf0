/**
 * Crash points for tests. The crash/reboot guarantee (worker.ts) is proven by killing the agent
 * with SIGKILL at exact places: every step boundary and the middle of the long steps. A test sets
 * `testHookDir` and arms the points it wants by creating `<dir>/<point>.arm`; at an armed point
 * the agent (once per point) writes `<dir>/<point>.reached` holding its pid and then freezes its
 * whole process (the event loop included, so no byte moves and no timer fires) for up to a
 * minute, and the test kills that pid while it is frozen. Without `testHookDir` (production)
 * every point is a no-op.
 *
 * Point names: `<step>:before` (a job was taken, nothing done yet), `<step>:after` (the job was
 * completed in Redis, the next one not yet taken), `fetch:mid`, `install-base:mid`,
 * `install-target:mid` (halfway through the bytes of the step).
 */
import { closeSync, existsSync, fsyncSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';

/** The crash-point hook a worker and its steps call. Synchronous, so it works inside stream callbacks. */
export type CrashPoint = (point: string) => void;

/** A no-op crash point (production). */
export const noCrashPoints: CrashPoint = () => {};

/** How long a frozen agent waits to be killed before it carries on (a test that forgot it). */
const FREEZE_MS = 60_000;

/**
 * Crash points backed by `dir`. The first time an armed point is reached it is recorded with
 * O_EXCL (so the restarted agent passes it) and the process freezes.
 */
export function crashPoints(dir: string | undefined): CrashPoint {
  if (!dir) return noCrashPoints;
  return (point: string) => {
    if (!/^[a-z-]+:[a-z]+$/.test(point) || !existsSync(join(dir, `${point}.arm`))) return;
    let fd: number;
    try {
      fd = openSync(join(dir, `${point}.reached`), 'wx');
    } catch {
      return; // reached before: pass
    }
    writeSync(fd, String(process.pid));
    fsyncSync(fd);
    closeSync(fd);
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, FREEZE_MS);
  };
}
