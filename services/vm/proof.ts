/**
 * `stagecoach vm proof`: converts a real virtual machine from A to C with the production
 * services and the linux driver, and checks the result from outside.
 *
 * 1. Images (images.ts, cached) and the agent runtime (runtime.ts).
 * 2. On 127.0.0.1: Redis, an origin, a stage with the colo's relay, and control. B and C are
 *    published with `stagecoach publish` (zstd, age, signed).
 * 3. A qemu VM boots A from a throwaway overlay of A's disk, with an empty disk 2. The guest
 *    reaches only the stage and the origin, through guest forwards (10.0.2.100:80,
 *    10.0.2.101:80); SSH reaches the guest through a host forward.
 * 4. Over SSH, as an operator would: the agent's runtime, config, keys and unit go into A and
 *    the unit starts. The agent registers (relay mode: no Redis in the guest).
 * 5. A rollout through control, followed to its end; the step times come from control.
 * 6. Checks over SSH: C's os-release, root on disk 1, the same IP, the same ed25519 host key
 *    (ssh-keyscan, and the login itself with the recorded known_hosts), the login with the same
 *    authorized key, B's rescue entry in the boot loader. Then `host rescue` (the VM boots B)
 *    and `host reinstall` (C again from disk2p2), each checked the same way.
 * Faults (`faults`): `bad-base` first runs a rollout whose B cannot boot (its kernel is not a
 * kernel): the VM must fall back to A by itself and the rollout fail cleanly at boot-base;
 * `cut-install-base` / `cut-install-target` power the VM off (qemu monitor) in the middle of that
 * step and start it again: the host must converge.
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { join, resolve } from 'node:path';
import { scError } from '../../shared/errors.js';
import { createLogger, type Logger } from '../../shared/log.js';
import { ensureRedis, freePort } from '../../shared/redis.js';
import { formatRelayKeys, relayToken } from '../../shared/protocol/index.js';
import { generateKeys } from '../../shared/keys.js';
import { ControlClient } from '../control/client.js';
import { startControl } from '../control/main.js';
import { startOrigin } from '../origin/main.js';
import { startStage } from '../stage/main.js';
import { run } from './exec.js';
import { type GuestFacts, type GuestSsh, rescueEntry, ssh, waitForSsh } from './guest.js';
import { buildImages } from './images.js';
import { detectAccel, type Firmware, monitorCommand, qemuArgs, startVm, stopVm, type Vm, waitForSerial } from './qemu.js';
import { agentUnit, buildInstallTarball, projectRoot, RUNTIME_DIR } from './runtime.js';

/** A fault the proof injects. */
export type Fault = 'bad-base' | 'cut-install-base' | 'cut-install-target';
export const FAULTS: readonly Fault[] = ['bad-base', 'cut-install-base', 'cut-install-target'];

/** Options of runProof. */
export interface ProofOptions {
  firmware: Firmware;
  work: string;
  cache: string;
  keep: boolean;
  faults: Fault[];
  cpus?: number;
  log?: (line: string) => void;
  logLevel?: string;
}

/** What the proof found (`--json` prints it as one line). */
export interface ProofResult {
  firmware: Firmware;
  accel: string;
  converted: boolean;
  steps: { step: string; ms: number | null }[];
  before: { ip: string; hostKeyFingerprint: string; os: string };
  after: { ip: string; hostKeyFingerprint: string; os: string; root: string };
  target: { os: string };
  rescueEntry: string | null;
  rescue?: { ok: boolean; os: string; root: string; ms: number };
  reinstall?: { ok: boolean; os: string; root: string; ms: number };
  faults: Record<string, string>;
  seconds: Record<string, number>;
  ssh?: { host: string; port: number; user: string; identity: string };
  pid?: number;
  disks?: string[];
}

const HOST_ID = 'vm1';
const COLO = 'vmcolo';
const STAGE_GUEST = '10.0.2.100';
const ORIGIN_GUEST = '10.0.2.101';

/** Runs the project's CLI (compiled) as a child process; resolves stdout. */
function cli(args: string[]): Promise<string> {
  return run([process.execPath, join(projectRoot(), 'dist/services/cli/main.js'), ...args], { env: process.env, timeoutMs: 30 * 60_000 });
}

function since(t0: number): number {
  return Math.round((Date.now() - t0) / 1000);
}

