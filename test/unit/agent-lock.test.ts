/** services/agent/lock.ts: the pid lock of the agent's machine lock and of the sim machine's write lock. */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { after, test } from 'node:test';
import { acquireMachineLock, acquirePidLock, withPidLock } from '../../services/agent/lock.js';

const root = mkdtempSync(join(tmpdir(), 'sc-lock-'));
after(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
const lockPath = (): string => join(root, `l${++n}.lock`);
const LOCK_MODULE = pathToFileURL(join(import.meta.dirname, '../../services/agent/lock.ts')).href;

const bootId = (() => {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return '';
  }
})();
const startOf = (pid: number): string => {
  const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return s.slice(s.lastIndexOf(')') + 2).split(' ')[19];
};
const linux = existsSync('/proc/self/stat') && bootId !== '';

/** Runs `script` (ESM, with `lock` = the lock module) in a child node process. */
function child(script: string): ChildProcess {
  return spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', `const lock = await import(${JSON.stringify(LOCK_MODULE)});\n${script}`], {
    cwd: process.cwd(),
    stdio: ['ignore', 'pipe', 'inherit'],
  });
}

function line(p: ChildProcess, want: string): Promise<void> {
  return new Promise((resolve, reject) => {
    let out = '';
    p.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes(want)) resolve();
    });
    p.once('exit', (code) => reject(new Error(`child exited (${code}) before printing ${want}: ${out}`)));
  });
}

const exited = (p: ChildProcess): Promise<void> => (p.exitCode !== null || p.signalCode !== null ? Promise.resolve() : new Promise((r) => p.once('exit', () => r())));

test('a live holder in another process is refused; once it is killed (-9) its lock is taken over at once', async () => {
  const path = lockPath();
  const holder = child(`await lock.acquireMachineLock(${JSON.stringify(path)}); console.log('held'); setInterval(() => {}, 1000);`);
  try {
    await line(holder, 'held');
    assert.equal(readFileSync(path, 'utf8').split('\n')[0], String(holder.pid), 'the first line is the pid');
    await assert.rejects(acquireMachineLock(path), (err: { code?: string; message: string }) => err.code === 'SC_ERR_CONFLICT' && err.message.includes(String(holder.pid)));
    const t0 = Date.now();
    await assert.rejects(acquirePidLock(path, { waitMs: 150 }), (err: { code?: string }) => err.code === 'SC_ERR_TIMEOUT');
    assert.ok(Date.now() - t0 >= 150, 'it waited');
    holder.kill('SIGKILL');
    await exited(holder);
    const t1 = Date.now();
    const l = await acquireMachineLock(path);
    assert.ok(Date.now() - t1 < 1000, 'no staleness period: the dead pid is seen at once');
    assert.equal(readFileSync(path, 'utf8').split('\n')[0], String(process.pid));
    await l.release();
    assert.equal(existsSync(path), false);
  } finally {
    holder.kill('SIGKILL');
    await exited(holder);
  }
});

test('a lock left by a dead pid is stale; a waiter gets a lock as soon as its holder releases it', async () => {
  const path = lockPath();
  const dead = spawn(process.execPath, ['-e', '0']);
  await exited(dead);
  writeFileSync(path, `${dead.pid}\n`); // an old-style pid file
  const l = await acquirePidLock(path);
  await l.release();

  const holder = child(`const l = await lock.acquirePidLock(${JSON.stringify(path)}); console.log('held'); setTimeout(() => l.release().then(() => process.exit(0)), 300);`);
  try {
    await line(holder, 'held');
    const l2 = await acquirePidLock(path, { waitMs: 10_000 });
    assert.equal(readFileSync(path, 'utf8').split('\n')[0], String(process.pid));
    await l2.release();
  } finally {
    holder.kill('SIGKILL');
    await exited(holder);
  }
  assert.deepEqual(readdirSync(root).filter((e) => e.startsWith('.tmp-')), [], 'no temp file left');
});

