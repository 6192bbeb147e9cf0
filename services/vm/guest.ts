/**
 * The proof's view of a guest from outside, over SSH through the host forward on 127.0.0.1:
 * run a command, wait for SSH, and read the facts a check compares (OS, root device, IP, host
 * key fingerprint, the boot loader's rescue entry). The first connection records the guest's
 * host keys in the run's known_hosts; every later one insists on them
 * (StrictHostKeyChecking=yes), so a changed host key fails the login itself.
 */
import { scError } from '../../shared/errors.js';
import { run } from './exec.js';

/** How to reach a guest. */
export interface GuestSsh {
  port: number;
  identity: string;
  knownHosts: string;
}

/** Facts of the running guest. `os` is "$ID $VERSION_ID"; `ip` as `ip -4 addr` shows it. */
export interface GuestFacts {
  os: string;
  root: string;
  ip: string;
  hostKeyFingerprint: string;
}

function sshArgv(g: GuestSsh, strict: boolean): string[] {
  return [
    'ssh', '-p', String(g.port), '-i', g.identity, '-o', 'BatchMode=yes', '-o', 'IdentitiesOnly=yes', '-o', `UserKnownHostsFile=${g.knownHosts}`,
    '-o', `StrictHostKeyChecking=${strict ? 'yes' : 'accept-new'}`, '-o', 'ConnectTimeout=10', '-o', 'ServerAliveInterval=15', '-o', 'LogLevel=ERROR', 'root@127.0.0.1',
  ];
}

/**
 * Runs `script` (a shell command line in the guest); resolves its stdout. ssh's own failures
 * (exit 255: the connection was refused or dropped, as while a freshly booted guest's sshd
 * settles) are retried twice, 5 s apart; every script the proof runs is safe to run again.
 */
export async function ssh(g: GuestSsh, script: string, o: { input?: Buffer | string; timeoutMs?: number; firstContact?: boolean } = {}): Promise<string> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await run([...sshArgv(g, !o.firstContact), script], { input: o.input, timeoutMs: o.timeoutMs ?? 120_000 });
    } catch (err) {
      const code = (err as { details?: { code?: unknown } }).details?.code;
      if (code !== 255 || attempt >= 3) throw err;
      await new Promise((r) => setTimeout(r, 5000));
    }
  }
}

/** Waits until the guest answers SSH (and `check` holds, when given); SC_ERR_TIMEOUT after `ms`. */
export async function waitForSsh(g: GuestSsh, ms: number, o: { firstContact?: boolean; check?: (f: GuestFacts) => boolean; alive?: () => boolean } = {}): Promise<GuestFacts> {
  const deadline = Date.now() + ms;
  let last = '';
  for (;;) {
    if (o.alive && !o.alive()) throw scError('SC_ERR_BOOT_FAILED', 'qemu ended while waiting for SSH');
    try {
      const f = await facts(g, o.firstContact);
      if (!o.check || o.check(f)) return f;
      last = `guest answers but runs ${f.os} from ${f.root}`;
    } catch (err) {
      last = (err as Error).message;
    }
    if (Date.now() > deadline) throw scError('SC_ERR_TIMEOUT', `the guest did not come up within ${Math.round(ms / 1000)} s: ${last.slice(0, 300)}`);
    await new Promise((r) => setTimeout(r, 3000));
  }
}

/** The running guest's OS, root device, IPv4 with prefix, and ed25519 host key fingerprint (from ssh-keyscan). */
export async function facts(g: GuestSsh, firstContact = false): Promise<GuestFacts> {
  const out = await ssh(g, '. /etc/os-release; echo "os=$ID $VERSION_ID"; echo "root=$(findmnt -no SOURCE /)"; echo "ip=$(ip -4 -o addr show scope global | awk \'{print $4}\' | head -n1)"', {
    firstContact,
    timeoutMs: 60_000,
  });
  const get = (k: string) => new RegExp(`^${k}=(.*)$`, 'm').exec(out)?.[1]?.trim() ?? '';
  return { os: get('os'), root: get('root'), ip: get('ip'), hostKeyFingerprint: await hostKeyFingerprint(g.port) };
}

/** The guest's ed25519 host key fingerprint as `ssh-keygen -lf` prints it (SHA256:…). */
export async function hostKeyFingerprint(port: number): Promise<string> {
  const scan = await run(['ssh-keyscan', '-t', 'ed25519', '-p', String(port), '127.0.0.1'], { timeoutMs: 30_000 });
  if (!scan.trim()) throw scError('SC_ERR_UNAVAILABLE', 'ssh-keyscan got no ed25519 key');
  const fp = await run(['ssh-keygen', '-lf', '-'], { input: scan });
  const m = /(SHA256:[A-Za-z0-9+/=]+)/.exec(fp);
  if (!m) throw scError('SC_ERR_INTERNAL', `unexpected ssh-keygen output: ${fp.slice(0, 200)}`);
  return m[1];
}

/**
 * The rescue entry as the boot loader itself has it, read in the guest without the agent:
 * BIOS, the stagecoach loader's grubenv and grub.cfg on /dev/vdb1; UEFI, efibootmgr's entries.
 */
export async function rescueEntry(g: GuestSsh, firmware: 'bios' | 'uefi'): Promise<string | null> {
  if (firmware === 'uefi') {
    const out = await ssh(g, 'efibootmgr');
    return /stagecoach rescue (disk[1-9]p[1-9])/.exec(out)?.[1] ?? null;
  }
  const out = await ssh(
    g,
    'd=$(findmnt -rno TARGET -S /dev/vdb1 | head -n1); if [ -z "$d" ]; then d=/run/sc-check; mkdir -p $d; mount -o ro /dev/vdb1 $d; fi; grub-editenv $d/boot/stagecoach/grub/grubenv list; grep -o "stagecoach rescue ([a-z0-9]*)" $d/boot/stagecoach/grub/grub.cfg || true',
  );
  const env = /^stagecoach_rescue=(disk[1-9]p[1-9])$/m.exec(out)?.[1] ?? null;
  return env && out.includes(`stagecoach rescue (${env})`) ? env : null;
}
