/** `stagecoach agent`: runs the host agent (see README, "Agent"). */
import { type Command, Option } from 'commander';
import { runAgentCommand } from '../../agent/main.js';
import { action, collect, splitList } from '../util.js';

/** Registers the `agent` command. */
export function register(program: Command): void {
  program
    .command('agent')
    .description("Run the host agent: take this host's signed step jobs from its queue and swap the OS in two reboots")
    .option('--host-id <id>', "this host's id (queue host.<id>)")
    .option('--colo <name>', 'the colo this host lives in')
    .option('--redis <url>', 'direct mode: Redis URL (redis:// or rediss://)')
    .option('--relay <urls>', "relay mode (no Redis on the host): the colo's relay stage URLs, comma-separated, in failover order", (v: string, prev: string[] = []) => [
      ...prev,
      ...splitList(v),
    ])
    .option('--relay-token-file <file>', 'relay mode: file with this host\'s token (stagecoach acl relay-token)')
    .option('--machine <spec>', 'sim:DIR (a sim machine directory) or linux')
    .option('--stages <urls>', "the colo's stage URLs, comma-separated (probed; fastest healthy first)", (v: string, prev: string[] = []) => [
      ...prev,
      ...splitList(v),
    ])
    .option('--origin <url>', 'origin URL, the last resort after the stages')
    .option('--trust-key <pem>', 'release public key that bundle manifests must be signed with (repeatable)', collect)
    .option('--control-key <pem>', "control's public key that step jobs must be signed with")
    .option('--identity <file>', 'the fleet age identity file that decrypts bundles')
    .option('--prefix <prefix>', 'Redis key prefix (default stagecoach; {stagecoach} on Redis Cluster)')
    .option('--supervise', 'run the agent as a child process; restart it after reboots (sim firmware) and crashes')
    .option('--no-supervise', 'run the agent in this process (overrides the config file)')
    .option('--pid-file <file>', 'linux: pid file that keeps a second agent off the machine (default /run/stagecoach-agent.pid)')
    .option('--dry-run', 'linux: print the commands instead of running them')
    .option('--disk1 <dev>', 'linux: disk 1 device (default /dev/sda)')
    .option('--disk2 <dev>', 'linux: disk 2 device (default /dev/sdb)')
    .option('--boot-mode <mode>', 'linux: bios-grub or uefi (default bios-grub)')
    .option('--mount-root <dir>', 'linux: where partitions are mounted (default /mnt/stagecoach)')
    .option('--lock-duration <ms>', 'job lock duration (default 60000; renewed every half)')
    .option('--heartbeat <ms>', 'heartbeat period (default 10000)')
    .addOption(new Option('--test-hook-dir <dir>', 'tests only: crash points (see services/agent/hooks.ts)').hideHelp())
    .option('--config <file>', 'YAML config file (keys as in the README)')
    .option('--log-level <level>', 'pino log level (default info)')
    .action(
      action(async (o: Record<string, string | string[] | boolean | undefined>) => {
        const childArgs = [process.argv[1], ...process.argv.slice(2).filter((a) => a !== '--supervise'), '--no-supervise'];
        const code = await runAgentCommand(
          {
            flags: {
              hostId: o.hostId,
              colo: o.colo,
              redis: o.redis,
              relay: o.relay,
              relayTokenFile: o.relayTokenFile,
              machine: o.machine,
              stages: o.stages,
              origin: o.origin,
              trustKey: o.trustKey,
              controlKey: o.controlKey,
              identity: o.identity,
              prefix: o.prefix,
              supervise: o.supervise,
              pidFile: o.pidFile,
              dryRun: o.dryRun,
              disk1: o.disk1,
              disk2: o.disk2,
              bootMode: o.bootMode,
              mountRoot: o.mountRoot,
              lockDurationMs: o.lockDuration,
              heartbeatMs: o.heartbeat,
              testHookDir: o.testHookDir,
              logLevel: o.logLevel,
            },
            file: o.config as string | undefined,
            flagNames: { lockDurationMs: '--lock-duration', heartbeatMs: '--heartbeat' },
          },
          childArgs,
        );
        process.exitCode = code;
      }),
    );
}
