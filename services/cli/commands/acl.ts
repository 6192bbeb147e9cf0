/**
 * `stagecoach acl gen`: the Redis ACL file (one user per agent limited to its own keys, one per
 * relay limited to its colo's queue, one for control, default user off) and each user's credentials, derived from one secret file.
 */
import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Command } from 'commander';
import { credentialUrl, generateAcl } from '../acl-gen.js';
import { formatRelayKeys, readRelaySecrets, relayToken } from '../../../shared/protocol/index.js';
import { scError } from '../../../shared/errors.js';
import { action, makeDir, printJson, readTokenFile, splitList } from '../util.js';

interface GenFlags {
  prefix: string;
  hosts?: string;
  hostsFile?: string;
  relayColos?: string;
  secretFile: string;
  out?: string;
  redisUrl: string;
  credentialsDir?: string;
  admin?: boolean;
  json?: boolean;
}

/** Registers `stagecoach acl`. */
export function register(program: Command): void {
  const acl = program.command('acl').description('Redis ACL for a fleet: per-agent users limited to their own queue keys');
  acl
    .command('gen')
    .description('Write the ACL file (Redis aclfile) and, optionally, one credentials URL file per user')
    .requiredOption('--secret-file <file>', 'secret (first line, >= 16 chars) from which every password is derived')
    .option('--prefix <p>', 'Redis key prefix of the fleet', 'stagecoach')
    .option('--hosts <h1,h2>', 'host ids')
    .option('--hosts-file <file>', 'host ids, one per line (# comments allowed)')
    .option('--relay-colos <c1,c2>', "colos whose relay stage gets a user (relay-<colo>: its colo's queue, registrations, reports)")
    .option('--out <file>', 'write the ACL file here (default: stdout)')
    .option('--redis-url <url>', 'base URL for the credential URLs', 'redis://127.0.0.1:6379')
    .option('--credentials-dir <dir>', 'write <user>.url (mode 0600) per user, to hand to agents and control')
    .option('--admin', 'also add an `admin` user with every right')
    .option('--json', 'print {acl, users:[{user, role, host?, colo?, url}]}')
    .action(
      action(async (f: GenFlags) => {
        const hosts = [...splitList(f.hosts)];
        if (f.hostsFile) {
          let text: string;
          try {
            text = readFileSync(f.hostsFile, 'utf8');
          } catch (err) {
            throw scError('SC_ERR_BAD_CONFIG', `cannot read ${f.hostsFile}: ${(err as NodeJS.ErrnoException).code}`);
          }
          for (const l of text.split('\n')) if (l.trim() && !l.trim().startsWith('#')) hosts.push(l.trim());
        }
        const secret = readTokenFile(f.secretFile);
        const { acl: text, users } = generateAcl({ prefix: f.prefix, hosts, secret, admin: f.admin, relayColos: [...splitList(f.relayColos)] });
        if (f.out) {
          writeFileSync(f.out, text, { mode: 0o640 });
          chmodSync(f.out, 0o640);
        }
        const withUrls = users.map((u) => ({ user: u.user, role: u.role, ...(u.host ? { host: u.host } : {}), ...(u.colo ? { colo: u.colo } : {}), url: credentialUrl(f.redisUrl, u.user, u.password) }));
        if (f.credentialsDir) {
          makeDir(f.credentialsDir, 0o700);
          for (const u of withUrls) writeFileSync(join(f.credentialsDir, `${u.user}.url`), `${u.url}\n`, { mode: 0o600 });
        }
        if (f.json) printJson({ acl: text, users: withUrls });
        else if (!f.out) process.stdout.write(text);
        else process.stderr.write(`wrote ${f.out} (${users.length} users)${f.credentialsDir ? ` and credentials in ${f.credentialsDir}` : ''}\n`);
      }),
    );

  acl
    .command('relay-token')
    .description("Print a host's relay token (KID.HEX, bound to its colo: see README, relay tokens); give it to the agent as --relay-token-file")
    .requiredOption('--secret-file <file>', "the fleet's relay secrets (KID:SECRET lines, current first; kept off the stages)")
    .requiredOption('--colo <colo>', "the host's colo (its token works only at that colo's relay)")
    .requiredOption('--host <id>', 'host id')
    .option('--kid <id>', 'make the token under this key id (default: the first line of the secrets file)')
    .option('--out <file>', 'write the token here (mode 0600) instead of stdout')
    .action(
      action(async (f: { secretFile: string; colo: string; host: string; kid?: string; out?: string }) => {
        const secrets = readRelaySecrets(f.secretFile);
        const secret = f.kid === undefined ? secrets[0] : secrets.find((x) => x.kid === f.kid);
        if (!secret) throw scError('SC_ERR_BAD_REQUEST', `${f.secretFile} has no key id ${f.kid}`);
        const token = relayToken(secret, f.colo, f.host);
        if (f.out) writeFileSync(f.out, `${token}\n`, { mode: 0o600 });
        else process.stdout.write(`${token}\n`);
      }),
    );

  acl
    .command('relay-key')
    .description("Print a colo's relay keys (KID:HEXKEY lines, same order as the secrets file, current first) for its stage's --relay-key-file; store them mode 0600")
    .requiredOption('--secret-file <file>', "the fleet's relay secrets (KID:SECRET lines, current first)")
    .requiredOption('--colo <colo>', "the colo whose relay gets the keys (they check only that colo's host tokens)")
    .option('--out <file>', 'write the keys here (mode 0600) instead of stdout; keep the file mode 0600 either way')
    .action(
      action(async (f: { secretFile: string; colo: string; out?: string }) => {
        const text = formatRelayKeys(readRelaySecrets(f.secretFile), f.colo);
        if (f.out) {
          writeFileSync(f.out, text, { mode: 0o600 });
          chmodSync(f.out, 0o600);
        } else process.stdout.write(text);
      }),
    );
}
