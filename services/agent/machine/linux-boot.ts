/**
 * The linux driver's boot loader: pure builders of GRUB configurations and of the command plans
 * that install and switch boot entries, for BIOS (GRUB i386-pc) and UEFI (OVMF or a real
 * firmware's NVRAM). The driver (linux.ts) runs these plans; nothing here touches the machine.
 *
 * Every stagecoach entry boots its OS's kernel directly: it finds the root filesystem by its
 * label (`sc-os-root`, `sc-rescue-root`), loads `/vmlinuz` and `/initrd.img` from it (or the
 * paths found in its /boot), with `root=LABEL=…`. No entry hands over to another OS's grub.cfg,
 * so no entry can loop into itself, and an OS's own package updates (update-grub) never break
 * the way stagecoach boots it. The GPT and msdos partition modules and ext2 are loaded in every
 * entry: a GRUB built for an msdos disk cannot otherwise see disk 2's GPT partitions.
 *
 * Who boots the machine:
 * - BIOS, before the point of no return: OS A's own GRUB. The one-shot entry for B is added to
 *   A's menu (/etc/grub.d/45_stagecoach + grub-mkconfig) and chosen with grub-reboot.
 * - BIOS, from the point of no return on: the stagecoach loader, installed from B onto both
 *   disks (`grub-install --boot-directory=<disk2p1>/boot/stagecoach`), with a grub.cfg written
 *   here and its own grubenv: `saved_entry` (default), `next_entry` (one-shot) and
 *   `stagecoach_rescue`. It lives with B on disk 2, so wiping disk 1 cannot take it away.
 * - UEFI: one standalone GRUB EFI binary per device on disk 2's ESP (`\EFI\stagecoach\<device>.efi`,
 *   its config embedded), one NVRAM entry per device (`stagecoach <device>`, and
 *   `stagecoach rescue <device>`); one-shot = BootNext, default = first in BootOrder and a copy
 *   of its loader at the ESP's removable-media path (EFI_FALLBACK_PATH), for a firmware that
 *   loses its entries. A failed entry returns to the firmware, which takes the next entry.
 * A kernel that panics reboots after 10 s (`panic=10`), so a one-shot boot that fails brings the
 * machine back to its default entry by itself.
 */
import type { PartitionRole } from './driver.js';

/** Boot loader flavour. */
export type BootMode = 'bios-grub' | 'uefi';

/** Kernel arguments of every stagecoach entry besides `root=`: the serial console last, so it is /dev/console. */
export const DEFAULT_KERNEL_ARGS = 'ro panic=10 console=tty0 console=ttyS0,115200n8';

/** ext4 label (and GPT partition name) of a role. */
export function fsLabel(role: PartitionRole): string {
  return `sc-${role}`;
}

/** GRUB menu entry id of a device. */
export function grubEntryId(device: string): string {
  return `stagecoach-${device}`;
}

/** A root partition that stagecoach boots: its device, filesystem label and kernel paths inside it. */
export interface BootRoot {
  device: string;
  label: string;
  kernel: string;
  initrd: string;
}

/** The kernel paths of an OS root: `/vmlinuz` and `/initrd.img` (Debian's links) unless given. */
export function bootRoot(device: string, label: string, kernel?: { kernel: string; initrd: string } | null): BootRoot {
  return { device, label, kernel: kernel?.kernel ?? '/vmlinuz', initrd: kernel?.initrd ?? '/initrd.img' };
}

const MODULES = '\tinsmod part_gpt\n\tinsmod part_msdos\n\tinsmod ext2\n';

/**
 * Finds the root by label and boots its kernel; when the kernel or initramfs cannot be loaded,
 * says so and runs `onFail` (nothing: the entry ends and GRUB takes its fallback entry).
 */
function bootCommands(r: BootRoot, kernelArgs: string, indent: string, onFail: string[]): string {
  return [
    `search --no-floppy --label --set=root ${r.label}`,
    `if linux ${r.kernel} root=LABEL=${r.label} ${kernelArgs}; then`,
    `\tif initrd ${r.initrd}; then boot; fi`,
    'fi',
    `echo 'stagecoach: ${r.device} cannot be booted'`,
    'sleep 3',
    ...onFail,
  ].map((l) => `${indent}${l}\n`).join('');
}

/**
 * One menu entry that boots `r` directly. `onFail` runs when it cannot (default: nothing, so
 * GRUB's `fallback` entry is tried); an OS's own GRUB passes `reboot`, so a failed one-shot
 * entry reboots into the default one instead of returning to a menu whose default it still is.
 */
