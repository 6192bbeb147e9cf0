// Blob bodies from a stage's cache files are sent through bounded, reused read buffers
// (shared/http/body-send.ts ReadBuffer): the buffer per reader shrinks as readers are added, so
// all of them hold a bounded total, carved out of one arena; every reader gives its share back,
// whether it finished, was answered a Range, or left mid-body. Real origin and stage on
// 127.0.0.1 port 0.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { type Digest, sha256Of } from '../../shared/digest.js';
import { READ_BUDGET, ReadBuffer, readArenaFreeBytes, readBufferReaders, readChunkBytes } from '../../shared/http/body-send.js';
import { silentLogger } from '../../shared/log.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';
import { httpGet as get, waitFor } from '../helpers/test-origin.js';

const ARENA = READ_BUDGET;
/** Readers the arena serves in pieces of 64 KiB (the floor); past them, readers get buffers of their own. */
const PIECES = ARENA / (64 * 1024);

describe('read API: bounded read buffers', () => {
  let origin: TestOrigin;
  let stage: RunningStage;
  let dir: string;
  let data: Buffer;
  let digest: Digest;
  let url: string;

  before(async () => {
    origin = await startTestOrigin();
    data = randomBytes(3 * 1024 * 1024 + 12_345);
    digest = sha256Of(data);
    await origin.client.putBlob(Readable.from([data]), digest, data.length);
    dir = await mkdtemp(join(tmpdir(), 'read-api-buffers-'));
    stage = await startStage({ listen: '127.0.0.1:0', upstreams: [origin.url], cache: join(dir, 'cache'), cacheSize: '64MiB', colo: 'buffers' }, { log: silentLogger });
    url = `${stage.url}/v1/blobs/${digest}`;
    const first = await get(url); // the fill; later requests are cache hits
    assert.equal(first.status, 200);
    await waitFor(() => stage.fills().every((f) => f.state === 'committed'));
  });

  after(async () => {
    await stage?.close();
    await origin?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('gives each reader less as readers are added, keeping the total bounded', () => {
    assert.equal(readChunkBytes(1), 1 << 20);
    let prev = Number.POSITIVE_INFINITY;
    for (const n of [1, 2, 16, 32, 64, 100, 256, 1000, 10_000]) {
      const b = readChunkBytes(n);
      assert.ok(b <= prev, `${n} readers: ${b} bytes each, more than with fewer readers`);
      assert.ok(b >= 64 * 1024, `${n} readers: ${b} bytes each is below the floor`);
      if (n <= PIECES) assert.ok(b * n <= ARENA, `${n} readers hold ${b * n} bytes together`);
      prev = b;
    }
  });

  it('carves every buffer out of one arena and gets it back whole, also past its capacity', () => {
    const free0 = readArenaFreeBytes();
    const readers: ReadBuffer[] = [];
    const bufs = new Set<ArrayBufferLike>();
    let held = 0;
    // More readers than the arena has 64 KiB pieces: past them, readers get a buffer of their own.
    const N = PIECES + 44;
    for (let i = 0; i < N; i++) {
      const r = new ReadBuffer();
      readers.push(r);
      const b = r.buffer();
      if (i < ARENA / (1 << 20)) bufs.add(b.buffer); // the first readers' 1 MiB pieces fill the arena
      held += b.length;
      assert.ok(b.length >= 64 * 1024);
    }
    assert.equal(bufs.size, 1, 'the first readers share one block of memory');
    assert.equal(readArenaFreeBytes(), free0 - ARENA, 'the herd used the whole arena');
    // Every reader asks again: all are resized to the share of N readers, none holds two pieces.
    for (const r of readers) assert.equal(r.buffer().length, readChunkBytes(N));
    assert.ok(held > ARENA);
    const half = N >> 1;
    for (const r of readers.slice(0, half)) r.close();
    assert.equal(readBufferReaders(), N - half);
    for (const r of readers.slice(half)) r.close();
    for (const r of readers) r.close(); // idempotent
    assert.equal(readBufferReaders(), 0);
    assert.equal(readArenaFreeBytes(), ARENA, 'every piece came back and joined its buddies');
    // After it, one reader gets a whole READ_MAX piece again (the halves joined up).
    const one = new ReadBuffer();
    assert.equal(one.buffer().length, 1 << 20);
    one.close();
    assert.equal(readArenaFreeBytes(), ARENA);
  });

  it('serves many concurrent whole and Range reads from the cache with the right bytes, and every reader gives its buffer back', async () => {
    const ranges: [number, number][] = [
      [0, data.length - 1],
      [1, 1],
      [1_000_000, 2_500_000],
      [data.length - 70_000, data.length - 1],
    ];
    const answers = await Promise.all(
      Array.from({ length: 40 }, (_, i) => {
        const [s, e] = ranges[i % ranges.length];
        const whole = s === 0 && e === data.length - 1;
        return get(url, whole ? {} : { Range: `bytes=${s}-${e}` }).then((a) => ({ a, s, e, whole }));
      }),
    );
    for (const { a, s, e, whole } of answers) {
      assert.equal(a.status, whole ? 200 : 206);
      assert.ok(a.body.equals(data.subarray(s, e + 1)), `bytes ${s}-${e}`);
    }
    await waitFor(() => readBufferReaders() === 0 && readArenaFreeBytes() === ARENA);
  });

  it('gives the buffer back when a client leaves mid-body', async () => {
    await new Promise<void>((resolve, reject) => {
      const req = request(url, { agent: false }, (res) => {
        res.once('data', () => {
          req.destroy();
          resolve();
        });
      });
      req.on('error', (err) => (req.destroyed ? undefined : reject(err)));
      req.end();
    });
    await waitFor(() => readBufferReaders() === 0 && readArenaFreeBytes() === ARENA);
    const again = await get(url);
    assert.ok(again.body.equals(data));
  });
});
