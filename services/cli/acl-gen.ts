/**
 * The Redis ACL generator behind `stagecoach acl gen` (the Redis config it goes with is
 * infra/redis/redis.conf): one user per agent, limited to its own queue and registration keys, one
 * user for control, the default user disabled. Passwords are derived from one secret
 * (HMAC-SHA256(secret, user name), base64url), so the file and every agent's credentials can be
 * regenerated at any time without storing passwords; the ACL file holds only their SHA-256
 * (`#<hex>`), never a password.
 *
 * Every key an agent or a relay writes is its own (shared/protocol/keys.ts), so nobody writes a
 * report or a registration for somebody else. The shared keys control reads them by are
 * writable with one command each, through Redis 7 ACL selectors `(~key +cmd)`: ZADD, SADD and
 * LPUSH cannot read, remove or trim anything.
 *
 * An agent user (prefix P, host id H) may touch:
 * - `P:host.H:*` and `P:host.H`   its BullMQ queue (jobs, locks, events, markers);
 * - `P:agent:H`                   its registration hash;
 * - `P:agent:H:reports`           its reports stream: XADD only;
 * - `P:agents`                    ZADD only (its id; scores are not trusted);
 * - `P:report-bell`               LPUSH only;
 * - `P:hostctl:H`                 read only (the abort flag control writes).
 * and run only data commands on them (no KEYS/SCAN, no admin, no pub/sub, no FLUSH*, no
 * SCRIPT FLUSH/KILL, no FUNCTION); scripts (EVAL/EVALSHA, how BullMQ works) are checked
 * against the same key patterns by Redis.
 *
 * A relay user (a stage running colo C's relay, services/relay/server.ts) has the same commands on:
 * - `P:colo.C:*` and `P:colo.C`   its colo's BullMQ queue (no host queue, no other colo's);
 * - `P:relay:C:agent:*`, `P:relay:C:agents`   the registrations and heartbeats of its hosts;
 * - `P:relay:C:reports`           its hosts' reports stream: XADD only;
 * - `P:relays`                    SADD only; `P:report-bell` LPUSH only;
 * - `P:hostctl:*`                 read only (abort flags, checked before a job is handed out).
 * A relay cannot write a direct-mode host's keys or another colo's: what it can claim is a host
 * in its own colo, which control then shows as conflicting if the host, or another relay, claims
 * it too (shared/protocol/records.ts).
 */
import { createHash, createHmac } from 'node:crypto';
import { HOST_ID_RE } from '../../shared/protocol/index.js';
import { scError } from '../../shared/errors.js';
import { NAME_RE } from '../../shared/names.js';

/** The command rules every agent user gets (after `-@all`). */
export const AGENT_COMMANDS = [
  '+@read',
  '+@write',
  '+@stream',
  '+@list',
  '+@hash',
  '+@sortedset',
  '+@set',
  '+@string',
  '+@keyspace',
  '+@scripting',
  '+@transaction',
  '+@blocking',
  '+@connection',
  '-@dangerous',
  '-@admin',
  '-@pubsub',
  '-keys',
  '-scan',
  '-randomkey',
  '-select',
  '-swapdb',
  '-move',
  '-copy',
  '-script|flush',
  '-script|kill',
  '-function',
  '-fcall',
  '-fcall_ro',
  '-client|kill',
  '-client|list',
  '-client|pause',
  '-client|unpause',
  '-client|no-evict',
  '-client|unblock',
  '+info',
];

/** Rules of the control user: everything on its prefix except admin/dangerous commands. */
export const CONTROL_COMMANDS = ['+@all', '-@dangerous', '-@admin', '-@pubsub', '+info', '+client|list'];

/** ACL user name of the relay of a colo. */
export function relayUser(colo: string): string {
  if (!NAME_RE.test(colo)) throw scError('SC_ERR_BAD_NAME', `bad colo ${JSON.stringify(colo.slice(0, 80))}`);
  return `relay-${colo}`;
}

/** ACL user name of an agent. */
export function agentUser(hostId: string): string {
  if (!HOST_ID_RE.test(hostId)) throw scError('SC_ERR_BAD_NAME', `bad host id ${JSON.stringify(hostId.slice(0, 80))}`);
  return `agent-${hostId}`;
}

/** The password of a user, derived from the secret. */
export function derivePassword(secret: string, user: string): string {
  if (secret.length < 16) throw scError('SC_ERR_BAD_CONFIG', 'the ACL secret must be at least 16 characters');
  return createHmac('sha256', secret).update(`stagecoach-acl:${user}`).digest('base64url');
}

/** A Redis URL with a user's credentials, from a base URL such as `redis://10.0.0.2:6379` or `rediss://…`. */
export function credentialUrl(baseUrl: string, user: string, password: string): string {
  const u = new URL(baseUrl);
  if (u.protocol !== 'redis:' && u.protocol !== 'rediss:') throw scError('SC_ERR_BAD_CONFIG', `expected redis:// or rediss://, got ${u.protocol}`);
  u.username = user;
  u.password = password;
  return u.toString();
}

