/**
 * `stagecoach`: one binary, one subcommand per file under ./commands. Service subcommands
 * start servers; client subcommands talk to services through their typed clients.
 */
import { Command, type CommanderError } from 'commander';
import pkg from '../../package.json' with { type: 'json' };
import { isScError, scError } from '../../shared/errors.js';
import { trustCa } from '../../shared/tls.js';
import { COMMAND_MODULES as modules } from './commands/index.js';
import { loadProfile, PROFILE_VARS } from './defaults.js';
import { collect, printError } from './util.js';

const program = new Command('stagecoach')
  .description('Swap the operating system of remote servers, safely, over the network.')
  .version(pkg.version)
  .enablePositionalOptions();

/**
 * Output to a closed pipe (`stagecoach hosts | head -2`) ends the command at once, quietly, with
 * exit status 0: the reader chose to stop reading, which is not a failure of the command, and 0
 * (not the shell's 141 for SIGPIPE) keeps `set -o pipefail` scripts that cut a listing short
 * working. Any other stdout error stays fatal.
 */
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(0);
  throw err;
});

/** A commander parse failure, with the command whose line it was (for its usage line). */
class ParseExit extends Error {
  constructor(
    readonly command: Command,
    readonly inner: CommanderError,
  ) {
    super(inner.message);
  }
}

/**
 * Makes commander report instead of exiting: on every command, its own error output is off
 * (configureOutput) and a parse failure is thrown (exitOverride) to `reportParseExit`.
 */
function takeOverParseErrors(c: Command): void {
  c.configureOutput({ outputError: () => {} }).exitOverride((err) => {
    throw new ParseExit(c, err);
  });
  for (const sub of c.commands) takeOverParseErrors(sub);
}

/**
 * A usage error (missing or unknown option, missing or extra argument, unknown command) prints
 * `error SC_ERR_USAGE: …` and the command's one-line usage, and exits 2. --help and --version
 * exit 0; a command group run without a subcommand has printed its help on stderr and exits 2.
 */
function reportParseExit(e: ParseExit): void {
  const { command, inner } = e;
  if (inner.exitCode === 0) return;
  process.exitCode = 2;
  if (inner.code === 'commander.help') return;
  printError(scError('SC_ERR_USAGE', inner.message.replace(/^error: /, '')));
  process.stderr.write(`usage: ${command.createHelp().commandUsage(command)}\n`);
}


/**
 * Every command that runs something takes `--ca FILE` (repeatable): the private CAs its HTTPS
 * clients trust besides the system store (shared/tls.ts), set before the command's action runs.
 */
function addTrustOption(c: Command): void {
  if (c.commands.length > 0) {
    for (const sub of c.commands) addTrustOption(sub);
    return;
  }
  if (!c.options.some((o) => o.long === '--ca')) c.option('--ca <pem>', 'trust this CA for HTTPS besides the system store; repeatable (also STAGECOACH_CA)', collect);
}

const args = process.argv.slice(2);
const sub = args.find((a) => !a.startsWith('-'));
const only = modules.find(([names]) => sub !== undefined && names.includes(sub));
// `stagecoach --version` needs no command module: it answers without loading any.
const versionOnly = sub === undefined && args.length === 1 && (args[0] === '--version' || args[0] === '-V');
try {
  // Defaults for client flags from the profile file (services/cli/defaults.ts), before any option is read.
  if (!versionOnly) loadProfile();
} catch (err) {
  printError(isScError(err) ? err : scError('SC_ERR_BAD_CONFIG', (err as Error).message));
  process.exit(1);
}
for (const [, path] of versionOnly ? [] : only ? [only] : modules) {
  const mod = (await import(path)) as { register(p: Command): void };
  mod.register(program);
}

addTrustOption(program);
program.addHelpText(
  'after',
  `\nDefaults for client flags (a flag wins over the environment, the environment over the profile
file STAGECOACH_PROFILE or ~/.config/stagecoach/profile, NAME=value lines):
${Object.entries(PROFILE_VARS)
  .map(([k, v]) => `  ${k.padEnd(30)} ${v}`)
  .join('\n')}`,
);
program.hook('preAction', (_root, command) => {
  const ca = command.opts().ca as string[] | undefined;
  if (ca?.length) trustCa(ca);
});
takeOverParseErrors(program);
try {
  await program.parseAsync(process.argv);
} catch (err) {
  if (isScError(err)) {
    printError(err);
    process.exitCode = 1;
  } else if (err instanceof ParseExit) reportParseExit(err);
  else throw err;
}
