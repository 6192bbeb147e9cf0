/**
 * Installing a bundle: the agent's own files are carried into the new OS (linux). The two-thread
 * unpack is tested in agent-unpack-worker.test.ts.
 */
import assert from 'node:assert/strict';
import { chmod, lstat, mkdir, mkdtemp, readFile, readlink, rm, symlink, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { carryAgentFiles } from '../../services/agent/steps/common.js';
import { LinuxMachine } from '../../services/agent/machine/linux.js';
import { SimMachine } from '../../services/agent/machine/sim.js';

describe('agent: its own files go into the OS it installs', () => {
  it('copies config and keys to the same paths (linux), and nothing for a sim machine', async () => {
    const root = await mkdtemp(join(tmpdir(), 'sc-agentfiles-'));
    try {
      const etc = join(root, 'running-os-etc');
      await mkdir(etc, { recursive: true });
      const key = join(etc, 'fleet.age');
      const cfg = join(etc, 'agent.yaml');
      await writeFile(key, 'AGE-SECRET-KEY-1TEST\n', { mode: 0o600 });
      await chmod(key, 0o600);
      await writeFile(cfg, 'hostId: h1\n', { mode: 0o644 });
      await chmod(cfg, 0o644);
      const newRoot = join(root, 'new-os');
      await mkdir(newRoot);
      const linux = new LinuxMachine({ hostId: 'h1', disks: { disk1: '/dev/sda', disk2: '/dev/sdb' }, bootMode: 'bios-grub', dryRun: true, print: () => {} });
      const done = await carryAgentFiles({ driver: linux, agentFiles: [cfg, key, join(etc, 'missing')] }, newRoot);
      assert.deepEqual(done, [cfg, key]);
      assert.equal(await readFile(join(newRoot, key), 'utf8'), 'AGE-SECRET-KEY-1TEST\n');
      assert.equal((await lstat(join(newRoot, key))).mode & 0o777, 0o600);
      assert.equal((await lstat(join(newRoot, cfg))).mode & 0o777, 0o644);
      const sim = new SimMachine(join(root, 'no-machine'));
      assert.deepEqual(await carryAgentFiles({ driver: sim, agentFiles: [cfg] }, join(root, 'other')), []);
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });

  it('copies its runtime directory as a whole tree, replacing an old one, inside the new root even through its links', async () => {
    const root = await mkdtemp(join(tmpdir(), 'sc-agentfiles-'));
    try {
      const rt = join(root, 'opt', 'stagecoach');
      await mkdir(join(rt, 'bin'), { recursive: true });
      await writeFile(join(rt, 'bin/node'), '#!/bin/sh\n', { mode: 0o755 });
      await chmod(join(rt, 'bin/node'), 0o755);
      await symlink('bin/node', join(rt, 'node-link'));
      const newRoot = join(root, 'new-os');
      // The new OS's tree has a link where the runtime's first path component is: `tmp -> /`.
      // The copy must land inside newRoot (chroot-style), never in the host's tree.
      const first = rt.split('/')[1];
      await mkdir(newRoot);
      await symlink('/', join(newRoot, first));
      const stale = join(newRoot, rt.slice(first.length + 2), 'stale-file');
      await mkdir(join(stale, '..'), { recursive: true });
      await writeFile(stale, 'old runtime');
      const linux = new LinuxMachine({ hostId: 'h1', disks: { disk1: '/dev/sda', disk2: '/dev/sdb' }, bootMode: 'bios-grub', dryRun: true, print: () => {} });
      assert.deepEqual(await carryAgentFiles({ driver: linux, agentFiles: [rt] }, newRoot), [rt]);
      const copied = join(newRoot, rt.slice(first.length + 2));
      assert.equal((await lstat(join(copied, 'bin/node'))).mode & 0o777, 0o755);
      assert.equal(await readlink(join(copied, 'node-link')), 'bin/node', 'symlinks are copied verbatim');
      assert.equal(existsSync(join(copied, 'stale-file')), false, 'the old runtime is replaced, not merged');
      assert.equal(existsSync(join(rt, 'stale-file')), false, 'nothing was written through the link into the host tree');
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });
});