test('a pid of another boot, or a reused pid (other start time), is stale; the live process itself is not', { skip: !linux && 'needs Linux /proc' }, async () => {
  const path = lockPath();
  const live = process.ppid; // alive, not us
  writeFileSync(path, `${live}\n${bootId}\n${startOf(live)}\n`);
  await assert.rejects(acquirePidLock(path), (err: { code?: string }) => err.code === 'SC_ERR_CONFLICT');
  writeFileSync(path, `${live}\n${bootId}\n`);
  await assert.rejects(acquirePidLock(path), (err: { code?: string }) => err.code === 'SC_ERR_CONFLICT', 'no start time recorded: the pid alone decides');
  writeFileSync(path, `${live}\nnot-this-boot\n${startOf(live)}\n`);
  await (await acquirePidLock(path)).release();
  writeFileSync(path, `${live}\n${bootId}\n${Number(startOf(live)) + 1}\n`);
  await (await acquirePidLock(path)).release();
});

test('a lock without a pid (content lost in a power cut) is taken only once it is older than 5 s', async () => {
  const path = lockPath();
  writeFileSync(path, '');
  await assert.rejects(acquirePidLock(path), (err: { code?: string }) => err.code === 'SC_ERR_CONFLICT');
  const old = new Date(Date.now() - 10_000);
  utimesSync(path, old, old);
  await (await acquirePidLock(path)).release();
});

test('in one process a path is held once: refused without waitMs, queued with it; release only removes our own lock', async () => {
  const path = lockPath();
  const a = await acquirePidLock(path);
  await assert.rejects(acquireMachineLock(path), (err: { code?: string }) => err.code === 'SC_ERR_CONFLICT');
  const order: string[] = [];
  const b = acquirePidLock(path, { waitMs: 1000 }).then((l) => {
    order.push('b');
    return l;
  });
  await new Promise((r) => setTimeout(r, 50));
  order.push('a released');
  await a.release();
  await a.release(); // idempotent
  const lb = await b;
  assert.deepEqual(order, ['a released', 'b']);
  writeFileSync(path, '1\n'); // someone else's now
  await lb.release();
  assert.equal(readFileSync(path, 'utf8'), '1\n', 'not ours: left alone');
  rmSync(path);
  await assert.rejects(acquirePidLock(join(root, 'no-such-dir', 'x.lock')), (err: { code?: string }) => err.code === 'SC_ERR_FILE_ACCESS');
});

test('mutual exclusion across processes, starting from a stale lock: no update is lost', async () => {
  const path = lockPath();
  const counter = join(root, 'counter');
  writeFileSync(counter, '0');
  const dead = spawn(process.execPath, ['-e', '0']);
  await exited(dead);
  writeFileSync(path, `${dead.pid}\n`);
  const rounds = 150;
  const script = `const { readFileSync, writeFileSync } = await import('node:fs');
    for (let i = 0; i < ${rounds}; i++) {
      await lock.withPidLock(${JSON.stringify(path)}, { waitMs: 20000, pollMs: 1 }, async () => {
        const v = Number(readFileSync(${JSON.stringify(counter)}, 'utf8'));
        await new Promise((r) => setImmediate(r));
        writeFileSync(${JSON.stringify(counter)}, String(v + 1));
      });
    }
    console.log('done');`;
  const kids = [child(script), child(script), child(script)];
  try {
    await Promise.all(kids.map((k) => line(k, 'done')));
  } finally {
    for (const k of kids) k.kill('SIGKILL');
    await Promise.all(kids.map(exited));
  }
  assert.equal(readFileSync(counter, 'utf8'), String(3 * rounds));
  assert.equal(existsSync(path), false);
  // The same in this process too, through withPidLock.
  assert.equal(await withPidLock(path, { waitMs: 100 }, async () => readFileSync(path, 'utf8').split('\n')[0]), String(process.pid));
});
