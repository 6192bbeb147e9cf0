// The linux driver's plans for a two-disk machine (/dev/sda = disk 1, /dev/sdb = disk 2), exact
// argv arrays for both boot modes, its parsers of lsblk/efibootmgr output, and the driver run
// against a recording runner whose read-only queries answer like a real two-disk host.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { isScError } from '../../shared/errors.js';
import { RebootSignal } from '../../services/agent/machine/driver.js';
import {
  dryRunRunner,
  grubEntriesScript,
  LinuxMachine,
  parseEfibootmgr,
  parseLsblk,
  partitionPath,
  bootRoot,
  DEFAULT_KERNEL_ARGS,
  efiLoaderConfig,
  efiLoaderPath,
  fstabFor,
  grubMenuEntry,
  loaderConfig,
  planBootNext,
  planBootOrder,
  planEditEnv,
  planEfiEntry,
  planEfiLoader,
  planLoaderInstall,
  planOsGrubOnce,
  planMkfs,
  planMount,
  planPartition,
  planReboot,
  planUnpack,
  planWipe,
  type Runner,
  shellQuote,
} from '../../services/agent/machine/linux.js';

const tmp = mkdtempSync(join(tmpdir(), 'sc-linux-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

const layout = [
  { name: 'p1', role: 'rescue-root' as const },
  { name: 'p2', role: 'bundle-store' as const },
];

describe('plans for a two-disk machine', () => {
  it('partitions disk 2 for BIOS: GPT, p1 rescue 8 GiB, p2 the rest, bios_grub as p3 at 1 MiB', () => {
    assert.deepEqual(planPartition('/dev/sdb', layout, 'bios-grub'), [
      ['wipefs', '--all', '/dev/sdb'],
      [
        'parted', '--script', '--align', 'optimal', '/dev/sdb', '--',
        'mklabel', 'gpt',
        'mkpart', 'sc-rescue-root', 'ext4', '3MiB', '8195MiB',
        'mkpart', 'sc-bundle-store', 'ext4', '8195MiB', '100%',
        'mkpart', 'sc-bios-grub', '1MiB', '3MiB',
        'set', '3', 'bios_grub', 'on',
      ],
      ['partprobe', '/dev/sdb'],
      ['udevadm', 'settle'],
    ]);
  });

  it('partitions disk 2 for UEFI with an ESP as p3, formatted FAT32', () => {
    assert.deepEqual(planPartition('/dev/sdb', [{ name: 'p1', role: 'rescue-root', sizeMiB: 4096 }, layout[1]], 'uefi'), [
      ['wipefs', '--all', '/dev/sdb'],
      [
        'parted', '--script', '--align', 'optimal', '/dev/sdb', '--',
        'mklabel', 'gpt',
        'mkpart', 'sc-rescue-root', 'ext4', '513MiB', '4609MiB',
        'mkpart', 'sc-bundle-store', 'ext4', '4609MiB', '100%',
        'mkpart', 'sc-esp', 'fat32', '1MiB', '513MiB',
        'set', '3', 'esp', 'on',
      ],
      ['partprobe', '/dev/sdb'],
      ['udevadm', 'settle'],
      ['mkfs.vfat', '-F', '32', '-n', 'SC-ESP', '/dev/sdb3'],
    ]);
  });

  it('formats, wipes, mounts and unpacks', () => {
    assert.deepEqual(planMkfs('/dev/sdb1', 'sc-rescue-root'), [
      ['wipefs', '--all', '/dev/sdb1'],
      ['mkfs.ext4', '-F', '-q', '-L', 'sc-rescue-root', '/dev/sdb1'],
    ]);
    assert.deepEqual(planWipe('/dev/sda1'), [['wipefs', '--all', '/dev/sda1']]);
    assert.deepEqual(planMount('/dev/sdb1', '/mnt/stagecoach/disk2p1'), [
      ['mkdir', '-p', '/mnt/stagecoach/disk2p1'],
      ['mount', '/dev/sdb1', '/mnt/stagecoach/disk2p1'],
    ]);
    assert.deepEqual(planUnpack('/mnt/stagecoach/disk2p2/bundles/c.blob', '/mnt/stagecoach/disk1p1', 'zstd'), [
      ['tar', '--extract', '--zstd', '--file', '/mnt/stagecoach/disk2p2/bundles/c.blob', '--directory', '/mnt/stagecoach/disk1p1', '--numeric-owner', '--preserve-permissions', '--xattrs', '--acls'],
    ]);
  });

  it('boots an entry directly: partition modules loaded, kernel by label, never another grub.cfg', () => {
    const e = grubMenuEntry(bootRoot('disk2p1', 'sc-rescue-root'), 'stagecoach disk2p1', 'stagecoach-disk2p1');
    assert.equal(
      e,
      "menuentry 'stagecoach disk2p1' --id stagecoach-disk2p1 {\n" +
        '\tinsmod part_gpt\n\tinsmod part_msdos\n\tinsmod ext2\n' +
        '\tsearch --no-floppy --label --set=root sc-rescue-root\n' +
        `\tif linux /vmlinuz root=LABEL=sc-rescue-root ${DEFAULT_KERNEL_ARGS}; then\n` +
        '\t\tif initrd /initrd.img; then boot; fi\n' +
        '\tfi\n' +
        "\techo 'stagecoach: disk2p1 cannot be booted'\n" +
        '\tsleep 3\n}\n',
    );
    assert.doesNotMatch(e, /configfile/, 'an entry that loads a grub.cfg can select itself again for ever');
    assert.match(DEFAULT_KERNEL_ARGS, /panic=10/, 'a kernel that panics reboots, so a failed one-shot falls back');
    assert.match(DEFAULT_KERNEL_ARGS, /console=ttyS0,115200n8$/, 'the serial console is /dev/console');
    const fedora = grubMenuEntry(bootRoot('disk1p1', 'sc-os-root', { kernel: '/boot/vmlinuz-6.8', initrd: '/boot/initramfs-6.8.img' }), 't', 'i', 'ro quiet');
    assert.match(fedora, /\tif linux \/boot\/vmlinuz-6.8 root=LABEL=sc-os-root ro quiet; then\n\t\tif initrd \/boot\/initramfs-6.8.img; then boot; fi\n/);
  });

  it("plans the BIOS boot: A's GRUB once, then the stagecoach loader on both disks", () => {
    assert.deepEqual(planOsGrubOnce('disk2p1'), [['grub-mkconfig', '-o', '/boot/grub/grub.cfg'], ['grub-reboot', 'stagecoach-disk2p1']]);
    assert.deepEqual(planLoaderInstall('/boot/stagecoach', ['/dev/sda', '/dev/sdb']), [
      ['grub-install', '--target=i386-pc', '--boot-directory=/boot/stagecoach', '/dev/sda'],
      ['grub-install', '--target=i386-pc', '--boot-directory=/boot/stagecoach', '/dev/sdb'],
    ]);
    assert.deepEqual(planEditEnv('/e', { saved_entry: 'stagecoach-disk1p1', stagecoach_loader: '1' }, true), [
      ['grub-editenv', '/e', 'create'],
      ['grub-editenv', '/e', 'set', 'saved_entry=stagecoach-disk1p1', 'stagecoach_loader=1'],
    ]);
    assert.deepEqual(planReboot(), [['systemctl', 'reboot']]);
    const cfg = loaderConfig([bootRoot('disk1p1', 'sc-os-root'), bootRoot('disk2p1', 'sc-rescue-root')], bootRoot('disk2p1', 'sc-rescue-root'));
    assert.match(cfg, /if \[ "\$\{next_entry\}" \]; then\n\tset default="\$\{next_entry\}"\n\tset next_entry=\n\tsave_env next_entry\nelse\n\tset default="\$\{saved_entry\}"\nfi/);
    assert.match(cfg, /^set fallback=stagecoach-rescue$/m);
    assert.equal(cfg.match(/^menuentry /gm)?.length, 3);
    assert.doesNotMatch(cfg, /configfile/);
    assert.doesNotMatch(cfg, /reboot/, 'a failed entry of the loader ends, so GRUB takes the fallback (rescue) entry');
  });

  it('plans the UEFI boot: a standalone loader per device, entries outside BootOrder until chosen', () => {
    assert.deepEqual(efiLoaderPath('disk2p1'), 'EFI/stagecoach/disk2p1.efi');
    assert.deepEqual(planEfiLoader('/esp/EFI/stagecoach/disk2p1.efi', '/esp/EFI/stagecoach/disk2p1.cfg'), [
      ['mkdir', '-p', '/esp/EFI/stagecoach'],
      ['grub-mkstandalone', '--format=x86_64-efi', '--output=/esp/EFI/stagecoach/disk2p1.efi.new', '--locales=', '--fonts=', '--themes=', 'boot/grub/grub.cfg=/esp/EFI/stagecoach/disk2p1.cfg'],
      ['mv', '/esp/EFI/stagecoach/disk2p1.efi.new', '/esp/EFI/stagecoach/disk2p1.efi'],
    ]);
    assert.deepEqual(planEfiEntry({ espDisk: '/dev/sdb', espPart: 3, label: 'stagecoach disk2p1', loader: 'EFI/stagecoach/disk2p1.efi' }), [
      ['efibootmgr', '--create-only', '--disk', '/dev/sdb', '--part', '3', '--label', 'stagecoach disk2p1', '--loader', '\\EFI\\stagecoach\\disk2p1.efi'],
    ]);
    assert.deepEqual(planBootNext('0004'), [['efibootmgr', '--bootnext', '0004']]);
    assert.deepEqual(planBootOrder('0005', ['0001', '0004', '0005']), [['efibootmgr', '--bootorder', '0005,0001,0004']]);
    const cfg = efiLoaderConfig(bootRoot('disk2p1', 'sc-rescue-root'));
    assert.match(cfg, /^if search --no-floppy --label --set=root sc-rescue-root; then\n\tif linux \/vmlinuz root=LABEL=sc-rescue-root [^\n]*; then\n\t\tif initrd \/initrd.img; then boot; fi\n\tfi\nfi\n/m);
    assert.match(cfg, /\nexit\n$/, 'a loader that cannot boot its device returns to the firmware');
  });

  it('writes a grub.d script that emits exactly the menu entries', () => {
    const s = grubEntriesScript([bootRoot('disk1p1', 'sc-os-root'), bootRoot('disk2p1', 'sc-rescue-root')], bootRoot('disk2p1', 'sc-rescue-root'));
    const lines = s.split('\n');
    const tail = Number(/exec tail -n \+(\d+)/.exec(s)![1]);
    assert.equal(lines[tail - 1], "menuentry 'stagecoach disk1p1' --id stagecoach-disk1p1 {", 'tail starts at the first entry');
    assert.match(s, /^# rescue: disk2p1$/m);
    assert.match(s, /--id stagecoach-rescue \{\n\tinsmod part_gpt\n/);
    assert.equal(s.match(/\n\treboot\n\}/g)?.length, 3, "in an OS's own GRUB a failed entry reboots into the default instead of returning to a menu that would pick it again");
  });

  it('makes an installed root boot by label', () => {
    assert.equal(fstabFor('os-root'), '# Written by stagecoach: the root filesystem by its label.\nLABEL=sc-os-root / ext4 errors=remount-ro 0 1\n');
  });

  it('names partitions of sdX, nvme and by-id disks', () => {
    assert.equal(partitionPath('/dev/sda', 1), '/dev/sda1');
    assert.equal(partitionPath('/dev/nvme0n1', 2), '/dev/nvme0n1p2');
    assert.equal(partitionPath('/dev/disk/by-id/wwn-0x5000', 1), '/dev/disk/by-id/wwn-0x5000-part1');
  });

  it('quotes argv for display', () => {
    assert.equal(shellQuote(['efibootmgr', '--label', 'stagecoach disk2p1', "it's"]), `efibootmgr --label 'stagecoach disk2p1' 'it'\\''s'`);
  });
});

const EFI = `BootCurrent: 0001
BootNext: 0004
Timeout: 1 seconds
BootOrder: 0001,0004,0000
Boot0000* UiApp	FvVol(7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1)/FvFile(462caa21-7614-4503-836e-8ab6f4662331)
Boot0001* debian	HD(1,GPT,0b2c…,0x800,0x100000)/File(\\EFI\\debian\\shimx64.efi)
Boot0004* stagecoach disk2p1	HD(3,GPT,9a1e…,0x800,0x100000)/File(\\EFI\\stagecoach-disk2p1\\grubx64.efi)
Boot0005  stagecoach rescue disk2p1	HD(3,GPT,9a1e…,0x800,0x100000)/File(\\EFI\\stagecoach-disk2p1\\grubx64.efi)
`;

describe('parsers', () => {
  it('reads efibootmgr output', () => {
    const st = parseEfibootmgr(EFI);
    assert.equal(st.current, '0001');
    assert.equal(st.next, '0004');
    assert.deepEqual(st.order, ['0001', '0004', '0000']);
    assert.deepEqual(st.entries[2], { num: '0004', active: true, label: 'stagecoach disk2p1' });
    assert.deepEqual(st.entries[3], { num: '0005', active: false, label: 'stagecoach rescue disk2p1' });
  });

  it('reads lsblk JSON, only the partitions of the asked disk', () => {
    const json = JSON.stringify({
      blockdevices: [
        {
          name: 'sdb',
          path: '/dev/sdb',
          type: 'disk',
          children: [
            { name: 'sdb1', path: '/dev/sdb1', type: 'part', partlabel: 'sc-rescue-root', fstype: 'ext4', label: 'sc-rescue-root', mountpoint: null },
            { name: 'sdb2', path: '/dev/sdb2', type: 'part', partlabel: 'sc-bundle-store', fstype: null, label: null, mountpoint: null },
            { name: 'sdb3', path: '/dev/sdb3', type: 'part', partlabel: 'sc-bios-grub', fstype: null, label: null, mountpoint: null },
          ],
        },
      ],
    });
    assert.deepEqual(
      parseLsblk(json, '/dev/sdb').map((p) => [p.n, p.partlabel, p.fstype]),
      [
        [1, 'sc-rescue-root', 'ext4'],
        [2, 'sc-bundle-store', null],
        [3, 'sc-bios-grub', null],
      ],
    );
    assert.deepEqual(parseLsblk(json, '/dev/sda'), []);
    assert.deepEqual(parseLsblk('not json', '/dev/sdb'), []);
  });
});

/** A runner that records changes and answers queries like a host running Debian from /dev/sda1. */
function recorder(state: { disk2: 'empty' | 'partitioned' }) {
  const ran: string[][] = [];
  const writes: { path: string; content: string; mode: number }[] = [];
  const lsblk: Record<string, unknown> = {
    '/dev/sda': { blockdevices: [{ path: '/dev/sda', type: 'disk', children: [{ path: '/dev/sda1', type: 'part', partlabel: null, fstype: 'ext4', label: 'root', mountpoint: '/' }] }] },
  };
  const runner: Runner = {
    dryRun: false,
    async run(argv) {
      ran.push(argv);
      if (argv[0] === 'parted') state.disk2 = 'partitioned';
      return '';
    },
    async query(argv) {
      if (argv[0] === 'findmnt') return '/dev/sda1\n';
      if (argv[0] === 'lsblk') {
        const disk = argv[argv.length - 1];
        if (disk === '/dev/sdb') {
          const children =
            state.disk2 === 'empty'
              ? []
              : [
                  { path: '/dev/sdb1', type: 'part', partlabel: 'sc-rescue-root', fstype: 'ext4', label: 'sc-rescue-root', mountpoint: null },
                  { path: '/dev/sdb2', type: 'part', partlabel: 'sc-bundle-store', fstype: null, label: null, mountpoint: null },
                  { path: '/dev/sdb3', type: 'part', partlabel: 'sc-bios-grub', fstype: null, label: null, mountpoint: null },
                ];
          return JSON.stringify({ blockdevices: [{ path: '/dev/sdb', type: 'disk', children }] });
        }
        return JSON.stringify(lsblk[disk] ?? { blockdevices: [] });
      }
      if (argv[0] === 'grub-editenv') return 'saved_entry=stagecoach-disk1p1\nnext_entry=stagecoach-disk2p1\n';
      return null;
    },
    async writeFile(path, content, mode) {
      writes.push({ path, content, mode });
    },
  };
  return { runner, ran, writes };
}

describe('LinuxMachine against a recording runner', () => {
  const sysRoot = join(tmp, 'sysroot');
  mkdirSync(join(sysRoot, 'etc'), { recursive: true });
  writeFileSync(join(sysRoot, 'etc/os-release'), 'ID=debian\nVERSION_ID="12"\n');

  const machine = (r: ReturnType<typeof recorder>) =>
    new LinuxMachine({
      hostId: 'a1',
      disks: { disk1: '/dev/sda', disk2: '/dev/sdb' },
      bootMode: 'bios-grub',
      runner: r.runner,
      sysRoot,
      exit: (n) => {
        throw new RebootSignal(n);
      },
    });

  it('partitions disk 2 once, refuses disk 1 (the running OS), and plans the boot entries', async () => {
    const r = recorder({ disk2: 'empty' });
    const m = machine(r);
    assert.deepEqual(await m.running(), { id: 'debian', version: '12', device: 'disk1p1' });
    assert.deepEqual(await m.partition('disk2', layout), { changed: true });
    assert.deepEqual(r.ran, planPartition('/dev/sdb', layout, 'bios-grub'));
    assert.deepEqual(await m.partition('disk2', layout), { changed: false });
    assert.equal(r.ran.length, 4);
    await assert.rejects(m.partition('disk1', layout), (e) => isScError(e, 'SC_ERR_CONFLICT'));
    await assert.rejects(m.mkfs('disk1p1'), (e) => isScError(e, 'SC_ERR_CONFLICT'));
    await assert.rejects(m.mkfs('disk3p1'), (e) => isScError(e, 'SC_ERR_NO_DEVICE'));
    r.ran.length = 0;
    await m.mkfs('disk2p1');
    assert.deepEqual(r.ran, planMkfs('/dev/sdb1', 'sc-rescue-root'));
    r.ran.length = 0;
    assert.equal(await m.mountPath('disk2p1'), '/mnt/stagecoach/disk2p1');
    assert.equal(await m.mountPath('disk1p1'), sysRoot, 'the running OS is its own root');
    assert.deepEqual(r.ran, planMount('/dev/sdb1', '/mnt/stagecoach/disk2p1'));
    await assert.rejects(m.mountPath('disk2p2'), (e) => isScError(e, 'SC_ERR_CONFLICT'), 'no filesystem yet');
    r.ran.length = 0;
    await m.setBootOnce('disk2p1');
    const changes = r.ran.filter((x) => x[0] !== 'mkdir' && x[0] !== 'mount'); // the recorder never reports a mount
    assert.deepEqual(changes, planOsGrubOnce('disk2p1'), "before the point of no return, A's own GRUB boots B once");
    assert.equal(r.writes[0].path, '/etc/grub.d/45_stagecoach');
    assert.equal(r.writes[0].mode, 0o755);
    assert.match(r.writes[0].content, /--id stagecoach-disk1p1 \{\n\tinsmod part_gpt\n\tinsmod part_msdos\n\tinsmod ext2\n\tsearch --no-floppy --label --set=root sc-os-root\n/);
    assert.match(r.writes[0].content, /--id stagecoach-disk2p1 \{\n(\tinsmod [^\n]*\n){3}\tsearch --no-floppy --label --set=root sc-rescue-root\n\tif linux \/vmlinuz root=LABEL=sc-rescue-root /);
    assert.deepEqual(await m.bootConfig(), { default: 'disk1p1', once: 'disk2p1', rescue: null });
    r.ran.length = 0;
    await assert.rejects(m.reboot(), RebootSignal);
    assert.deepEqual(r.ran, [['systemctl', 'reboot']]);
  });

  it('prints instead of running in a dry run', async () => {
    const lines: string[] = [];
    const m = new LinuxMachine({ hostId: 'a1', disks: { disk1: '/dev/sda', disk2: '/dev/sdb' }, bootMode: 'bios-grub', runner: dryRunRunner((l) => lines.push(l)), sysRoot });
    await m.setDefault('disk2p1');
    assert.ok(lines.includes('+ grub-install --target=i386-pc --boot-directory=/mnt/stagecoach/disk2p1/boot/stagecoach /dev/sda'), lines.join('\n'));
    assert.ok(lines.includes('+ grub-editenv /mnt/stagecoach/disk2p1/boot/stagecoach/grub/grubenv set saved_entry=stagecoach-disk2p1 stagecoach_loader=1'));
    assert.ok(lines.some((l) => l.startsWith('+ write /mnt/stagecoach/disk2p1/boot/stagecoach/grub/grub.cfg (mode 0644')));
  });

  it('refuses a bad configuration', () => {
    assert.throws(() => new LinuxMachine({ hostId: 'a', disks: { disk1: '/dev/sda' }, bootMode: 'bios-grub' }), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
    assert.throws(() => new LinuxMachine({ hostId: 'a', disks: { disk1: '/dev/sda', disk2: 'sdb; rm -rf /' }, bootMode: 'bios-grub' }), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
    assert.throws(() => new LinuxMachine({ hostId: 'a', disks: { disk1: '/dev/sda', disk2: '/dev/sdb' }, bootMode: 'coreboot' as 'uefi' }), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
  });
});

describe('LinuxMachine, UEFI, at the point of no return', () => {
  const A_ESP = '4f7da9a7-8137-c340-9036-52fd78b11302';
  const A_ROOT = '0b9d3c1e-5a0f-4c1e-9d2b-7e1f2a3b4c5d';
  const OTHER = '11111111-2222-3333-4444-555555555555';
  const verbose = [
    'BootCurrent: 0004',
    'BootOrder: 0001,0002,0004,0003',
    `Boot0001* debian\tHD(2,GPT,${A_ESP.toUpperCase()},0x800,0x80000)/File(\\EFI\\debian\\grubx64.efi)`,
    'Boot0002* UEFI PXEv4 (MAC:525400123456)\tPciRoot(0x0)/Pci(0x3,0x0)/MAC(525400123456,1)/IPv4(0.0.0.0,0,DHCP)',
    `Boot0003* other disk\tHD(1,GPT,${OTHER},0x800,0x80000)/File(\\EFI\\other\\x.efi)`,
    'Boot0004* stagecoach disk2p1\tHD(3,GPT,9a1e0000-0000-0000-0000-000000000003,0x800,0x100000)/File(\\EFI\\stagecoach\\disk2p1.efi)',
  ].join('\n');
  const plain = verbose.replace(/\t.*$/gm, '');

  it("deletes the NVRAM entries of A's own loader on disk 1, and only those, when stagecoach takes the default", async () => {
    const ran: string[][] = [];
    const deleted = new Set<string>();
    // As efibootmgr does: a deleted entry leaves the list and BootOrder.
    const without = (text: string) =>
      text
        .split('\n')
        .filter((l) => ![...deleted].some((n) => l.startsWith(`Boot${n}`)))
        .map((l) => (l.startsWith('BootOrder:') ? `BootOrder: ${l.slice(11).trim().split(',').filter((n) => !deleted.has(n)).join(',')}` : l))
        .join('\n');
    const sysRoot = join(tmp, 'uefi-root');
    mkdirSync(join(sysRoot, 'etc'), { recursive: true });
    writeFileSync(join(sysRoot, 'etc/os-release'), 'ID=debian\nVERSION_ID="12"\n');
    const m = new LinuxMachine({
      hostId: 'u1',
      disks: { disk1: '/dev/sda', disk2: '/dev/sdb' },
      bootMode: 'uefi',
      sysRoot,
      runner: {
        dryRun: false,
        async run(argv) {
          ran.push(argv);
          const i = argv.indexOf('--bootnum');
          if (i >= 0 && argv.includes('--delete-bootnum')) deleted.add(argv[i + 1]);
          return '';
        },
        async query(argv) {
          if (argv[0] === 'findmnt') return '/dev/sdb1\n';
          if (argv[0] === 'lsblk' && argv.includes('PARTUUID')) return argv[argv.length - 1] === '/dev/sda' ? `${A_ROOT}\n${A_ESP}\n` : '';
          if (argv[0] === 'lsblk') {
            const disk = argv[argv.length - 1];
            const children =
              disk === '/dev/sdb'
                ? [
                    { path: '/dev/sdb1', type: 'part', partlabel: 'sc-rescue-root', fstype: 'ext4', label: 'sc-rescue-root', mountpoint: null },
                    { path: '/dev/sdb2', type: 'part', partlabel: 'sc-bundle-store', fstype: 'ext4', label: 'sc-bundle-store', mountpoint: null },
                    { path: '/dev/sdb3', type: 'part', partlabel: 'sc-esp', fstype: 'vfat', label: 'SC-ESP', mountpoint: join(tmp, 'esp') },
                  ]
                : [{ path: '/dev/sda1', type: 'part', partlabel: null, fstype: 'ext4', label: null, mountpoint: null }];
            return JSON.stringify({ blockdevices: [{ path: disk, type: 'disk', children }] });
          }
          if (argv[0] === 'efibootmgr') return without(argv.includes('--verbose') ? verbose : plain);
          return null;
        },
        async writeFile() {},
      },
    });
    await m.setDefault('disk2p1');
    const efi = ran.filter((x) => x[0] === 'efibootmgr');
    assert.deepEqual(
      efi.filter((x) => x.includes('--delete-bootnum')),
      [['efibootmgr', '--bootnum', '0001', '--delete-bootnum']],
      "only A's entry on disk 1: network boot, another disk and stagecoach's own stay",
    );
    assert.deepEqual(efi.at(-1), ['efibootmgr', '--bootorder', '0004,0002,0003'], 'stagecoach first, without the deleted entry');
    const esp = join(tmp, 'esp');
    const fs = ran.filter((x) => ['cp', 'mv', 'sync', 'grub-mkstandalone'].includes(x[0]));
    assert.deepEqual(
      fs.slice(-3),
      [
        ['cp', `${esp}/EFI/stagecoach/disk2p1.efi`, `${esp}/EFI/BOOT/BOOTX64.EFI.new`],
        ['mv', `${esp}/EFI/BOOT/BOOTX64.EFI.new`, `${esp}/EFI/BOOT/BOOTX64.EFI`],
        ['sync', '-f', `${esp}/EFI/stagecoach/disk2p1.efi`],
      ],
      "the default's loader at the removable-media path (for a firmware that loses its entries), renamed into place and synced",
    );
    const built = fs.findIndex((x) => x[0] === 'grub-mkstandalone');
    assert.deepEqual(fs.slice(built, built + 3).map((x) => x[0]), ['grub-mkstandalone', 'mv', 'mv'], 'the loader is built beside its place, renamed, then its config');
    ran.length = 0;
    await m.setDefault('disk2p1');
    assert.equal(ran.filter((x) => x.includes('--delete-bootnum')).length, 0, 'nothing left to delete the second time');
  });

  it('reads the partition of an entry from efibootmgr --verbose', () => {
    const st = parseEfibootmgr(verbose);
    assert.equal(st.entries[0].partuuid, A_ESP);
    assert.equal(st.entries[0].label, 'debian');
    assert.equal(st.entries[1].partuuid, undefined);
  });
});
