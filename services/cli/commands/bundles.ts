/** `stagecoach bundles`: list the bundles an origin (or a stage) serves. */
import type { Command } from 'commander';
import { envOption } from '../defaults.js';
import { ReadClient } from '../../origin/client.js';
import { action, printJson } from '../util.js';

/** Formats rows as left-aligned columns separated by two spaces. */
function table(rows: string[][]): string {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]))).join('  ')).join('\n');
}

/** Registers `stagecoach bundles`. */
export function register(program: Command): void {
  program
    .command('bundles')
    .description('List published bundles (works against origin or any stage)')
    .addOption(envOption('--origin <url>', 'origin (or stage) URL', 'STAGECOACH_ORIGIN', { required: true }))
    .option('--json', 'print the list as JSON')
    .action(
      action(async (flags: { origin: string; json?: boolean }) => {
        const list = await new ReadClient(flags.origin).listBundles();
        if (flags.json) {
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
      }),
    );
}
