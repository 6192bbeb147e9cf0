/**
 * The VM images of the real-machine proof, built from Debian packages with mmdebstrap (from the
 * apt mirror that /etc/apt/sources.list* names) and cached by a digest of their recipe:
 * - OS **A**: Debian 12, ifupdown with a static IP, openssh-server with its own host keys, a
 *   kernel, GRUB on disk 1 (a disk per firmware: BIOS/msdos or UEFI/GPT+ESP, plus the OVMF vars
 *   that hold its NVRAM boot entry). GRUB is installed by A itself on a first boot (direct kernel
 *   boot under qemu), exactly as an installer would.
 * - OS **B** (base/rescue): Debian 12 with systemd-networkd, minimal.
 * - OS **C** (target): Debian 12 with netplan.io (rendered by networkd): a third network format.
 * B and C are vanilla trees (rootfs.tar, published with `stagecoach publish` by the harness):
 * no SSH host keys, an empty machine id, nothing of stagecoach. All three carry a kernel with
 * its initramfs, GRUB's tools, parted, e2fsprogs, dosfstools and efibootmgr, as a server image
 * would.
 *
 * Layout of the cache DIR: `operator/id_ed25519{,.pub}` (the key that logs into A),
 * `images/<name>-<digest>/` per image (`rootfs.tar`, `image.json`; A also `disk.qcow2`, and
 * `vars.fd` for UEFI). A directory is complete only once its `image.json` exists.
 */
