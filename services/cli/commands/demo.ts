/** `stagecoach demo`: a local fleet (origin, stages, control, sim hosts) converted end to end. */
import type { Command } from 'commander';
import { scError } from '../../../shared/errors.js';
import { action } from '../util.js';

/** Registers `stagecoach demo`. */
export function register(program: Command): void {
  program
    .command('demo')
    .description('Run a local fleet: origin, a stage per colo, control, sim hosts; publish B and C and convert every host')
    .option('--exit', 'stop when done (exit 1 if any host failed) instead of staying up until Ctrl-C')
    .option('--colos <n>', 'number of colos', '2')
    .option('--hosts <n>', 'sim hosts in all, spread over the colos', '6')
    .option('--bundle-mib <n>', 'filler size of each sample root filesystem, MiB', '4')
    .option('--dir <dir>', 'keep everything in this directory (default: a temp dir, removed at the end)')
    .option('--keep', 'keep the temp dir')
    .option('--log-level <level>', 'service log level (silent, error, warn, info, debug)', 'warn')
    .action(
      action(async (f: { exit?: boolean; colos: string; hosts: string; bundleMib: string; dir?: string; keep?: boolean; logLevel: string }) => {
        const { runDemo } = await import('../../demo/demo.js');
        const n = (s: string, what: string, max: number) => {
          const v = Number(s);
          if (!Number.isInteger(v) || v < 1 || v > max) throw scError('SC_ERR_BAD_CONFIG', `--${what} must be an integer from 1 to ${max}`);
          return v;
        };
        process.exitCode = await runDemo({
          exit: Boolean(f.exit),
          colos: n(f.colos, 'colos', 26),
          hosts: n(f.hosts, 'hosts', 10_000),
          bundleMiB: n(f.bundleMib, 'bundle-mib', 4096),
          dir: f.dir,
          keep: Boolean(f.keep),
          logLevel: f.logLevel,
        });
      }),
    );
}
