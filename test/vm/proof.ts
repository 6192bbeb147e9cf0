// The real-machine proof as a test: `stagecoach vm proof` converts a qemu VM from A to C through
// the production services and the linux driver, and every check it makes from outside (SSH) must
// pass. Run by `npm run test:vm` (not by `npm test`): it needs qemu, OVMF, mmdebstrap and the apt
// mirror, and takes tens of minutes under TCG. The image cache is STAGECOACH_VM_CACHE (default
// /var/tmp/stagecoach-vm), outside the checkout; run directories go to STAGECOACH_VM_WORK.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

/** Runs the proof for one firmware with faults; resolves its JSON result. */
export async function proof(firmware: 'bios' | 'uefi', faults: string[]): Promise<Record<string, unknown>> {
  const cache = process.env.STAGECOACH_VM_CACHE ?? '/var/tmp/stagecoach-vm';
  const work = join(process.env.STAGECOACH_VM_WORK ?? '/var/tmp/stagecoach-vm-runs', firmware);
  mkdirSync(work, { recursive: true });
  const cpus = process.env.STAGECOACH_VM_CPUS ?? '1';
  const args = ['dist/services/cli/main.js', 'vm', 'proof', '--firmware', firmware, '--work', work, '--cache', cache, '--cpus', cpus, '--json'];
  if (faults.length) args.push('--fault', faults.join(','));
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (c: Buffer) => {
    out += c;
  });
  child.stderr.on('data', (c: Buffer) => {
    process.stderr.write(`[${firmware}] ${c}`);
  });
  const code = await new Promise<number | null>((r) => child.on('close', r));
  const line = out.trim().split('\n').pop() ?? '';
  assert.equal(code, 0, `vm proof --firmware ${firmware} failed: ${line}`);
  const r = JSON.parse(line) as Record<string, unknown>;
  const seen = (r.faults ?? {}) as Record<string, string>;
  for (const f of faults) assert.ok(seen[f], `fault ${f} was injected`);
  return r;
}

/** The checks every proof result must pass. */
export function checkConverted(r: Record<string, unknown>, firmware: string): void {
  const before = r.before as { ip: string; hostKeyFingerprint: string; os: string };
  const after = r.after as { ip: string; hostKeyFingerprint: string; os: string; root: string };
  assert.equal(r.firmware, firmware);
  assert.equal(r.converted, true);
  assert.equal(after.root, '/dev/vda1', 'C runs from disk 1');
  assert.equal(after.ip, before.ip, 'the same IP');
  assert.match(after.ip, /^10\.0\.2\.15\/24$/);
  assert.equal(after.hostKeyFingerprint, before.hostKeyFingerprint, 'the same host key');
  assert.match(after.hostKeyFingerprint, /^SHA256:/);
  assert.equal(r.rescueEntry, 'disk2p1', "B's rescue entry is in the boot loader");
  const steps = (r.steps as { step: string }[]).map((s) => s.step);
  for (const s of ['fetch', 'partition', 'install-base', 'capture-config', 'apply-config-base', 'boot-base', 'commit-base', 'wipe-target-disk', 'install-target', 'boot-target', 'verify']) {
    assert.ok(steps.includes(s), `step ${s} ran`);
  }
  const rescue = r.rescue as { ok: boolean; root: string };
  const reinstall = r.reinstall as { ok: boolean; root: string };
  assert.equal(rescue.root, '/dev/vdb1', 'rescue boots B from disk 2');
  assert.equal(reinstall.root, '/dev/vda1', 'reinstall brings C back on disk 1');
}
