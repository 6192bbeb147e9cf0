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

// Each module registers one command (or a group), keyed by the command names it adds. Keep
// this list in the order of `--help`. Only the module of the command being run is loaded, so a
// long-running service (a stage, an agent) does not carry every other command's dependencies.
const modules: [names: string[], path: string][] = [
  [['keys'], './commands/keys.js'],
  [['origin'], './commands/origin.js'],
  [['publish'], './commands/publish.js'],
  [['bundles'], './commands/bundles.js'],
  [['get'], './commands/get.js'],
  [['stage'], './commands/stage.js'],
  [['machine'], './commands/machine.js'],
  [['agent'], './commands/agent.js'],
  [['control'], './commands/control.js'],
  [['rollout'], './commands/rollout.js'],
  [['hosts', 'host'], './commands/hosts.js'],
  [['acl'], './commands/acl.js'],
  [['demo'], './commands/demo.js'],
  [['vm'], './commands/vm.js'],
];

const sub = process.argv.slice(2).find((a) => !a.startsWith('-'));
const only = modules.find(([names]) => sub !== undefined && names.includes(sub));
for (const [, path] of only ? [only] : modules) {
  const mod = (await import(path)) as { register(p: Command): void };
  mod.register(program);
}

await program.parseAsync(process.argv);
