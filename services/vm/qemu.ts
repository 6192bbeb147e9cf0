/**
 * Starting and stopping the qemu virtual machines of the real-machine proof.
 *
 * - Acceleration: real KVM where the host has hardware virtualisation (`/dev/kvm` backed by
 *   kvm_intel or kvm_amd); otherwise qemu's TCG with one thread per vCPU. A nested "PVM" KVM
 *   (kvm_pvm) is slower than TCG and is not used. Under TCG the CPU model is Nehalem: no AVX,
 *   whose emulation is new in qemu 7.2 and is suspected of the rare crashes of JIT-compiled
 *   code seen under `-cpu max`.
 * - Network: qemu's user network with `restrict=on`: the guest reaches only the host services
 *   the harness forwards (`guestfwd`, one socat per connection to 127.0.0.1) and nothing else;
 *   SSH into the guest through a host forward on 127.0.0.1.
 * - Disks: virtio, disk 1 then disk 2 (`/dev/vda`, `/dev/vdb`), booted in that order.
 * - Firmware: SeaBIOS (bios) or OVMF with a writable vars file per VM (uefi).
 * - Serial console to a file (the boot log); the qemu monitor on a unix socket (power cut,
 *   reset).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, promises as fsp } from 'node:fs';
import { connect } from 'node:net';
import { scError } from '../../shared/errors.js';

/** Firmware of a VM. */
export type Firmware = 'bios' | 'uefi';

/** The accelerator qemu runs with here. */
export type Accel = 'kvm' | 'tcg';

/** The host's usable accelerator. */
export function detectAccel(): Accel {
  if (!existsSync('/dev/kvm') || existsSync('/sys/module/kvm_pvm')) return 'tcg';
  return existsSync('/sys/module/kvm_intel') || existsSync('/sys/module/kvm_amd') ? 'kvm' : 'tcg';
}

/** OVMF code (read-only) and the vars template a VM's writable copy starts from. */
export function firmwareFiles(): { code: string; varsTemplate: string } {
  for (const [code, vars] of [
    ['/usr/share/OVMF/OVMF_CODE_4M.fd', '/usr/share/OVMF/OVMF_VARS_4M.fd'],
    ['/usr/share/OVMF/OVMF_CODE.fd', '/usr/share/OVMF/OVMF_VARS.fd'],
  ]) {
    if (existsSync(code) && existsSync(vars)) return { code, varsTemplate: vars };
  }
  throw scError('SC_ERR_BAD_CONFIG', 'OVMF is not installed (apt-get install ovmf)');
}

/** A forward from the guest (`ip:port`) to a host TCP port on 127.0.0.1. */
export interface GuestForward {
  guest: string;
  port: number;
  hostPort: number;
}

/** What a VM is made of. */
export interface VmSpec {
  firmware: Firmware;
  disks: { file: string; format: 'raw' | 'qcow2' }[];
  /** UEFI: this VM's writable vars file. */
  vars?: string;
  serialLog: string;
  monitor?: string;
  sshPort?: number;
  forwards?: GuestForward[];
  /** Direct kernel boot (image building only). */
  kernel?: { kernel: string; initrd: string; append: string };
  noReboot?: boolean;
  memMiB?: number;
  cpus?: number;
  accel?: Accel;
  mac?: string;
}