/** Runs the proof (see the top of this file). Throws on a failed check, with what was seen. */
export async function runProof(o: ProofOptions): Promise<ProofResult> {
  const say = o.log ?? (() => {});
  const work = resolve(o.work);
  await fsp.mkdir(work, { recursive: true });
  const logger: Logger = createLogger({ level: o.logLevel ?? 'warn', name: 'vm-proof' });
  const seconds: Record<string, number> = {};
  const cleanup: (() => Promise<void>)[] = [];
  const faults: Record<string, string> = {};
  const t0 = Date.now();
  try {
    let t = Date.now();
    const images = await buildImages(resolve(o.cache), [o.firmware], say);
    seconds.images = since(t);

    // Services on 127.0.0.1.
    t = Date.now();
    for (const f of ['keys', 'origin', 'stage']) await fsp.rm(join(work, f), { recursive: true, force: true });
    const keys = await generateKeys(join(work, 'keys'));
    const tokenFile = join(work, 'origin.token');
    await fsp.writeFile(tokenFile, `${randomBytes(16).toString('hex')}\n`, { mode: 0o600 });
    const origin = await startOrigin({ listen: '127.0.0.1:0', data: join(work, 'origin'), tokenFile }, { logger });
    cleanup.push(() => origin.close());
    const redis = await ensureRedis(process.env.REDIS_URL);
    cleanup.push(() => redis.stop());
    const prefix = `vm-${randomBytes(4).toString('hex')}`;
    const relaySecret = randomBytes(32).toString('hex');
    const relayKeyFile = join(work, 'relay.keys');
    await fsp.writeFile(relayKeyFile, formatRelayKeys([{ kid: '1', secret: relaySecret }], COLO), { mode: 0o600 });
    const stage = await startStage(
      { listen: '127.0.0.1:0', upstreams: [origin.url], cache: join(work, 'stage'), cacheSize: '8GiB', colo: COLO, tokenFile, trustKeys: [keys.files.releasePub], redis: redis.url, prefix, relayKeyFile },
      { log: logger },
    );
    cleanup.push(() => stage.close());
    const controlTokenFile = join(work, 'control.token');
    const controlToken = randomBytes(16).toString('hex');
    await fsp.writeFile(controlTokenFile, `ops:${controlToken}\n`, { mode: 0o600 });
    const control = await startControl(
      {
        listen: '127.0.0.1:0', redis: redis.url, origin: origin.url, tokenFile: controlTokenFile, signingKey: keys.files.controlKey, prefix,
        stageTokenFile: tokenFile, trustKey: [keys.files.releasePub], stages: [`${COLO}=${stage.url}`], logLevel: 'warn',
      },
      { logger },
    );
    cleanup.push(() => control.close());
    const client = new ControlClient(control.url, { token: controlToken, actor: 'vm-proof' });
    say(`services: origin ${origin.url}, stage+relay ${stage.url}, control ${control.url}, redis ${redis.url} (prefix ${prefix})`);

    const publish = async (tar: string, name: string, version: string, role: string, netFormat: string) => {
      const out = await cli([
        'publish', tar, '--origin', origin.url, '--name', name, '--version', version, '--role', role, '--net-format', netFormat,
        '--token-file', tokenFile, '--signing-key', keys.files.releaseKey, '--recipients-file', keys.files.fleetRecipient, '--work-dir', work, '--json',
      ]);
      const r = JSON.parse(out) as { name: string; version: string; blob: { size: number } };
      say(`published ${role} ${r.name}@${r.version} (${(r.blob.size / 2 ** 20).toFixed(0)} MiB)`);
      return `${r.name}@${r.version}`;
    };
    const base = await publish(images.base.tar, 'rescue-os', `12-networkd-${images.base.digest.slice(0, 8)}`, 'base', 'networkd');
    const target = await publish(images.target.tar, 'debian-server', `12-netplan-${images.target.digest.slice(0, 8)}`, 'target', 'netplan');
    seconds.services = since(t);

    // The VM.
    const a = images.a[o.firmware]!;
    const disks = [join(work, 'disk1.qcow2'), join(work, 'disk2.qcow2')];
    await fsp.rm(disks[0], { force: true });
    await fsp.rm(disks[1], { force: true });
    await run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', a.disk, '-F', 'qcow2', disks[0]]);
    await run(['qemu-img', 'create', '-q', '-f', 'qcow2', disks[1], '12G']);
    const vars = a.vars ? join(work, 'vars.fd') : undefined;
    if (a.vars && vars) await fsp.copyFile(a.vars, vars);
    const sshPort = await freePort();
    const serialLog = join(work, 'serial.log');
    const monitor = join(work, 'monitor.sock');
    await fsp.rm(serialLog, { force: true });
    const spec = qemuArgs({
      firmware: o.firmware,
      disks: disks.map((file) => ({ file, format: 'qcow2' as const })),
      vars,
      serialLog,
      monitor,
      sshPort,
      cpus: o.cpus,
      noReboot: true,
      forwards: [
        { guest: STAGE_GUEST, port: 80, hostPort: Number(new URL(stage.url).port) },
        { guest: ORIGIN_GUEST, port: 80, hostPort: Number(new URL(origin.url).port) },
      ],
    });
    await fsp.writeFile(join(work, 'qemu.argv.json'), `${JSON.stringify(spec)}\n`);
    t = Date.now();
    const power = new PowerSwitch(spec);
    cleanup.push(() => power.stop());
    await power.start();
    const g: GuestSsh = { port: sshPort, identity: images.operatorKey, knownHosts: join(work, 'known_hosts') };
    await fsp.rm(g.knownHosts, { force: true });
    await waitForSerial(serialLog, /sc-image: booted/, { ms: 15 * 60_000 });
    const before = await waitForSsh(g, 5 * 60_000, { firstContact: true, alive: () => power.alive() });
    seconds.bootA = since(t);
    say(`A is up: ${before.os} from ${before.root}, ${before.ip}, host key ${before.hostKeyFingerprint}`);

    // Install the agent into A, as an operator would: one tarball (runtime, config, keys, unit), one SSH session.
    t = Date.now();
    const install = await buildInstallTarball(resolve(o.cache), join(work, 'install.tar.zst'), {
      '/etc/stagecoach/release.pub': [0o644, await fsp.readFile(keys.files.releasePub, 'utf8')],
      '/etc/stagecoach/control.pub': [0o644, await fsp.readFile(keys.files.controlPub, 'utf8')],
      '/etc/stagecoach/fleet.age': [0o600, await fsp.readFile(keys.files.fleetIdentity, 'utf8')],
      '/etc/stagecoach/relay.token': [0o600, `${relayToken({ kid: '1', secret: relaySecret }, COLO, HOST_ID)}\n`],
      '/etc/stagecoach/agent.yaml': [0o600, agentYaml(o.firmware, prefix)],
      '/etc/systemd/system/stagecoach-agent.service': [0o644, agentUnit()],
    }, say);
    await ssh(g, 'tar --zstd -xf - -C / --no-overwrite-dir --keep-directory-symlink && systemctl daemon-reload && systemctl enable --now stagecoach-agent.service', {
      input: await fsp.readFile(install.tarball),
      timeoutMs: 15 * 60_000,
    });
    const deadline = Date.now() + 10 * 60_000;
    while (!(await client.hosts({}).catch(() => [])).some((h) => h.hostId === HOST_ID)) {
      if (Date.now() > deadline) throw scError('SC_ERR_TIMEOUT', 'the agent in the VM did not register within 10 minutes');
      await new Promise((r) => setTimeout(r, 2000));
    }
    seconds.agentInstall = since(t);
    say(`agent registered (${seconds.agentInstall} s)`);

    const follow = async (id: string, cut?: { step: string; done: () => Promise<void> }) => {
      let cutDone = false;
      for (;;) {
        const r = await client.rollout(id);
        const h = r.hosts.find((x) => x.host === HOST_ID);
        if (cut && !cutDone && h?.steps[cut.step]?.state === 'running' && (h.steps[cut.step].percent ?? 0) >= 30) {
          cutDone = true;
          await cut.done();
        }
        if (['completed', 'failed', 'aborted'].includes(r.status.state)) return r;
        // While a power cut waits for its step, poll often: a fast unpack can cross 30 % and end
        // between two 3 s polls, and the cut would never happen.
        await new Promise((res) => setTimeout(res, cut && !cutDone ? 250 : 3000));
      }
    };

    const powerCut = (step: string) => async () => {
      say(`fault: power cut in the middle of ${step}`);
      await monitorCommand(monitor, 'quit');
      faults[`cut-${step}`] = 'power cut at >= 30 % of the step; the VM was started again';
    };

    if (o.faults.includes('bad-base')) {
      t = Date.now();
      const badDir = join(work, 'bad-base');
      await makeBadBase(images.base.tar, badDir);
      const bad = await publish(badDir, 'rescue-os-broken', `12-${randomBytes(3).toString('hex')}`, 'base', 'networkd');
      const r = await client.createRollout({ base: bad, target, hosts: [HOST_ID], plan: { canary: 1, waves: [1], maxInFlight: 1, failureBudget: 0 } });
      say(`fault: rollout ${r.spec.id} with a B whose kernel cannot boot`);
      const fin = await follow(r.spec.id);
      const h = fin.hosts.find((x) => x.host === HOST_ID)!;
      const back = await waitForSsh(g, 10 * 60_000, { alive: () => power.alive() });
      const ok = fin.status.state === 'failed' && h.error?.step === 'boot-base' && back.root === before.root && back.ip === before.ip && back.hostKeyFingerprint === before.hostKeyFingerprint;
      faults['bad-base'] = `${ok ? 'ok' : 'NOT OK'}: rollout ${fin.status.state} at ${h.error?.step ?? '-'} (${h.error?.code ?? '-'}); the VM runs ${back.os} from ${back.root} on ${back.ip} (${since(t)} s)`;
      say(`fault: ${faults['bad-base']}`);
      if (!ok) throw scError('SC_ERR_BOOT_FAILED', `bad-base: ${faults['bad-base']}`);
    }

    t = Date.now();
    const rollout = await client.createRollout({ base, target, hosts: [HOST_ID], plan: { canary: 1, waves: [1], maxInFlight: 1, failureBudget: 0 } });
    say(`rollout ${rollout.spec.id}: ${base} → ${target}`);
    const cut = o.faults.includes('cut-install-base') ? { step: 'install-base', done: powerCut('install-base') } : o.faults.includes('cut-install-target') ? { step: 'install-target', done: powerCut('install-target') } : undefined;
    const fin = await follow(rollout.spec.id, cut);
    seconds.rollout = since(t);
    const host = fin.hosts.find((x) => x.host === HOST_ID)!;
    // Every completed step, in the order it finished; its time when control saw it start.
    const steps = Object.entries(host.steps)
      .filter(([, s]) => s.state === 'completed')
      .sort((x, y) => (x[1].finishedAt ?? 0) - (y[1].finishedAt ?? 0))
      .map(([step, s]) => ({ step, ms: s.startedAt && s.finishedAt ? s.finishedAt - s.startedAt : null }));
    for (const s of steps) say(`  ${s.step.padEnd(18)} ${s.ms === null ? '      ? s (start not reported)' : `${(s.ms / 1000).toFixed(1).padStart(7)} s`}`);
    if (fin.status.state !== 'completed') {
      throw scError('SC_ERR_STEP_FAILED', `the rollout ended ${fin.status.state}: ${host.error ? `${host.error.step}: ${host.error.code} ${host.error.message}` : host.status}`, { log: host.log.slice(-20) });
    }
    const after = await waitForSsh(g, 10 * 60_000, { alive: () => power.alive() });
    const rescue = await rescueEntry(g, o.firmware);
    say(`C is up: ${after.os} from ${after.root}, ${after.ip}, host key ${after.hostKeyFingerprint}, rescue entry ${rescue}`);
    const converted = after.root === '/dev/vda1' && after.ip === before.ip && after.hostKeyFingerprint === before.hostKeyFingerprint && rescue === 'disk2p1';

    const result: ProofResult = {
      firmware: o.firmware,
      accel: detectAccel(),
      converted,
      steps,
      before: { ip: before.ip, hostKeyFingerprint: before.hostKeyFingerprint, os: before.os },
      after: { ip: after.ip, hostKeyFingerprint: after.hostKeyFingerprint, os: after.os, root: after.root },
      target: { os: after.os },
      rescueEntry: rescue,
      faults,
      seconds,
    };
    if (!converted) throw scError('SC_ERR_BOOT_FAILED', `the VM is not converted as expected: ${JSON.stringify(result.after)}, rescue ${rescue}`, { result });

    // Host operations: rescue (boot B), then reinstall (C again from disk2p2).
    const hostOp = async (kind: 'rescue' | 'reinstall', expect: (f: GuestFacts) => boolean) => {
      const t1 = Date.now();
      const op = kind === 'rescue' ? await client.rescue(HOST_ID) : await client.reinstall(HOST_ID);
      let st = op;
      while (st.status === 'queued' || st.status === 'running') {
        await new Promise((res) => setTimeout(res, 3000));
        st = await client.op(op.id);
      }
      const f = await waitForSsh(g, 10 * 60_000, { alive: () => power.alive() });
      const ok = st.status === 'done' && expect(f) && f.ip === before.ip && f.hostKeyFingerprint === before.hostKeyFingerprint;
      say(`${kind}: ${st.status}; the VM runs ${f.os} from ${f.root} (${since(t1)} s)`);
      if (!ok) throw scError('SC_ERR_STEP_FAILED', `${kind} ended ${st.status}${st.error ? ` at ${st.error.step}: ${st.error.code} ${st.error.message}` : ''}; the VM runs ${f.os} from ${f.root}`);
      return { ok, os: f.os, root: f.root, ms: Date.now() - t1 };
    };
    result.rescue = await hostOp('rescue', (f) => f.root === '/dev/vdb1');
    result.reinstall = await hostOp('reinstall', (f) => f.root === '/dev/vda1');
    seconds.total = since(t0);
    if (o.keep) {
      result.ssh = { host: '127.0.0.1', port: sshPort, user: 'root', identity: images.operatorKey };
      result.pid = power.vm?.pid;
      result.disks = disks;
    }
    return result;
  } finally {
    if (!o.keep) for (const c of cleanup.reverse()) await c().catch(() => {});
  }
}