export function grubMenuEntry(r: BootRoot, title: string, id: string, kernelArgs = DEFAULT_KERNEL_ARGS, onFail: string[] = []): string {
  return `menuentry '${title}' --id ${id} {\n${MODULES}${bootCommands(r, kernelArgs, '\t', onFail)}}\n`;
}

/** Where the stagecoach GRUB entries live in the running OS (BIOS, before the point of no return). */
export const GRUB_ENTRIES_FILE = '/etc/grub.d/45_stagecoach';

/**
 * The /etc/grub.d/45_stagecoach script of an OS's own GRUB: one entry per managed root, plus
 * `stagecoach-rescue` when set. grub-mkconfig runs it and copies its tail into grub.cfg.
 */
export function grubEntriesScript(roots: BootRoot[], rescue: BootRoot | null, kernelArgs = DEFAULT_KERNEL_ARGS): string {
  const body = roots.map((r) => grubMenuEntry(r, `stagecoach ${r.device}`, grubEntryId(r.device), kernelArgs, ['reboot']));
  if (rescue) body.push(grubMenuEntry(rescue, `stagecoach rescue (${rescue.device})`, 'stagecoach-rescue', kernelArgs, ['reboot']));
  const head = ['#!/bin/sh', '# Written by stagecoach: boot entries for the partitions it manages (grub-mkconfig runs this).', `# rescue: ${rescue?.device ?? 'none'}`];
  return `${head.join('\n')}\nexec tail -n +${head.length + 2} "$0"\n${body.join('')}`;
}

/** Directory (below disk2p1's root) given to grub-install as --boot-directory for the stagecoach loader (BIOS). */
export const LOADER_BOOT_DIR = 'boot/stagecoach';

/** `${name}`: a GRUB variable reference. */
function grubVar(name: string): string {
  return `\${${name}}`;
}

/**
 * grub.cfg of the stagecoach loader (BIOS, after the point of no return): load the env, take
 * the one-shot entry once (and clear it), else the saved default; the rescue entry is the
 * fallback when the chosen entry cannot boot.
 */
export function loaderConfig(roots: BootRoot[], rescue: BootRoot | null, kernelArgs = DEFAULT_KERNEL_ARGS): string {
  const head = [
    '# Written by stagecoach: the boot loader of a converted host (see the README, "Machine drivers").',
    `# rescue: ${rescue?.device ?? 'none'}`,
    'serial --unit=0 --speed=115200',
    'terminal_input console serial',
    'terminal_output console serial',
    'set timeout=3',
    'if [ -s $prefix/grubenv ]; then load_env; fi',
    `if [ "${grubVar('next_entry')}" ]; then`,
    `\tset default="${grubVar('next_entry')}"`,
    '\tset next_entry=',
    '\tsave_env next_entry',
    'else',
    `\tset default="${grubVar('saved_entry')}"`,
    'fi',
    ...(rescue ? ['set fallback=stagecoach-rescue'] : []),
  ];
  const body = roots.map((r) => grubMenuEntry(r, `stagecoach ${r.device}`, grubEntryId(r.device), kernelArgs));
  if (rescue) body.push(grubMenuEntry(rescue, `stagecoach rescue (${rescue.device})`, 'stagecoach-rescue', kernelArgs));
  return `${head.join('\n')}\n${body.join('')}`;
}

/**
 * The config embedded in a device's UEFI loader: boot that root, or go back to the firmware
 * (which then tries the next entry of BootOrder).
 */
export function efiLoaderConfig(r: BootRoot, kernelArgs = DEFAULT_KERNEL_ARGS): string {
  return [
    'insmod part_gpt',
    'insmod part_msdos',
    'insmod ext2',
    'serial --unit=0 --speed=115200',
    'terminal_input console serial',
    'terminal_output console serial',
    `echo 'stagecoach: booting ${r.device}'`,
    `if search --no-floppy --label --set=root ${r.label}; then`,
    `\tif linux ${r.kernel} root=LABEL=${r.label} ${kernelArgs}; then`,
    `\t\tif initrd ${r.initrd}; then boot; fi`,
    '\tfi',
    'fi',
    `echo 'stagecoach: ${r.device} cannot be booted; back to the firmware'`,
    'sleep 3',
    'exit',
    '',
  ].join('\n');
}

