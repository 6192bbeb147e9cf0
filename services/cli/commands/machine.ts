/**
 * `stagecoach machine`: create and inspect sim machines (the directory-modelled two-disk hosts
 * of tests and the demo), inject faults, run their firmware; and drive the linux driver by hand,
 * with `--dry-run` printing the commands it would run.
 */
import { readFileSync } from 'node:fs';
import type { Command } from 'commander';
import { scError } from '../../../shared/errors.js';
import type { Compression } from '../../../shared/manifest.js';
import { type MachineDriver, type MachineInspect, type PartitionSpec, RebootSignal } from '../../agent/machine/driver.js';
import { type BootMode, LinuxMachine, planUnpack, shellQuote } from '../../agent/machine/linux.js';
import { initSimMachine, readActionLog, SimMachine, type SimBootResult, simBoot, simClearFaults, simFault } from '../../agent/machine/sim.js';
import { action, printJson, splitList } from '../util.js';

function printInspect(i: MachineInspect): void {
  const out = (s: string) => process.stdout.write(`${s}\n`);
  out(`host        ${i.hostId}${i.hostname ? ` (${i.hostname})` : ''}   driver ${i.driver}   state ${i.state}`);
  out(`running     ${i.running ? `${i.running.id} ${i.running.version} from ${i.running.device}` : '-'}`);
  out(`boot        default ${i.bootDevice ?? '-'}   once ${i.bootOnce ?? '-'}   rescue ${i.rescueEntry ?? '-'}   reboots ${i.reboots}`);
  out(`network     ${i.addresses.join(', ') || '-'} via ${i.gateway ?? '-'}   mac ${i.mac ?? '-'}   (${i.netFormat ?? '?'})`);
  out(`host key    ${i.hostKeyFingerprint ?? '-'}`);
  out(`auth keys   ${i.authorizedKeys.length}`);
  for (const [disk, d] of Object.entries(i.disks)) {
    if (d.partitions.length === 0) out(`${disk.padEnd(12)}(unpartitioned)`);
    for (const p of d.partitions) {
      out(`${p.device.padEnd(12)}${p.role.padEnd(14)}${(p.filesystem ?? 'no fs').padEnd(7)}${p.os ? `${p.os.id} ${p.os.version}` : p.empty ? 'empty' : 'data'}`);
    }
  }
  const faults = (i.faults as { failBoot?: Record<string, string> }).failBoot ?? {};
  for (const [dev, mode] of Object.entries(faults)) out(`fault       fail-boot ${dev} (${mode})`);
  for (const p of i.problems ?? []) out(`problem     ${p}`);
}

function printBoot(r: SimBootResult, json: boolean): void {
  if (json) {
    printJson(r);
    return;
  }
  if (!r.booted) process.stdout.write(`already running ${r.running ? `${r.running.id} ${r.running.version} from ${r.running.device}` : ''}\n`);
  else if (r.running) process.stdout.write(`booted ${r.running.id} ${r.running.version} from ${r.running.device}${r.fellBack ? ' (fell back)' : ''}\n`);
  else process.stdout.write(`machine is down: ${r.record?.tried.map((t) => `${t.device}: ${t.reason}`).join('; ') || 'no boot entry'}\n`);
}

/** Parses `p1:rescue-root[:MiB],p2:bundle-store`. */
function parseLayout(s: string): PartitionSpec[] {
  return splitList(s).map((part) => {
    const [name, role, size] = part.split(':');
    return { name, role: role as PartitionSpec['role'], ...(size ? { sizeMiB: Number(size) } : {}) };
  });
}

