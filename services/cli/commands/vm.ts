/**
 * `stagecoach vm`: the real-machine proof. `vm images` builds (or reuses) the Debian VM images
 * from the apt mirror; `vm proof` converts a real qemu VM from A to C through the production
 * services and the linux driver, and checks the result from outside over SSH.
 */
import type { Command } from 'commander';
import { scError } from '../../../shared/errors.js';
import { buildImages } from '../../vm/images.js';
import { FAULTS, type Fault, runProof } from '../../vm/proof.js';
import type { Firmware } from '../../vm/qemu.js';
import { action, printJson, splitList } from '../util.js';

function firmwares(s: string): Firmware[] {
  const out = splitList(s);
  for (const f of out) if (f !== 'bios' && f !== 'uefi') throw scError('SC_ERR_BAD_REQUEST', `unknown firmware ${JSON.stringify(f)}: expected bios or uefi`);
  return out as Firmware[];
}

/** Registers `stagecoach vm`. */
export function register(program: Command): void {
  const vm = program.command('vm').description('Real virtual machines: build the Debian images, prove a conversion end to end');
  vm.command('images')
    .description("Build or reuse the VM images (A's disk per firmware, B and C root filesystems) in a cache directory")
    .requiredOption('--cache <dir>', 'image cache (outside the checkout; reused when the recipes did not change)')
    .option('--firmware <list>', 'firmwares to build A for: bios,uefi', 'bios,uefi')
    .option('--json', 'print the image set as JSON')
    .action(
      action(async (o: { cache: string; firmware: string; json?: boolean }) => {
        const set = await buildImages(o.cache, firmwares(o.firmware), (l) => process.stderr.write(`${l}\n`));
        if (o.json) printJson(set);
        else process.stdout.write(`images ready in ${set.cache}\n`);
      }),
    );

  vm.command('proof')
    .description('Convert a real qemu VM from A to C through origin, stage, control and the linux driver; check it over SSH')
    .requiredOption('--firmware <fw>', 'bios (SeaBIOS, GRUB) or uefi (OVMF)')
    .requiredOption('--work <dir>', 'run directory: disks (qcow2), serial log, keys, service data')
    .option('--cache <dir>', 'image cache, outside the checkout', '/var/tmp/stagecoach-vm')
    .option('--fault <list>', `faults to inject: ${FAULTS.join(',')}`)
    .option('--cpus <n>', 'vCPUs of the VM', '2')
    .option('--keep', 'leave the VM and the services running; the JSON adds ssh, pid and disks')
    .option('--json', 'print the result as one JSON line')
    .option('--log-level <level>', "the services' log level", 'warn')
    .action(
      action(async (o: { firmware: string; work: string; cache: string; fault?: string; cpus: string; keep?: boolean; json?: boolean; logLevel: string }) => {
        const [fw] = firmwares(o.firmware);
        const faults = splitList(o.fault);
        for (const f of faults) if (!(FAULTS as readonly string[]).includes(f)) throw scError('SC_ERR_BAD_REQUEST', `unknown fault ${JSON.stringify(f)}: expected ${FAULTS.join(', ')}`);
        const cpus = Number(o.cpus);
        if (!Number.isInteger(cpus) || cpus < 1 || cpus > 16) throw scError('SC_ERR_BAD_REQUEST', '--cpus takes a whole number from 1 to 16');
        const t0 = Date.now();
        const r = await runProof({
          firmware: fw, work: o.work, cache: o.cache, keep: !!o.keep, faults: faults as Fault[], cpus, logLevel: o.logLevel,
          log: (l) => process.stderr.write(`[${String(Math.round((Date.now() - t0) / 1000)).padStart(5)} s] ${l}\n`),
        });
        if (o.json) process.stdout.write(`${JSON.stringify(r)}\n`);
        else process.stdout.write(`${fw}: converted ${r.converted}; ${r.before.os} → ${r.after.os}, ${r.after.root}, ${r.after.ip}, same host key ${r.after.hostKeyFingerprint === r.before.hostKeyFingerprint}; rescue and reinstall ok\n`);
        if (o.keep) await new Promise<void>((res) => process.once('SIGINT', () => res()));
      }),
    );
}
