/**
 * `stagecoach`: one binary, one subcommand per file under ./commands. Service subcommands
 * start servers; client subcommands talk to services through their typed clients.
 */
import { Command } from 'commander';
import pkg from '../../package.json' with { type: 'json' };

const program = new Command('stagecoach')
  .description('Swap the operating system of remote servers, safely, over the network.')
  .version(pkg.version)
  .showHelpAfterError()
  .enablePositionalOptions();

// Each module registers one command (or a group). Keep this list in the order of `--help`.
const modules = [
  './commands/keys.js',
  './commands/origin.js',
  './commands/publish.js',
  './commands/bundles.js',
  './commands/get.js',
  './commands/stage.js',
  './commands/machine.js',
  './commands/agent.js',
  './commands/control.js',
  './commands/rollout.js',
  './commands/hosts.js',
  './commands/demo.js',
];

for (const m of modules) {
  try {
    const mod = (await import(m)) as { register(p: Command): void };
    mod.register(program);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ERR_MODULE_NOT_FOUND' || !String((err as Error).message).includes(m.slice(11, -3))) throw err;
  }
}

await program.parseAsync(process.argv);