/**
 * The VM's power: qemu runs with -no-reboot, so a reboot of the guest (or a power cut through
 * the monitor) ends qemu, and the switch starts it again on the same disks and NVRAM: every
 * reboot is a cold boot. (OVMF under TCG with two vCPUs was seen to hang in its SEC phase after
 * a warm reset; a cold boot never did.)
 */
class PowerSwitch {
  vm: Vm | null = null;
  boots = 0;
  #stopping = false;
  #failed: unknown = null;
  readonly #argv: string[];

  constructor(argv: string[]) {
    this.#argv = argv;
  }

  async start(): Promise<void> {
    const v = await startVm(this.#argv);
    this.vm = v;
    this.boots++;
    void v.exited.then(async () => {
      if (this.#stopping || this.vm !== v) return;
      await new Promise((r) => setTimeout(r, 1000));
      if (this.#stopping) return;
      await this.start().catch((err: unknown) => {
        this.#failed = err;
      });
    });
  }

  /** False once stopped, or when qemu could not be started again. */
  alive(): boolean {
    return !this.#stopping && !this.#failed;
  }

  async stop(): Promise<void> {
    this.#stopping = true;
    if (this.vm) await stopVm(this.vm);
  }
}

/** The agent's config in the guest (relay mode, through the forwarded stage). */
function agentYaml(fw: Firmware, prefix: string): string {
  return [
    `hostId: ${HOST_ID}`,
    `colo: ${COLO}`,
    `relay: [http://${STAGE_GUEST}]`,
    'relayTokenFile: /etc/stagecoach/relay.token',
    'machine: linux',
    `stages: [http://${STAGE_GUEST}]`,
    `origin: http://${ORIGIN_GUEST}`,
    'trustKey: [/etc/stagecoach/release.pub]',
    'controlKey: /etc/stagecoach/control.pub',
    'identity: /etc/stagecoach/fleet.age',
    `prefix: ${prefix}`,
    'disk1: /dev/vda',
    'disk2: /dev/vdb',
    `bootMode: ${fw === 'uefi' ? 'uefi' : 'bios-grub'}`,
    `runtimeDir: ${RUNTIME_DIR}`,
    'logLevel: info',
    '',
  ].join('\n');
}

/** A copy of B (a directory) whose kernel is not a kernel: GRUB refuses it, so a boot into it falls back. */
async function makeBadBase(goodTar: string, dir: string): Promise<void> {
  await fsp.rm(dir, { recursive: true, force: true });
  await fsp.mkdir(dir);
  await run(['tar', '--extract', '--numeric-owner', '--xattrs', '--xattrs-include=*', '--file', goodTar, '--directory', dir]);
  const boot = join(dir, 'boot');
  const kernel = (await fsp.readdir(boot)).find((n) => n.startsWith('vmlinuz-'));
  if (!kernel) throw scError('SC_ERR_INTERNAL', 'B has no kernel in /boot');
  await fsp.writeFile(join(boot, kernel), randomBytes(4096));
}
