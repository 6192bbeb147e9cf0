/** shared/fs-atomic.ts: atomic, durable file replacement; never a torn file, never a lingering temp file. */
import assert from 'node:assert/strict';
import { existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { after, test } from 'node:test';
import { Worker } from 'node:worker_threads';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { commitFile, fsyncPath, openWriteStream, tempOwner, tempPathIn, writeFileAtomic } from '../../shared/fs-atomic.js';

const root = mkdtempSync(join(tmpdir(), 'sc-fs-atomic-'));
after(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
const fresh = (): string => {
  const d = join(root, `t${++n}`);
  mkdirSync(d);
  return d;
};

test('replaces the content with exactly the given mode, and leaves no temp file', async () => {
  const d = fresh();
  const f = join(d, 'state.json');
  writeFileSync(f, 'old', { mode: 0o644 });
  const umask = process.umask(0o077);
  try {
    await writeFileAtomic(f, 'new', { mode: 0o640 });
  } finally {
    process.umask(umask);
  }
  assert.equal(readFileSync(f, 'utf8'), 'new');
  assert.equal(statSync(f).mode & 0o777, 0o640, 'the mode is exact whatever the umask');
  assert.deepEqual(readdirSync(d), ['state.json']);
  await writeFileAtomic(join(d, 'a/b/c.json'), Buffer.from('{}'), { mkdirs: true });
  assert.equal(readFileSync(join(d, 'a/b/c.json'), 'utf8'), '{}');
  assert.equal(statSync(join(d, 'a/b/c.json')).mode & 0o777, 0o644, 'default mode');
});

test('a failed write leaves the old content and no temp file', async () => {
  const d = fresh();
  // The rename fails: a directory stands where the file should go.
  mkdirSync(join(d, 'taken'));
  writeFileSync(join(d, 'taken/keep'), 'x');
  await assert.rejects(writeFileAtomic(join(d, 'taken'), 'new'), (err: NodeJS.ErrnoException) => err.code === 'EISDIR');
  assert.deepEqual(readdirSync(d), ['taken'], 'the temp file was removed');
  assert.equal(readFileSync(join(d, 'taken/keep'), 'utf8'), 'x');
  // The write itself fails half-way (a file size limit: EFBIG after 64 KiB, as a full disk would
  // with ENOSPC). A plain writeFile would leave the first 64 KiB of the new content.
  writeFileSync(join(d, 'f'), 'old');
  const child = spawnSync(
    'bash',
    [
      '-c',
      `ulimit -f 64; exec "${process.execPath}" --import tsx --input-type=module -e "$SCRIPT"`,
    ],
    {
      cwd: process.cwd(),
      encoding: 'utf8',
      env: {
        ...process.env,
        SCRIPT: `const { writeFileAtomic } = await import(${JSON.stringify(pathToFileURL(join(import.meta.dirname, '../../shared/fs-atomic.ts')).href)});
          await writeFileAtomic(${JSON.stringify(join(d, 'f'))}, 'x'.repeat(1 << 20)).then(() => console.log('wrote'), (e) => console.log(e.code));`,
      },
    },
  );
  assert.equal(child.stdout.trim(), 'EFBIG', child.stderr);
  assert.equal(readFileSync(join(d, 'f'), 'utf8'), 'old');
  assert.deepEqual(readdirSync(d).sort(), ['f', 'taken'], 'the temp file was removed');
  // No parent directory (and no mkdirs): ENOENT, nothing created.
  await assert.rejects(writeFileAtomic(join(d, 'missing/f'), 'x'), (err: NodeJS.ErrnoException) => err.code === 'ENOENT');
  assert.deepEqual(readdirSync(d).sort(), ['f', 'taken']);
});

test('a concurrent reader sees the old or the new content, never a partial or empty file', async () => {
  const d = fresh();
  const f = join(d, 'big.json');
  const size = 4 << 20;
  const a = 'a'.repeat(size);
  const b = 'b'.repeat(size);
  await writeFileAtomic(f, a);
  // A reader on another thread, reading as fast as it can while the file is replaced.
  const reader = new Worker(
    `const { readFileSync } = require('node:fs');
     const { parentPort, workerData } = require('node:worker_threads');
     let stop = false, reads = 0, bad = 0, example = '';
     parentPort.on('message', () => { stop = true; });
     (function loop() {
       for (let i = 0; i < 20; i++) {
         const t = readFileSync(workerData.f, 'latin1');
         reads++;
         const ok = t.length === workerData.size && (t === 'a'.repeat(workerData.size) || t === 'b'.repeat(workerData.size));
         if (!ok) { bad++; example = t.length + ':' + t.slice(0, 1) + t.slice(-1); }
       }
       if (stop) parentPort.postMessage({ reads, bad, example }); else setImmediate(loop);
     })();`,
    { eval: true, workerData: { f, size } },
  );
  const done = new Promise<{ reads: number; bad: number; example: string }>((r) => reader.once('message', r));
  for (let i = 0; i < 30; i++) await writeFileAtomic(f, i % 2 ? a : b);
  reader.postMessage('stop');
  const res = await done;
  await reader.terminate();
  assert.ok(res.reads > 0);
  assert.equal(res.bad, 0, `torn reads: ${res.bad} of ${res.reads} (e.g. ${res.example})`);
  assert.deepEqual(readdirSync(d), ['big.json']);
});

test('a symlink at the target is replaced, never followed', async () => {
  const d = fresh();
  writeFileSync(join(d, 'outside'), 'untouched');
  symlinkSync(join(d, 'outside'), join(d, 'link'));
  await writeFileAtomic(join(d, 'link'), 'mine');
  assert.ok(lstatSync(join(d, 'link')).isFile());
  assert.equal(readFileSync(join(d, 'link'), 'utf8'), 'mine');
  assert.equal(readFileSync(join(d, 'outside'), 'utf8'), 'untouched');
});

test('tempDir: the temp file lives there, and is gone afterwards', async () => {
  const d = fresh();
  mkdirSync(join(d, 'tmp'));
  // Watch the temp directory while a large write runs.
  const seen = new Set<string>();
  let running = true;
  const p = writeFileAtomic(join(d, 'x.json'), 'x'.repeat(64 << 20), { tempDir: join(d, 'tmp') }).finally(() => {
    running = false;
  });
  while (running) {
    for (const e of readdirSync(join(d, 'tmp'))) seen.add(e);
    assert.ok(!readdirSync(d).some((e) => e.startsWith('.tmp-')), 'no temp file beside the target');
    await new Promise((r) => setImmediate(r));
  }
  await p;
  assert.equal(seen.size, 1, 'the temp file was seen in tempDir');
  assert.ok([...seen].every((e) => tempOwner(e) === process.pid), `temp names: ${[...seen].join(',')}`);
  assert.deepEqual(readdirSync(join(d, 'tmp')), []);
  assert.deepEqual(readdirSync(d).sort(), ['tmp', 'x.json']);
});

test('temp names are hidden and name their owner; commitFile and fsyncPath', async () => {
  const d = fresh();
  const t = tempPathIn(d);
  const base = t.slice(d.length + 1);
  assert.match(base, /^\.tmp-\d+-[0-9a-f]{12}$/);
  assert.equal(tempOwner(base), process.pid);
  assert.equal(tempOwner('.tmp-lock-77-abc123'), 77, 'names of earlier versions');
  assert.equal(tempOwner('machine.json'), null);
  assert.equal(tempOwner('.tmp-x-1'), null);
  writeFileSync(t, 'partial, then complete');
  await commitFile(t, join(d, 'blob'));
  assert.deepEqual(readdirSync(d), ['blob']);
  await fsyncPath(d);
  await fsyncPath(join(d, 'blob'));
  await assert.rejects(fsyncPath(join(d, 'nope')), (err: NodeJS.ErrnoException) => err.code === 'ENOENT');
});

test('openWriteStream: the file exists when it resolves, so a cleanup after a failed pipeline removes it', async () => {
  const d = fresh();
  const f = join(d, 'blob.part');
  const ws = await openWriteStream(f, { flags: 'wx', mode: 0o600 });
  assert.ok(existsSync(f), 'created before the first write (fs.createWriteStream opens later, in the background)');
  const broken = Readable.from(
    (async function* () {
      yield Buffer.from('half');
      throw new Error('source broke');
    })(),
  );
  await assert.rejects(pipeline(broken, ws), /source broke/);
  rmSync(f, { force: true });
  await new Promise((r) => setTimeout(r, 50));
  assert.deepEqual(readdirSync(d), [], 'nothing appears after the cleanup');
  const first = await openWriteStream(join(d, 'x'), { flags: 'wx' });
  await assert.rejects(openWriteStream(join(d, 'x'), { flags: 'wx' }), (err: NodeJS.ErrnoException) => err.code === 'EEXIST');
  first.destroy();
  const out = await openWriteStream(join(d, 'y'));
  await pipeline(Readable.from([Buffer.from('all of it')]), out);
  assert.equal(readFileSync(join(d, 'y'), 'utf8'), 'all of it');
  assert.equal(statSync(join(d, 'x')).mode & 0o777, 0o666 & ~process.umask());
});