function keyPattern(prefix: string, rest: string): string {
  // Glob-escape the prefix: a Cluster hash tag prefix such as {stagecoach} has no glob
  // characters, but `[`, `]`, `*`, `?` and `\` would be patterns.
  return `${prefix.replace(/[[\]*?\\]/g, (c) => `\\${c}`)}:${rest}`;
}

/** Options of `generateAcl`. */
export interface AclOptions {
  /** Key prefix (`stagecoach`, or `{stagecoach}` on a cluster). */
  prefix: string;
  hosts: string[];
  secret: string;
  /** Name of the control user (default `control`). */
  controlUser?: string;
  /** Also add an `admin` user with every right (for operators and AOF maintenance). */
  admin?: boolean;
  /** Colos whose relay (a stage with `--redis`) gets a user of its own. */
  relayColos?: string[];
}

/** One generated user and its password. */
export interface AclUser {
  user: string;
  password: string;
  role: 'agent' | 'relay' | 'control' | 'admin';
  host?: string;
  colo?: string;
}

/** The ACL file text (for `aclfile` / `--aclfile`) and every user with its password. */
export function generateAcl(o: AclOptions): { acl: string; users: AclUser[] } {
  if (!/^[A-Za-z0-9{}_.-]{1,64}$/.test(o.prefix)) throw scError('SC_ERR_BAD_CONFIG', `bad prefix ${JSON.stringify(o.prefix)}`);
  const hosts = [...new Set(o.hosts)].sort();
  const users: AclUser[] = [];
  // Redis ACL files allow no comments: every line is a user.
  const lines = ['user default off resetkeys resetchannels -@all'];
  const control = o.controlUser ?? 'control';
  users.push({ user: control, password: derivePassword(o.secret, control), role: 'control' });
  lines.push(`user ${control} on #${sha(users[0].password)} resetkeys resetchannels ~${keyPattern(o.prefix, '*')} -@all ${CONTROL_COMMANDS.join(' ')}`);
  if (o.admin) {
    const pw = derivePassword(o.secret, 'admin');
    users.push({ user: 'admin', password: pw, role: 'admin' });
    lines.push(`user admin on #${sha(pw)} ~* &* +@all`);
  }
  for (const h of hosts) {
    const user = agentUser(h);
    const pw = derivePassword(o.secret, user);
    users.push({ user, password: pw, role: 'agent', host: h });
    const keysRule = [
      `~${keyPattern(o.prefix, `host.${h}:*`)}`,
      `~${keyPattern(o.prefix, `host.${h}`)}`,
      `~${keyPattern(o.prefix, `agent:${h}`)}`,
      `%R~${keyPattern(o.prefix, `hostctl:${h}`)}`,
    ];
    const only = [
      oneCommand(keyPattern(o.prefix, `agent:${h}:reports`), 'xadd'),
      oneCommand(keyPattern(o.prefix, 'agents'), 'zadd'),
      oneCommand(keyPattern(o.prefix, 'report-bell'), 'lpush'),
    ];
    lines.push(limitedUser(user, pw, keysRule, only));
  }
  for (const c of [...new Set(o.relayColos ?? [])].sort()) {
    const user = relayUser(c);
    const pw = derivePassword(o.secret, user);
    users.push({ user, password: pw, role: 'relay', colo: c });
    const keysRule = [
      `~${keyPattern(o.prefix, `colo.${c}:*`)}`,
      `~${keyPattern(o.prefix, `colo.${c}`)}`,
      `~${keyPattern(o.prefix, `relay:${c}:agent:*`)}`,
      `~${keyPattern(o.prefix, `relay:${c}:agents`)}`,
      `%R~${keyPattern(o.prefix, 'hostctl:*')}`,
    ];
    const only = [
      oneCommand(keyPattern(o.prefix, `relay:${c}:reports`), 'xadd'),
      oneCommand(keyPattern(o.prefix, 'relays'), 'sadd'),
      oneCommand(keyPattern(o.prefix, 'report-bell'), 'lpush'),
    ];
    lines.push(limitedUser(user, pw, keysRule, only));
  }
  return { acl: `${lines.join('\n')}\n`, users };
}

/** The ACL line of an agent or relay user: only `keys`, only the agent commands; then one-command selectors. */
function limitedUser(user: string, password: string, keys: string[], selectors: string[]): string {
  return `user ${user} on #${sha(password)} resetkeys resetchannels ${keys.join(' ')} -@all ${AGENT_COMMANDS.join(' ')} ${selectors.join(' ')}`;
}

/** A Redis 7 ACL selector allowing one command on one key pattern (nothing else through it). */
function oneCommand(pattern: string, command: string): string {
  return `(~${pattern} +${command})`;
}

function sha(s: string): string {
  return createHash('sha256').update(s).digest('hex');
}
