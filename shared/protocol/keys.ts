/**
 * The Redis key layout of stagecoach's command channel, in one place. Prefix P (default
 * `stagecoach`; use `{stagecoach}` on Redis Cluster).
 *
 * Every key a host's agent or a colo's relay writes is its own (a *source*: `host.<id>` or
 * `relay.<colo>`), so that a Redis ACL can give each writer exactly its keys
 * (services/cli/acl-gen.ts): nobody writes a report or a registration for somebody else.
 *
 * Written by a direct-mode host `<id>` (agent user `agent-<id>`):
 * - `P:host.<id>:*`        BullMQ queue `host.<id>`: the host's step jobs. Consumed only by that host's agent.
 * - `P:agent:<id>`         hash: the host's registration and last heartbeat (HostRecord fields, JSON values).
 * - `P:agent:<id>:reports` stream: one entry per step event of the host (StepReport).
 *
 * Written by the relay of colo `<c>` (relay user `relay-<c>`: a stage started with `--redis`,
 * which takes the colo's jobs for hosts that have no Redis):
 * - `P:colo.<c>:*`         BullMQ queue `colo.<c>`: the step jobs of the colo's relay-mode hosts. Job ids
 *                          there end in `.<host>` (see stepJobId).
 * - `P:relay:<c>:agent:<id>`  hash: registration of a host of the colo, as its relay wrote it.
 * - `P:relay:<c>:agents`   sorted set: the colo's relay-mode hosts → when their registration was last
 *                          written (ms). Readers take membership from it; liveness is the hash's `lastSeen`.
 * - `P:relay:<c>:reports`  stream: the step events of the colo's relay-mode hosts.
 *
 * Shared, and writable by the writers above only with one command each (Redis ≥ 7 ACL selectors;
 * none of these commands can remove or read anything):
 * - `P:agents`             sorted set of direct-mode host ids (ZADD only): where control finds hosts.
 *                          Its scores are not trusted; a host's liveness is its own hash's `lastSeen`.
 * - `P:relays`             set of colos whose relay has registered hosts (SADD only).
 * - `P:report-bell`        list of sources (`host.<id>`, `relay.<c>`) with new reports (LPUSH only):
 *                          wakes control; a lost or forged ring costs at most a read.
 *
 * Written by control, read by the writers:
 * - `P:hostctl:<id>`       hash: `abort` = rollout id to stop at the next step boundary.
 *
 * Control's own keys (rollouts, its leader lease) are under the same prefix and are named by
 * control (services/control/rollouts/model.ts and store.ts); BullMQ names the keys under each
 * queue. A host's route (its own queue or its colo's) follows from who wrote its registration
 * (records.ts readRoutes).
 */
import { scError } from '../errors.js';
import { NAME_RE } from '../names.js';

/** Host ids follow the bundle-name rule: `[a-z0-9][a-z0-9._-]{0,63}`. */
export const HOST_ID_RE = NAME_RE;

/** Redis key names under a prefix (see the top of this file). */
export function keys(prefix: string) {
  return {
    agent: (id: string) => `${prefix}:agent:${id}`,
    hostReports: (id: string) => `${prefix}:agent:${id}:reports`,
    relayAgent: (colo: string, id: string) => `${prefix}:relay:${colo}:agent:${id}`,
    relayAgents: (colo: string) => `${prefix}:relay:${colo}:agents`,
    relayReports: (colo: string) => `${prefix}:relay:${colo}:reports`,
    agents: `${prefix}:agents`,
    relays: `${prefix}:relays`,
    bell: `${prefix}:report-bell`,
    hostctl: (id: string) => `${prefix}:hostctl:${id}`,
  };
}

/** Who wrote a registration or a report: a direct-mode host, or the relay of a colo. */
export type Source = { kind: 'host'; host: string } | { kind: 'relay'; colo: string };

/** A source's name on the report bell: `host.<id>` or `relay.<colo>`. */
export function sourceName(s: Source): string {
  return s.kind === 'host' ? `host.${s.host}` : `relay.${s.colo}`;
}

/** The source a bell entry names, or null for anything else (a forged ring is dropped). */
export function parseSourceName(name: string): Source | null {
  const m = /^(host|relay)\.(.+)$/.exec(name);
  if (!m || !NAME_RE.test(m[2])) return null;
  return m[1] === 'host' ? { kind: 'host', host: m[2] } : { kind: 'relay', colo: m[2] };
}

/** The reports stream of a source. */
export function reportStreamOf(prefix: string, s: Source): string {
  const k = keys(prefix);
  return s.kind === 'host' ? k.hostReports(s.host) : k.relayReports(s.colo);
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