import { createHash } from 'node:crypto';
import { existsSync, promises as fsp, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { scError } from '../../shared/errors.js';
import { run } from './exec.js';
import { type Firmware, firmwareFiles, qemuArgs, startVm, waitForExit } from './qemu.js';

/** What a built image set holds. */
export interface ImageSet {
  cache: string;
  operatorKey: string;
  operatorPub: string;
  /** Root filesystem tarballs of B and C (vanilla; publish them). */
  base: { tar: string; digest: string };
  target: { tar: string; digest: string };
  /** OS A's disk 1 per firmware (qcow2; boot it through an overlay) and UEFI vars. */
  a: Partial<Record<Firmware, { disk: string; vars?: string; digest: string }>>;
}

/** Packages every image carries. */
const COMMON_PACKAGES = [
  'linux-image-cloud-amd64', 'systemd', 'systemd-sysv', 'udev', 'dbus', 'openssh-server', 'iproute2', 'parted', 'e2fsprogs', 'dosfstools',
  'efibootmgr', 'grub-pc-bin', 'grub-efi-amd64-bin', 'grub2-common', 'kmod', 'initramfs-tools', 'util-linux', 'procps', 'fdisk', 'zstd', 'libstdc++6',
];

/** Bumped whenever the build procedure changes in a way the recipes do not show. */
const BUILD_VERSION = 3;

/** A's static address as qemu's user network sees it. */
export const GUEST_IP = '10.0.2.15/24';
export const GUEST_GATEWAY = '10.0.2.2';
/** The guest's NIC under `-M pc` with virtio-net in slot 3. */
export const GUEST_NIC = 'ens3';

interface Recipe {
  name: 'a' | 'b' | 'c';
  packages: string[];
  /** Files laid over the tree (path → [mode, content]). */
  files: Record<string, [number, string]>;
  /** Commands run in the chroot (argv), after the files. */
  chroot: string[][];
  /** Remove SSH host keys and empty the machine id (vanilla images). */
  vanilla: boolean;
}

const FIRSTBOOT = `#!/bin/sh
# Image build only: installs GRUB for the firmware named on the kernel command line, then powers off.
set -eu
fw=$(sed -n 's/.*sc\\.firmware=\\([a-z]*\\).*/\\1/p' /proc/cmdline)
say() { echo "sc-image: $*" > /dev/ttyS0; }
if [ "$fw" = uefi ]; then
  mkdir -p /boot/efi
  mount LABEL=A-ESP /boot/efi
  grep -q A-ESP /etc/fstab || echo 'LABEL=A-ESP /boot/efi vfat umask=0077 0 2' >> /etc/fstab
  grub-install --target=x86_64-efi --efi-directory=/boot/efi --bootloader-id=debian
else
  grub-install --target=i386-pc /dev/vda
fi
update-grub
rm -f /etc/sc-image-firstboot
sync
say "firstboot ok ($fw)"
systemctl poweroff
`;

const MARKER = `#!/bin/sh
# Test fixture of OS A's image: a "booted" line on the serial console.
echo "sc-image: booted root=$(findmnt -no SOURCE /) ip=$(ip -4 -o addr show scope global | awk '{print $4}' | head -n1)" > /dev/ttyS0
`;

function unit(description: string, exec: string, extra = ''): string {
  return `[Unit]\nDescription=${description}\n${extra}\n[Service]\nType=oneshot\nExecStart=${exec}\n\n[Install]\nWantedBy=multi-user.target\n`;
}

function recipes(operatorPub: string): Record<'a' | 'b' | 'c', Recipe> {
  const [addr, prefix] = GUEST_IP.split('/');
  const mask = ['255.255.255.0', '255.255.0.0'][prefix === '24' ? 0 : 1];
  return {
    a: {
      name: 'a',
      packages: [...COMMON_PACKAGES, 'ifupdown'],
      files: {
        '/etc/network/interfaces': [0o644, `source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\nallow-hotplug ${GUEST_NIC}\niface ${GUEST_NIC} inet static\n\taddress ${addr}\n\tnetmask ${mask}\n\tgateway ${GUEST_GATEWAY}\n`],
        '/etc/resolv.conf': [0o644, `nameserver ${GUEST_GATEWAY}\n`],
        '/etc/hostname': [0o644, 'vm1\n'],
        '/etc/hosts': [0o644, '127.0.0.1 localhost\n127.0.1.1 vm1\n'],
        '/etc/fstab': [0o644, 'LABEL=a-root / ext4 errors=remount-ro 0 1\n'],
        '/root/.ssh/authorized_keys': [0o600, operatorPub],
        '/etc/default/grub': [
          0o644,
          'GRUB_DEFAULT=0\nGRUB_TIMEOUT=3\nGRUB_DISTRIBUTOR=Debian\nGRUB_CMDLINE_LINUX_DEFAULT=""\nGRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8 panic=10"\nGRUB_TERMINAL="serial console"\nGRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"\nGRUB_DISABLE_OS_PROBER=true\n',
        ],
        '/etc/sc-image-firstboot': [0o644, ''],
        '/usr/local/sbin/sc-image-firstboot': [0o755, FIRSTBOOT],
        '/usr/local/sbin/sc-image-marker': [0o755, MARKER],
        '/etc/systemd/system/sc-image-firstboot.service': [0o644, unit('Image build: install GRUB, then power off', '/usr/local/sbin/sc-image-firstboot', 'ConditionPathExists=/etc/sc-image-firstboot\nAfter=local-fs.target\n')],
        '/etc/systemd/system/sc-image-marker.service': [0o644, unit('Image fixture: booted marker on ttyS0', '/usr/local/sbin/sc-image-marker', 'After=network-online.target ssh.service\nWants=network-online.target\n')],
      },
      chroot: [
        ['systemctl', 'enable', 'sc-image-firstboot.service', 'sc-image-marker.service'],
      ],
      vanilla: false,
    },
    b: {
      name: 'b',
      packages: [...COMMON_PACKAGES],
      files: { '/etc/hostname': [0o644, 'localhost\n'] },
      chroot: [['systemctl', 'enable', 'systemd-networkd.service']],
      vanilla: true,
    },
    c: {
      name: 'c',
      packages: [...COMMON_PACKAGES, 'netplan.io'],
      files: { '/etc/hostname': [0o644, 'localhost\n'] },
      chroot: [['systemctl', 'enable', 'systemd-networkd.service']],
      vanilla: true,
    },
  };
}

function aptSources(): string {
  const parts: string[] = [];
  for (const f of ['/etc/apt/sources.list']) if (existsSync(f)) parts.push(readFileSync(f, 'utf8'));
  const d = '/etc/apt/sources.list.d';
  if (existsSync(d)) for (const f of readdirSync(d).sort()) if (/\.(list|sources)$/.test(f)) parts.push(readFileSync(join(d, f), 'utf8'));
  return parts.join('\n');
}

function digestOf(x: unknown): string {
  return createHash('sha256').update(JSON.stringify(x)).digest('hex').slice(0, 16);
}

async function ensureOperatorKey(cache: string): Promise<{ key: string; pub: string }> {
  const dir = join(cache, 'operator');
  const key = join(dir, 'id_ed25519');
  if (!existsSync(`${key}.pub`)) {
    await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
    await fsp.rm(key, { force: true });
    await run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', 'stagecoach-vm-operator', '-f', key]);
  }
  return { key, pub: await fsp.readFile(`${key}.pub`, 'utf8') };
}

/** Builds (or reuses) a root filesystem tarball; returns its directory. */
async function buildRootfs(cache: string, r: Recipe, log: (l: string) => void): Promise<{ dir: string; digest: string }> {
  const digest = digestOf({ v: BUILD_VERSION, r, sources: aptSources() });
  const dir = join(cache, 'images', `${r.name}-${digest}`);
  if (existsSync(join(dir, 'image.json'))) {
    log(`image ${r.name}: cached (${dir})`);
    return { dir, digest };
  }
  await fsp.rm(dir, { recursive: true, force: true });
  await fsp.mkdir(dir, { recursive: true });
  const overlay = join(dir, 'overlay');
  for (const [path, [mode, content]] of Object.entries(r.files)) {
    const p = join(overlay, path);
    await fsp.mkdir(join(p, '..'), { recursive: true });
    await fsp.writeFile(p, content, { mode });
    await fsp.chmod(p, mode);
  }
  const hooks: string[] = [`--customize-hook=sync-in ${overlay} /`];
  for (const argv of r.chroot) hooks.push(`--customize-hook=chroot "$1" ${argv.join(' ')}`);
  if (r.vanilla) hooks.push('--customize-hook=rm -f "$1"/etc/ssh/ssh_host_*', '--customize-hook=: > "$1"/etc/machine-id', '--customize-hook=rm -f "$1"/var/lib/dbus/machine-id');
  const t0 = Date.now();
  log(`image ${r.name}: mmdebstrap (${r.packages.length} packages)…`);
  await run(
    [
      'mmdebstrap', '--variant=minbase', '--mode=root', '--format=tar', `--include=${r.packages.join(',')}`,
      '--dpkgopt=path-exclude=/usr/share/man/*', '--dpkgopt=path-exclude=/usr/share/locale/*', '--dpkgopt=path-exclude=/usr/share/doc/*',
      '--dpkgopt=path-include=/usr/share/locale/locale.alias',
      ...hooks, 'bookworm', join(dir, 'rootfs.tar'),
    ],
    { timeoutMs: 30 * 60_000 },
  );
  const size = (await fsp.stat(join(dir, 'rootfs.tar'))).size;
  await fsp.writeFile(join(dir, 'image.json'), `${JSON.stringify({ name: r.name, digest, packages: r.packages, bytes: size, seconds: Math.round((Date.now() - t0) / 1000) })}\n`);
  log(`image ${r.name}: ${(size / 2 ** 20).toFixed(0)} MiB in ${Math.round((Date.now() - t0) / 1000)} s`);
  return { dir, digest };
}

/** A's disk 1 for `fw`, made from its rootfs and finished by its own first boot. */
async function buildDiskA(cache: string, rootfs: { dir: string; digest: string }, fw: Firmware, log: (l: string) => void): Promise<{ disk: string; vars?: string; digest: string }> {
  const digest = digestOf({ v: BUILD_VERSION, rootfs: rootfs.digest, fw });
  const dir = join(cache, 'images', `a-${fw}-${digest}`);
  const out = { disk: join(dir, 'disk.qcow2'), ...(fw === 'uefi' ? { vars: join(dir, 'vars.fd') } : {}), digest };
  if (existsSync(join(dir, 'image.json'))) {
    log(`disk A (${fw}): cached (${dir})`);
    return out;
  }
  const t0 = Date.now();
  await fsp.rm(dir, { recursive: true, force: true });
  await fsp.mkdir(dir, { recursive: true });
  const tree = join(dir, 'tree');
  await fsp.mkdir(tree);
  await run(['tar', '--extract', '--numeric-owner', '--xattrs', '--xattrs-include=*', '--file', join(rootfs.dir, 'rootfs.tar'), '--directory', tree]);
  const raw = join(dir, 'disk.raw');
  const diskMiB = 4096;
  const espMiB = 256;
  await run(['truncate', '--size', `${diskMiB}M`, raw]);
  // BIOS: msdos, p1 = root. UEFI: GPT, p1 = root (placed after the ESP), p2 = ESP.
  const rootStartMiB = fw === 'uefi' ? 1 + espMiB : 1;
  const table =
    fw === 'uefi'
      ? `label: gpt\nstart=${rootStartMiB}MiB, type=linux, name=root\nstart=1MiB, size=${espMiB}MiB, type=uefi, name=esp\n`
      : `label: dos\nstart=1MiB, type=83, bootable\n`;
  await run(['sfdisk', '--quiet', raw], { input: table });
  const rootMiB = diskMiB - rootStartMiB - 1;
  const fs = join(dir, 'root.ext4');
  await run(['mkfs.ext4', '-q', '-L', 'a-root', '-d', tree, fs, `${rootMiB}M`]);
  await run(['dd', `if=${fs}`, `of=${raw}`, 'bs=1M', `seek=${rootStartMiB}`, 'conv=notrunc,sparse', 'status=none']);
  await fsp.rm(fs);
  if (fw === 'uefi') {
    const esp = join(dir, 'esp.vfat');
    await run(['mkfs.vfat', '-F', '32', '-n', 'A-ESP', '-C', esp, String(espMiB * 1024)]);
    await run(['dd', `if=${esp}`, `of=${raw}`, 'bs=1M', 'seek=1', 'conv=notrunc,sparse', 'status=none']);
    await fsp.rm(esp);
    await fsp.copyFile(firmwareFiles().varsTemplate, out.vars!);
  }
  // First boot: the kernel and initramfs straight from the tree; A installs its own GRUB and powers off.
  const kernel = join(dir, 'vmlinuz');
  const initrd = join(dir, 'initrd.img');
  await fsp.copyFile(join(tree, 'vmlinuz'), kernel);
  await fsp.copyFile(join(tree, 'initrd.img'), initrd);
  await fsp.rm(tree, { recursive: true, force: true });
  log(`disk A (${fw}): first boot installs GRUB…`);
  const vm = await startVm(
    qemuArgs({
      firmware: fw,
      disks: [{ file: raw, format: 'raw' }],
      vars: out.vars,
      serialLog: join(dir, 'firstboot.log'),
      kernel: { kernel, initrd, append: `root=LABEL=a-root rw console=ttyS0,115200n8 sc.firmware=${fw} panic=10` },
      noReboot: true,
    }),
  );
  await waitForExit(vm, 20 * 60_000);
  const serial = await fsp.readFile(join(dir, 'firstboot.log'), 'utf8').catch(() => '');
  if (!serial.includes('sc-image: firstboot ok')) {
    throw scError('SC_ERR_COMMAND_FAILED', `A's first boot (${fw}) did not install GRUB; see ${join(dir, 'firstboot.log')}`, { tail: serial.slice(-2000) });
  }
  await run(['qemu-img', 'convert', '-O', 'qcow2', raw, out.disk]);
  await fsp.rm(raw);
  await fsp.rm(kernel);
  await fsp.rm(initrd);
  await fsp.writeFile(join(dir, 'image.json'), `${JSON.stringify({ name: `a-${fw}`, digest, seconds: Math.round((Date.now() - t0) / 1000) })}\n`);
  log(`disk A (${fw}): ready in ${Math.round((Date.now() - t0) / 1000)} s`);
  return out;
}

/**
 * Builds what is missing of the image set in `cache` (rootfs tarballs of A, B and C; A's disk
 * for each firmware asked for) and returns it. Throws SC_ERR_COMMAND_FAILED / SC_ERR_TIMEOUT.
 */
export async function buildImages(cache: string, firmwares: Firmware[], log: (l: string) => void = () => {}): Promise<ImageSet> {
  await fsp.mkdir(join(cache, 'images'), { recursive: true });
  const op = await ensureOperatorKey(cache);
  const r = recipes(op.pub);
  const a = await buildRootfs(cache, r.a, log);
  const b = await buildRootfs(cache, r.b, log);
  const c = await buildRootfs(cache, r.c, log);
  const disks: ImageSet['a'] = {};
  for (const fw of firmwares) disks[fw] = await buildDiskA(cache, a, fw, log);
  return {
    cache,
    operatorKey: op.key,
    operatorPub: `${op.key}.pub`,
    base: { tar: join(b.dir, 'rootfs.tar'), digest: b.digest },
    target: { tar: join(c.dir, 'rootfs.tar'), digest: c.digest },
    a: disks,
  };
}
