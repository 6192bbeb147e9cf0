/**
 * The Redis key layout of stagecoach's command channel, in one place. Prefix P (default
 * `stagecoach`; use `{stagecoach}` on Redis Cluster):
 * - `P:host.<id>:*`       BullMQ queue `host.<id>`: the host's step jobs. Consumed only by that host's agent.
 * - `P:agent:<id>`        hash: the host's registration and last heartbeat (HostRecord fields, JSON values).
 * - `P:agents`            sorted set: host id → last heartbeat (ms).
 * - `P:reports`           stream: one entry per step event (StepReport), written by agents, read by control.
 * - `P:hostctl:<id>`      hash written by control, read by the agent: `abort` = rollout id to stop at the next step boundary.
 * - `P:colo.<colo>:*`     BullMQ queue `colo.<colo>`: the step jobs of the colo's hosts in relay mode (no Redis on
 *                         the host), consumed by the colo's relay (a stage started with `--redis`), which hands each
 *                         job to its host over HTTP. Job ids there end in `.<host>` (see stepJobId).
 *
 * Which queue a host's jobs go to is its route (StepRoute), read from its registration's
 *
 * Control's own keys (rollouts, its leader lease, its report-stream group) are under the same
 * prefix and are named by control (services/control/rollouts/model.ts and store.ts); BullMQ names the keys under
 * each queue.
 */
import { scError } from '../errors.js';
import { NAME_RE } from '../names.js';

/** Host ids follow the bundle-name rule: `[a-z0-9][a-z0-9._-]{0,63}`. */
export const HOST_ID_RE = NAME_RE;

/** Redis key names under a prefix. */
export function keys(prefix: string) {
  return {
    agent: (id: string) => `${prefix}:agent:${id}`,
    agents: `${prefix}:agents`,
    reports: `${prefix}:reports`,
    hostctl: (id: string) => `${prefix}:hostctl:${id}`,
  };
}

/** Queue name of a host. Throws SC_ERR_BAD_NAME for a malformed host id. */
export function hostQueueName(hostId: string): string {
  if (!HOST_ID_RE.test(hostId)) throw scError('SC_ERR_BAD_NAME', `bad host id ${JSON.stringify(hostId.slice(0, 80))}`);
  return `host.${hostId}`;
}

/** Queue name of a colo's relay queue (`colo.<colo>`). Throws SC_ERR_BAD_NAME for a malformed colo. */
export function coloQueueName(colo: string): string {
  if (!NAME_RE.test(colo)) throw scError('SC_ERR_BAD_NAME', `bad colo ${JSON.stringify(colo.slice(0, 80))}`);
  return `colo.${colo}`;
}

/**
 * The BullMQ lock token (and worker name, which BullMQ records as the job's `processedBy`) of
 * every job a direct-mode host takes: stable across its restarts and reboots.
 */
export function hostLockToken(hostId: string): string {
  return `agent:${hostId}`;
}

/** The lock token (and worker name) of every job a relay of `colo` takes: stable across relay restarts. */
export function relayLockToken(colo: string): string {
  return `relay:${colo}`;
}