/** Registers the `machine` command group. */
export function register(program: Command): void {
  const m = program.command('machine').description('Sim machines (create, inspect, faults, firmware) and the linux driver by hand');

  m.command('init <dir>')
    .description('Create a sim machine running OS A from disk1p1; disk2 empty and unpartitioned')
    .requiredOption('--host-id <id>', 'host id')
    .requiredOption('--ip <cidr>', "OS A's address with prefix, e.g. 10.0.0.5/24")
    .requiredOption('--gateway <ip>', 'default gateway')
    .option('--os <name>', 'OS A: debian-11 (ifupdown), ubuntu-22.04 (netplan), fedora-39 (networkd), windows-2022 (unattend)…', 'debian-11')
    .option('--mac <mac>', 'NIC MAC (default: derived from the host id)')
    .option('--nic <name>', 'NIC name', 'ens3')
    .option('--dns <ips>', 'DNS servers, comma-separated (default: the gateway)')
    .option('--search <domains>', 'DNS search domains, comma-separated')
    .option('--hostname <name>', 'host name (default: the host id)')
    .option('--authorized-keys <file>', "root's authorized_keys (default: one generated operator key)")
    .option('--json', 'print the boot result as JSON')
    .action(
      action(async (dir: string, o: Record<string, string | boolean | undefined>) => {
        const r = await initSimMachine(dir, {
          hostId: o.hostId as string,
          ip: o.ip as string,
          gateway: o.gateway as string,
          os: o.os as string,
          mac: o.mac as string | undefined,
          nic: o.nic as string,
          dns: o.dns ? splitList(o.dns as string) : undefined,
          search: o.search ? splitList(o.search as string) : undefined,
          hostname: o.hostname as string | undefined,
          authorizedKeys: o.authorizedKeys ? readFileSync(o.authorizedKeys as string, 'utf8') : undefined,
        });
        printBoot(r, Boolean(o.json));
      }),
    );

  m.command('inspect <dir>')
    .description('Show a sim machine: running OS, boot entries, IP and host key as the running OS has them, disks')
    .option('--json', 'print JSON')
    .action(
      action(async (dir: string, o: { json?: boolean }) => {
        const i = await new SimMachine(dir).inspect();
        if (o.json) printJson(i);
        else printInspect(i);
      }),
    );

  m.command('fault <dir> <fault> [device]')
    .description('Inject a fault: `fail-boot DEVICE` (boots from DEVICE fail until cleared; --once: only the next) or `clear`')
    .option('--once', 'fail only the next boot from DEVICE')
    .action(
      action(async (dir: string, fault: string, device: string | undefined, o: { once?: boolean }) => {
        if (fault === 'clear') return simClearFaults(dir);
        if (fault !== 'fail-boot') throw scError('SC_ERR_BAD_REQUEST', `unknown fault ${JSON.stringify(fault)}: expected fail-boot or clear`);
        if (!device) throw scError('SC_ERR_BAD_REQUEST', 'fail-boot needs a DEVICE, e.g. disk2p1');
        await simFault(dir, 'fail-boot', device, o.once ? 'once' : 'always');
      }),
    );

  m.command('boot <dir>')
    .description('Run the sim firmware: boot if a reboot is pending or the machine is not running (--force: power-cycle)')
    .option('--force', 'boot even if the machine is running')
    .option('--json', 'print JSON')
    .action(
      action(async (dir: string, o: { force?: boolean; json?: boolean }) => {
        printBoot(await simBoot(dir, { force: o.force }), Boolean(o.json));
      }),
    );

  m.command('set-boot <dir>')
    .description('Set boot entries of a sim machine by hand')
    .option('--once <device>', 'one-shot entry for the next boot')
    .option('--default <device>', 'default entry')
    .option('--rescue <device>', 'rescue entry')
    .action(
      action(async (dir: string, o: { once?: string; default?: string; rescue?: string }) => {
        const d = new SimMachine(dir);
        if (o.default) await d.setDefault(o.default);
        if (o.rescue) await d.setRescueEntry(o.rescue);
        if (o.once) await d.setBootOnce(o.once);
      }),
    );

  m.command('reboot <dir>')
    .description('Reboot a sim machine now (no agent involved): record the reboot, then run the firmware')
    .option('--json', 'print JSON')
    .action(
      action(async (dir: string, o: { json?: boolean }) => {
        const d = new SimMachine(dir, {
          exit: (n) => {
            throw new RebootSignal(n);
          },
        });
        await d.reboot().catch((err) => {
          if (!(err instanceof RebootSignal)) throw err;
        });
        printBoot(await simBoot(dir), Boolean(o.json));
      }),
    );

  m.command('log <dir>')
    .description("A sim machine's action log (every effect the driver had)")
    .option('--json', 'print JSON')
    .action(
      action(async (dir: string, o: { json?: boolean }) => {
        const log = await readActionLog(dir);
        if (o.json) return printJson(log);
        for (const a of log) {
          const { at, op, pid, ...rest } = a;
          process.stdout.write(`${at}  ${op.padEnd(15)} ${JSON.stringify(rest)}  (pid ${pid})\n`);
        }
      }),
    );

  m.command('linux <op> [args...]')
    .description(
      'Drive the linux driver: inspect | boot-config | partition DISK | mkfs DEV | wipe DEV | mount DEV | boot-once DEV | set-default DEV | set-rescue DEV | reboot | unpack FILE DIR',
    )
    .option('--disk1 <path>', 'device of disk 1', '/dev/sda')
    .option('--disk2 <path>', 'device of disk 2', '/dev/sdb')
    .option('--boot-mode <mode>', 'bios-grub or uefi', 'bios-grub')
    .option('--host-id <id>', 'host id', 'localhost')
    .option('--mount-root <dir>', 'where partitions are mounted', '/mnt/stagecoach')
    .option('--layout <spec>', 'partition layout for `partition`', 'p1:rescue-root,p2:bundle-store')
    .option('--compression <c>', 'for `unpack`: zstd, gzip or none', 'zstd')
    .option('--dry-run', 'print the commands instead of running them (read-only queries still run)')
    .option('--json', 'print JSON where there is a result')
    .action(
      action(async (op: string, args: string[], o: Record<string, string | boolean | undefined>) => {
        if (op === 'unpack') {
          if (args.length !== 2) throw scError('SC_ERR_BAD_REQUEST', 'unpack FILE DIR');
          for (const argv of planUnpack(args[0], args[1], o.compression as Compression)) process.stdout.write(`+ ${shellQuote(argv)}\n`);
          return;
        }
        const d: MachineDriver = new LinuxMachine({
          hostId: o.hostId as string,
          disks: { disk1: o.disk1 as string, disk2: o.disk2 as string },
          bootMode: o.bootMode as BootMode,
          mountRoot: o.mountRoot as string,
          dryRun: Boolean(o.dryRun),
          exit: (n) => {
            throw new RebootSignal(n);
          },
        });
        const need = () => {
          if (!args[0]) throw scError('SC_ERR_BAD_REQUEST', `${op} needs an argument`);
          return args[0];
        };
        const show = (v: unknown): void => {
          if (o.json) printJson(v);
          else process.stdout.write(`${typeof v === 'string' ? v : JSON.stringify(v)}\n`);
        };
        switch (op) {
          case 'inspect':
            return show(await d.inspect());
          case 'boot-config':
            return show(await d.bootConfig());
          case 'partition':
            return show(await d.partition(need(), parseLayout(o.layout as string)));
          case 'mkfs':
            return d.mkfs(need());
          case 'wipe':
            return d.wipe(need());
          case 'mount':
            return show(await d.mountPath(need()));
          case 'boot-once':
            return d.setBootOnce(need());
          case 'set-default':
            return d.setDefault(need());
          case 'set-rescue':
            return d.setRescueEntry(need());
          case 'reboot':
            await d.reboot().catch((err) => {
              if (!(err instanceof RebootSignal)) throw err;
            });
            return;
          default:
            throw scError('SC_ERR_BAD_REQUEST', `unknown linux operation ${JSON.stringify(op)}`);
        }
      }),
    );
}
