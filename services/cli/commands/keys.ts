/**
 * `stagecoach keys gen --out DIR`: the key material of a fleet, in one directory (files, modes
 * and the never-overwrite rule: shared/keys.ts).
 */
import type { Command } from 'commander';
import { generateKeys } from '../../../shared/keys.js';
import { action, printJson } from '../util.js';

/** Registers `stagecoach keys gen`. */
export function register(program: Command): void {
  const keys = program.command('keys').description('Generate release, control and fleet keys');
  keys
    .command('gen')
    .description('Write release.key/.pub, control.key/.pub (ed25519 PEM) and fleet.age/.age.pub (age X25519) into a directory')
    .requiredOption('--out <dir>', 'output directory (created if missing; existing key files are never overwritten)')
    .option('--json', 'print paths, key ids and the fleet recipient as JSON')
    .action(
      action(async (flags: { out: string; json?: boolean }) => {
        const r = await generateKeys(flags.out);
        if (flags.json) {
          printJson(r);
          return;
        }
        process.stdout.write(
          [
            `wrote ${r.dir}:`,
            `  release.key, release.pub   manifest signing key, id ${r.keyIds.release}`,
            `  control.key, control.pub   step-job signing key, id ${r.keyIds.control}`,
            '  fleet.age, fleet.age.pub   bundle encryption identity and recipient',
            `fleet recipient: ${r.recipient}`,
            'keep *.key and fleet.age secret (mode 0600); distribute *.pub and fleet.age.pub.',
            '',
          ].join('\n'),
        );
      }),
    );
}