/** The qemu-system-x86_64 argv of a VM. */
export function qemuArgs(s: VmSpec): string[] {
  const accel = s.accel ?? detectAccel();
  const a = ['qemu-system-x86_64', '-M', 'pc', '-m', String(s.memMiB ?? 2048), '-smp', String(s.cpus ?? 2)];
  a.push(...(accel === 'kvm' ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', 'tcg,thread=multi', '-cpu', 'Nehalem']));
  // The serial log is appended to, so it holds every boot of the VM (qemu restarts after each reboot).
  a.push('-display', 'none', '-vga', 'none', '-chardev', `file,id=s0,path=${s.serialLog},append=on`, '-serial', 'chardev:s0', '-no-user-config', '-nodefaults');
  if (s.monitor) a.push('-monitor', `unix:${s.monitor},server,nowait`);
  if (s.firmware === 'uefi') {
    if (!s.vars) throw scError('SC_ERR_BAD_CONFIG', 'a UEFI VM needs its own vars file');
    a.push('-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${firmwareFiles().code}`, '-drive', `if=pflash,format=raw,unit=1,file=${s.vars}`);
  }
  s.disks.forEach((d, i) => {
    a.push('-drive', `file=${d.file},format=${d.format},if=none,id=d${i + 1},discard=unmap`, '-device', `virtio-blk-pci,drive=d${i + 1},bootindex=${i + 1},addr=0x${(4 + i).toString(16)}`);
  });
  const net = ['user', 'id=n0', 'restrict=on', 'net=10.0.2.0/24'];
  if (s.sshPort) net.push(`hostfwd=tcp:127.0.0.1:${s.sshPort}-:22`);
  for (const f of s.forwards ?? []) net.push(`guestfwd=tcp:${f.guest}:${f.port}-cmd:socat - TCP:127.0.0.1:${f.hostPort}`);
  a.push('-netdev', net.join(','), '-device', `virtio-net-pci,netdev=n0,addr=0x3,mac=${s.mac ?? '52:54:00:5c:00:01'}`);
  if (s.kernel) a.push('-kernel', s.kernel.kernel, '-initrd', s.kernel.initrd, '-append', s.kernel.append);
  if (s.noReboot) a.push('-no-reboot');
  return a;
}

/** A running qemu. */
export interface Vm {
  child: ChildProcess;
  pid: number;
  argv: string[];
  /** Settles with the exit code when qemu ends. */
  exited: Promise<number | null>;
  stderr(): string;
}

/** Starts qemu. Throws SC_ERR_COMMAND_FAILED when it cannot start. */
export async function startVm(argv: string[]): Promise<Vm> {
  const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr?.on('data', (c: Buffer) => {
    err = (err + c).slice(-8000);
  });
  const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  await new Promise<void>((res, rej) => {
    child.once('spawn', () => res());
    child.once('error', (e) => rej(scError('SC_ERR_COMMAND_FAILED', `qemu did not start: ${e.message}`)));
  });
  // qemu fails fast on bad arguments; give it a moment to say so.
  const early = await Promise.race([exited, new Promise<'up'>((r) => setTimeout(() => r('up'), 500))]);
  if (early !== 'up') throw scError('SC_ERR_COMMAND_FAILED', `qemu exited at once (${early}): ${err.trim().slice(-1000)}`, { argv });
  return { child, pid: child.pid!, argv, exited, stderr: () => err };
}

/** Waits for qemu to end; SC_ERR_TIMEOUT (qemu killed) after `ms`. */
export async function waitForExit(vm: Vm, ms: number): Promise<number | null> {
  let timer: NodeJS.Timeout | undefined;
  const r = await Promise.race([vm.exited, new Promise<'timeout'>((res) => (timer = setTimeout(() => res('timeout'), ms)))]);
  clearTimeout(timer);
  if (r === 'timeout') {
    vm.child.kill('SIGKILL');
    throw scError('SC_ERR_TIMEOUT', `the VM did not power off within ${Math.round(ms / 1000)} s`);
  }
  return r;
}

/** Sends one command to the qemu monitor socket (`quit`, `system_reset`, …). */
export async function monitorCommand(sock: string, cmd: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const s = connect(sock);
    s.once('error', (e) => reject(scError('SC_ERR_COMMAND_FAILED', `qemu monitor: ${e.message}`)));
    s.once('connect', () => {
      s.write(`${cmd}\n`);
      setTimeout(() => {
        s.destroy();
        resolve();
      }, 300);
    });
  });
}

/** Stops a VM: SIGTERM, then SIGKILL after 5 s. */
export async function stopVm(vm: Vm): Promise<void> {
  if (vm.child.exitCode !== null || vm.child.signalCode !== null) return;
  vm.child.kill('SIGTERM');
  const t = setTimeout(() => vm.child.kill('SIGKILL'), 5000);
  await vm.exited;
  clearTimeout(t);
}

/** Resolves once `pattern` appears in the serial log after byte `from`; SC_ERR_TIMEOUT after `ms`. */
export async function waitForSerial(log: string, pattern: RegExp, o: { from?: number; ms: number; vm?: Vm }): Promise<{ match: RegExpExecArray; end: number }> {
  const deadline = Date.now() + o.ms;
  for (;;) {
    const text = await fsp.readFile(log, 'utf8').catch(() => '');
    const tail = text.slice(o.from ?? 0);
    const m = pattern.exec(tail);
    if (m) return { match: m, end: (o.from ?? 0) + m.index + m[0].length };
    if (o.vm && (o.vm.child.exitCode !== null || o.vm.child.signalCode !== null)) throw scError('SC_ERR_BOOT_FAILED', `qemu ended while waiting for ${pattern}`);
    if (Date.now() > deadline) throw scError('SC_ERR_TIMEOUT', `no ${pattern} on the serial console within ${Math.round(o.ms / 1000)} s`, { tail: tail.slice(-1500) });
    await new Promise((r) => setTimeout(r, 1000));
  }
}
