/**
 * The linux driver's boot loader: which OS boots next, by default, and as the rescue entry. It
 * decides, linux-boot.ts builds the files and plans it carries out:
 * - BIOS, before the point of no return: the running OS's own GRUB, with stagecoach's entries in
 *   /etc/grub.d and `grub-reboot` for a one-shot boot;
 * - BIOS, from `setDefault` on: the stagecoach loader on disk2p1 (its own grub.cfg and grubenv,
 *   installed into the boot sector of both disks);
 * - UEFI: one loader per device on disk 2's ESP, each with its NVRAM entry (BootNext, BootOrder).
 */
import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { scError } from '../../../shared/errors.js';
import type { BootConfig, PartitionRole } from './driver.js';
import {
  type BootMode,
  type BootRoot,
  bootRoot,
  efiLoaderConfig,
  efiLoaderPath,
  fsLabel,
  GRUB_ENTRIES_FILE,
  grubEntriesScript,
  grubEntryId,
  LOADER_BOOT_DIR,
  loaderConfig,
  planBootNext,
  planBootOrder,
  planEditEnv,
  planEfiDelete,
  planEfiEntry,
  planEfiFallback,
  planEfiLoader,
  planLoaderInstall,
  planOsGrubOnce,
} from './linux-boot.js';
import { BOOT_HELPER, type EfiBootState, type LsblkPart, parseEfibootmgr, partitionPath, planMount, roleOf, type Runner, STANDARD_ROLES } from './linux-plans.js';
import { kernelAt } from './os.js';

/** What the boot loader uses of its machine: the configuration, the runner and the disk queries. */
export interface LoaderMachine {
  readonly runner: Runner;
  readonly bootMode: BootMode;
  readonly disks: Record<string, string>;
  readonly sysRoot: string;
  readonly mountRoot: string;
  readonly kernelArgs: string;
  print(line: string): void;
  diskPath(disk: string): string;
  /** Validates a device name (throws SC_ERR_NO_DEVICE). */
  split(device: string): unknown;
  parts(disk: string): Promise<LsblkPart[]>;
  part(device: string): Promise<LsblkPart & { disk: string; role: PartitionRole }>;
  mountPath(device: string): Promise<string>;
}

/** The boot loader of a LinuxMachine (see the top of this file). */
export class LinuxBootLoader {
  readonly #m: LoaderMachine;

  constructor(machine: LoaderMachine) {
    this.#m = machine;
  }