/** The ESP path (relative to the ESP's root) of a device's UEFI loader. */
export function efiLoaderPath(device: string): string {
  return `EFI/stagecoach/${device}.efi`;
}

/**
 * The removable-media path of disk 2's ESP (`\EFI\BOOT\BOOTX64.EFI`): a copy of the default
 * device's loader. A firmware that lost or pruned its NVRAM entries (a CMOS reset, a firmware
 * update, OVMF rebuilding BootOrder from its own device list after a power loss) still boots
 * disk 2 through this path, and so the OS stagecoach made the default.
 */
export const EFI_FALLBACK_PATH = 'EFI/BOOT/BOOTX64.EFI';

/** UEFI: `loader` (a path on the mounted ESP `espDir`) copied to the ESP's removable-media path. */
export function planEfiFallback(espDir: string, loader: string): string[][] {
  const to = `${espDir}/${EFI_FALLBACK_PATH}`;
  return [
    ['mkdir', '-p', `${espDir}/EFI/BOOT`],
    ['cp', loader, `${to}.new`],
    ['mv', `${to}.new`, to],
  ];
}

/** grub-editenv plan: set `vars` in the env file `envFile` (created when missing). */
export function planEditEnv(envFile: string, vars: Record<string, string>, create: boolean): string[][] {
  return [...(create ? [['grub-editenv', envFile, 'create']] : []), ['grub-editenv', envFile, 'set', ...Object.entries(vars).map(([k, v]) => `${k}=${v}`)]];
}

/** BIOS, before the point of no return: regenerate the running OS's grub.cfg (with 45_stagecoach), then one-shot `device`. */
export function planOsGrubOnce(device: string): string[][] {
  return [['grub-mkconfig', '-o', '/boot/grub/grub.cfg'], ['grub-reboot', grubEntryId(device)]];
}

/** BIOS: the stagecoach loader onto every disk, its modules in `bootDir` (disk2p1's boot/stagecoach). */
export function planLoaderInstall(bootDir: string, diskPaths: string[]): string[][] {
  return diskPaths.map((d) => ['grub-install', '--target=i386-pc', `--boot-directory=${bootDir}`, d]);
}

/**
 * UEFI: a standalone GRUB EFI binary at `out` whose embedded grub.cfg is the file `cfgFile`,
 * built beside it and renamed into place, so a power cut leaves the old loader or the new one,
 * never half of one.
 */
export function planEfiLoader(out: string, cfgFile: string): string[][] {
  return [
    ['mkdir', '-p', out.slice(0, out.lastIndexOf('/'))],
    ['grub-mkstandalone', '--format=x86_64-efi', `--output=${out}.new`, '--locales=', '--fonts=', '--themes=', `boot/grub/grub.cfg=${cfgFile}`],
    ['mv', `${out}.new`, out],
  ];
}

/** UEFI: an NVRAM entry `label` for the loader at `loader` (ESP-relative) on partition `espPart` of `espDisk`, not added to BootOrder. */
export function planEfiEntry(o: { espDisk: string; espPart: number; label: string; loader: string }): string[][] {
  return [['efibootmgr', '--create-only', '--disk', o.espDisk, '--part', String(o.espPart), '--label', o.label, '--loader', `\\${o.loader.replace(/\//g, '\\')}`]];
}

/** UEFI: deletes NVRAM boot entry `num`. */
export function planEfiDelete(num: string): string[][] {
  return [['efibootmgr', '--bootnum', num.toUpperCase(), '--delete-bootnum']];
}

/** UEFI: next boot (only) from entry `num`. */
export function planBootNext(num: string): string[][] {
  return [['efibootmgr', '--bootnext', num.toUpperCase()]];
}

/** UEFI: entry `num` first in BootOrder, the rest after it in their order. */
export function planBootOrder(num: string, order: string[]): string[][] {
  const n = num.toUpperCase();
  return [['efibootmgr', '--bootorder', [n, ...order.map((x) => x.toUpperCase()).filter((x) => x !== n)].join(',')]];
}

/**
 * /etc/fstab of an OS that stagecoach installed: its root by label. It replaces what the bundle
 * shipped, whose entries name the image builder's devices (a boot would wait for them).
 */
export function fstabFor(role: PartitionRole): string {
  return `# Written by stagecoach: the root filesystem by its label.\nLABEL=${fsLabel(role)} / ext4 errors=remount-ro 0 1\n`;
}
