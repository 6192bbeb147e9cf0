/**
 * `stagecoach tls gen`: a private CA and a server certificate (shared/tls-gen.ts).
 */
import type { Command } from 'commander';
import { scError } from '../../../shared/errors.js';
import { generateTls } from '../../../shared/tls-gen.js';
import { action, printJson, splitList } from '../util.js';

/** Registers `stagecoach tls`. */
export function register(program: Command): void {
  const tls = program.command('tls').description('TLS for a fleet without its own PKI');
  tls
    .command('gen')
    .description('Make a private CA (ca.crt, ca.key) and a server certificate signed by it (server.crt, server.key)')
    .requiredOption('--out <dir>', 'output directory (created 0700; refused when not empty)')
    .option('--host <names>', 'comma-separated DNS names and IP addresses the servers answer on', 'localhost,127.0.0.1,::1')
    .option('--days <n>', 'validity of the server certificate in days (the CA: four times as long)', '825')
    .option('--json', 'print the file paths as JSON')
    .action(
      action(async (f: { out: string; host: string; days: string; json?: boolean }) => {
        const days = Number(f.days);
        if (!Number.isInteger(days) || days < 1 || days > 3650) throw scError('SC_ERR_BAD_REQUEST', '--days must be an integer from 1 to 3650');
        const g = await generateTls(f.out, splitList(f.host), days);
        if (f.json) return printJson(g);
        process.stdout.write(
          `CA:     ${g.ca} (clients: --ca ${g.ca})\nCA key: ${g.caKey} (keep it offline)\nserver: ${g.cert} + ${g.key} (servers: --tls-cert, --tls-key) for ${g.hosts.join(', ')}\n`,
        );
      }),
    );
}