  async #runAll(plan: string[][]): Promise<void> {
    for (const argv of plan) await this.#m.runner.run(argv);
  }

  /** The roots stagecoach boots: os-root and rescue-root partitions (by GPT name, else the standard layout), with their kernels. */
  async #bootRoots(): Promise<BootRoot[]> {
    const out: BootRoot[] = [];
    for (const disk of Object.keys(this.#m.disks).sort()) {
      let parts: Pick<LsblkPart, 'n' | 'partlabel' | 'fstype'>[] = await this.#m.parts(disk);
      // A dry run on a machine without these disks plans for the standard layout.
      if (parts.length === 0 && this.#m.runner.dryRun) parts = disk === 'disk1' ? [{ n: 1, partlabel: null, fstype: null }] : disk === 'disk2' ? [{ n: 1, partlabel: null, fstype: null }] : [];
      for (const p of parts) {
        const device = `${disk}p${p.n}`;
        const named = p.partlabel?.startsWith('sc-') ?? false;
        const role = roleOf(p, disk);
        if (role === 'bundle-store' || (!named && !STANDARD_ROLES[device])) continue;
        const root = p.fstype === 'ext4' ? await this.#m.mountPath(device).catch(() => null) : null;
        out.push(bootRoot(device, fsLabel(role), root ? await kernelAt(root) : null));
      }
    }
    return out;
  }

  async #bootRoot(device: string): Promise<BootRoot> {
    const found = (await this.#bootRoots()).find((r) => r.device === device);
    return found ?? bootRoot(device, fsLabel((await this.#m.part(device)).role));
  }

  /** The stagecoach loader's place on disk2p1 (BIOS), or null while disk2p1 has no filesystem. */
  async #loader(): Promise<{ bootDir: string; grubDir: string; env: string } | null> {
    const p = await this.#m.part('disk2p1').catch(() => null);
    if (!p || (!p.fstype && !this.#m.runner.dryRun)) return null;
    const root = await this.#m.mountPath('disk2p1').catch(() => null);
    if (!root) return null;
    const bootDir = join(root, LOADER_BOOT_DIR);
    return { bootDir, grubDir: join(bootDir, 'grub'), env: join(bootDir, 'grub/grubenv') };
  }

  async #env(file: string): Promise<Record<string, string>> {
    const text = (await this.#m.runner.query(['grub-editenv', file, 'list'])) ?? '';
    return Object.fromEntries(text.split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1).trim()]));
  }

  async #writeLoaderConfig(l: { grubDir: string }, rescue: string | null): Promise<void> {
    await this.#runAll([['mkdir', '-p', l.grubDir]]);
    const r = rescue ? await this.#bootRoot(rescue) : null;
    await this.#m.runner.writeFile(join(l.grubDir, 'grub.cfg'), loaderConfig(await this.#bootRoots(), r, this.#m.kernelArgs), 0o644);
  }

  async #needLoader(): Promise<{ bootDir: string; grubDir: string; env: string }> {
    const l = await this.#loader();
    if (!l) throw scError('SC_ERR_CONFLICT', 'disk2p1 has no filesystem: there is no rescue OS to hold the boot loader');
    return l;
  }

  async #grubRescue(): Promise<string | null> {
    const text = await fsp.readFile(join(this.#m.sysRoot, GRUB_ENTRIES_FILE), 'utf8').catch(() => '');
    return /^# rescue: (disk[1-9]p[1-9])$/m.exec(text)?.[1] ?? null;
  }

  async #efi(): Promise<EfiBootState> {
    return parseEfibootmgr((await this.#m.runner.query(['efibootmgr'])) ?? '');
  }

  /**
   * UEFI, once stagecoach owns the default: deletes the NVRAM entries of an OS's own loader on
   * disk 1 (A's `debian` entry, on A's ESP). From the point of no return A must never boot
   * again, and its disk is about to be wiped: a firmware that falls back to such an entry, or
   * that orders entries by device itself (OVMF puts the first disk's entries first after every
   * power loss), would start A's boot loader over an empty root and stop at its rescue prompt.
   * Entries on other devices (network boot, other disks) and stagecoach's own are kept.
   */
  async #dropOsEntries(): Promise<void> {
    const out = (await this.#m.runner.query(['lsblk', '--noheadings', '--output', 'PARTUUID', this.#m.diskPath('disk1')])) ?? '';
    const disk1 = new Set(out.split('\n').map((l) => l.trim().toLowerCase()).filter(Boolean));
    // --verbose: efibootmgr before 18 prints the device paths only then.
    const st = parseEfibootmgr((await this.#m.runner.query(['efibootmgr', '--verbose'])) ?? '');
    for (const e of st.entries) {
      if (e.partuuid && disk1.has(e.partuuid) && !e.label.startsWith('stagecoach')) await this.#runAll(planEfiDelete(e.num));
    }
  }

  /** Disk 2's ESP, mounted. */
  async #esp(): Promise<{ dir: string; disk: string; part: number }> {
    const parts = await this.#m.parts('disk2');
    const p = parts.find((x) => x.partlabel === BOOT_HELPER.uefi.name);
    if (!p && !this.#m.runner.dryRun) throw scError('SC_ERR_CONFLICT', 'disk 2 has no ESP (sc-esp): partition it first');
    const n = p?.n ?? 3;
    if (p?.mountpoint) return { dir: p.mountpoint, disk: this.#m.diskPath('disk2'), part: n };
    const dir = `${this.#m.mountRoot}/esp`;
    await this.#runAll(planMount(partitionPath(this.#m.diskPath('disk2'), n), dir));
    return { dir, disk: this.#m.diskPath('disk2'), part: n };
  }

  /**
   * (Re)writes `device`'s UEFI loader on disk 2's ESP and returns the number of its NVRAM entry
   * `label` (created when missing). `fallback`: the loader also goes to the ESP's removable-media
   * path (the default's).
   */
  async #efiEntry(device: string, label: string, fallback = false): Promise<string> {
    const esp = await this.#esp();
    const cfg = join(esp.dir, `EFI/stagecoach/${device}.cfg`);
    const loader = join(esp.dir, efiLoaderPath(device));
    const text = efiLoaderConfig(await this.#bootRoot(device), this.#m.kernelArgs);
    // The ESP is FAT: no journal. A loader is rebuilt only when its config changed (the .cfg
    // beside it is what it embeds, renamed into place after it), each file is written beside its
    // place and renamed, and the ESP is synced before anything depends on it: a power cut at any
    // point leaves a loader that boots (the old one or the new one).
    const current = this.#m.runner.dryRun ? null : await fsp.readFile(cfg, 'utf8').catch(() => null);
    const built = current === text && (await fsp.stat(loader).then((s) => s.size > 0, () => false));
    if (!built) {
      await this.#runAll([['mkdir', '-p', join(esp.dir, 'EFI/stagecoach')]]);
      await this.#m.runner.writeFile(`${cfg}.new`, text, 0o644);
      await this.#runAll(planEfiLoader(loader, `${cfg}.new`));
      await this.#runAll([['mv', `${cfg}.new`, cfg]]);
    }
    if (fallback) await this.#runAll(planEfiFallback(esp.dir, loader));
    if (!built || fallback) await this.#runAll([['sync', '-f', loader]]);
    const found = (await this.#efi()).entries.find((e) => e.label === label);
    if (found) return found.num;
    await this.#runAll(planEfiEntry({ espDisk: esp.disk, espPart: esp.part, label, loader: efiLoaderPath(device) }));
    const created = (await this.#efi()).entries.find((e) => e.label === label);
    if (!created && this.#m.runner.dryRun) this.#m.print(`# dry run: the new entry '${label}' has no boot number yet; shown as FFFF`);
    if (!created && !this.#m.runner.dryRun) throw scError('SC_ERR_COMMAND_FAILED', `efibootmgr did not create the entry '${label}'`);
    return created?.num ?? 'FFFF';
  }

  async setBootOnce(device: string): Promise<void> {
    this.#m.split(device);
    if (this.#m.bootMode === 'uefi') {
      await this.#runAll(planBootNext(await this.#efiEntry(device, `stagecoach ${device}`)));
      return;
    }
    const l = await this.#loader();
    const env = l ? await this.#env(l.env) : {};
    if (l && env.stagecoach_loader === '1') {
      await this.#writeLoaderConfig(l, env.stagecoach_rescue ?? null);
      await this.#runAll(planEditEnv(l.env, { next_entry: grubEntryId(device) }, false));
      await this.#runAll([['sync', '-f', l.env]]);
      return;
    }
    // Before the point of no return: the running OS's own GRUB boots the entry once.
    const rescue = env.stagecoach_rescue ?? (await this.#grubRescue());
    await this.#m.runner.writeFile(GRUB_ENTRIES_FILE, grubEntriesScript(await this.#bootRoots(), rescue ? await this.#bootRoot(rescue) : null, this.#m.kernelArgs), 0o755);
    await this.#runAll(planOsGrubOnce(device));
  }

  async setDefault(device: string): Promise<void> {
    this.#m.split(device);
    if (this.#m.bootMode === 'uefi') {
      const num = await this.#efiEntry(device, `stagecoach ${device}`, true);
      await this.#dropOsEntries();
      await this.#runAll(planBootOrder(num, (await this.#efi()).order));
      return;
    }
    const l = await this.#needLoader();
    const env = await this.#env(l.env);
    await this.#writeLoaderConfig(l, env.stagecoach_rescue ?? null);
    await this.#runAll(planLoaderInstall(l.bootDir, Object.keys(this.#m.disks).sort().map((d) => this.#m.diskPath(d))));
    const exists = !!(await fsp.stat(l.env).catch(() => null));
    await this.#runAll(planEditEnv(l.env, { saved_entry: grubEntryId(device), stagecoach_loader: '1' }, !exists && !this.#m.runner.dryRun));
    await this.#runAll([['sync', '-f', l.env]]);
  }

  async setRescueEntry(device: string): Promise<void> {
    this.#m.split(device);
    if (this.#m.bootMode === 'uefi') {
      const num = await this.#efiEntry(device, `stagecoach rescue ${device}`);
      const order = (await this.#efi()).order.filter((x) => x !== num);
      await this.#runAll([['efibootmgr', '--bootorder', [...order.slice(0, 1), num, ...order.slice(1)].join(',')]]);
      return;
    }
    const l = await this.#needLoader();
    const exists = !!(await fsp.stat(l.env).catch(() => null));
    await this.#writeLoaderConfig(l, device);
    await this.#runAll(planEditEnv(l.env, { stagecoach_rescue: device }, !exists && !this.#m.runner.dryRun));
    await this.#runAll([['sync', '-f', l.env]]);
  }

  async bootConfig(): Promise<BootConfig> {
    const dev = (s: string | undefined | null) => (s ? (/^stagecoach[- ](disk[1-9]p[1-9])$/.exec(s)?.[1] ?? null) : null);
    if (this.#m.bootMode === 'uefi') {
      const st = await this.#efi();
      const label = (num: string | null | undefined) => st.entries.find((e) => e.num === num)?.label ?? null;
      const rescue = st.entries.map((e) => /^stagecoach rescue (disk[1-9]p[1-9])$/.exec(e.label)?.[1]).find(Boolean) ?? null;
      return { default: dev(label(st.order[0])), once: dev(label(st.next)), rescue };
    }
    const l = await this.#loader();
    const env = l ? await this.#env(l.env) : {};
    if (env.stagecoach_loader === '1') return { default: dev(env.saved_entry), once: dev(env.next_entry), rescue: env.stagecoach_rescue ?? null };
    const os = await this.#env(join(this.#m.sysRoot, 'boot/grub/grubenv'));
    return { default: dev(os.saved_entry), once: dev(os.next_entry), rescue: env.stagecoach_rescue ?? (await this.#grubRescue()) };
  }
}
