import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, test } from 'node:test';
import type { Digest } from '../../shared/digest.js';
import { isScError } from '../../shared/errors.js';
import { type FetchBlobOptions, fetchBlob as fetchBlobWith } from '../../shared/fetch.js';
import { countingSleep, pseudoRandom, rangeStart, type ReadServer, startReadServer, tempDir, writeBlob } from './fetch-fixture.js';

const SIZE = 3 * 1024 * 1024 + 12345;
// Every case runs twice: with the partial file hashed inline (blobs under 64 MiB), and on the
// hashing thread that reads the file back (shared/fetch-hash.ts), which large blobs use.
for (const [mode, hashThreadMinBytes] of [
  ['hashed inline', undefined],
  ['hashed on a thread', 0],
] as const) describe(`fetchBlob, ${mode}`, () => {
  const fetchBlob = (o: FetchBlobOptions) => fetchBlobWith({ hashThreadMinBytes, ...o });

  let dir: string;
  let cleanup: () => Promise<void>;
  let data: Buffer;
  let digest: Digest;
  let blobPath: string;
  const servers: ReadServer[] = [];
  const noSleep = async () => {};

  async function server(faults = {}): Promise<ReadServer> {
    const s = await startReadServer(faults);
    await s.addBlob(blobPath);
    servers.push(s);
    return s;
  }

  beforeEach(async () => {
    ({ dir, cleanup } = await tempDir());
    data = pseudoRandom(SIZE, 7);
    blobPath = join(dir, 'src.blob');
    digest = await writeBlob(blobPath, data);
  });
  afterEach(async () => {
    await Promise.all(servers.splice(0).map((s) => s.close()));
    await cleanup();
  });

  test('downloads, verifies and renames into place', async () => {
    const a = await server();
    const out = join(dir, 'out.bin');
    const seen: number[] = [];
    const r = await fetchBlob({ sources: [a.url], digest, size: SIZE, out, onProgress: (p) => seen.push(p.bytes) });
    assert.deepEqual(await readFile(out), data);
    assert.equal(r.digest, digest);
    assert.equal(r.size, SIZE);
    assert.deepEqual(r.sources, [a.url]);
    assert.equal(r.alreadyPresent, false);
    assert.equal(seen.at(-1), SIZE);
    assert.equal(existsSync(`${out}.partial`), false);
  });

  test('a connection cut mid-body resumes from the next source with Range', async () => {
    const a = await server({ cutAfter: 1_000_000 });
    const b = await server();
    const out = join(dir, 'out.bin');
    const r = await fetchBlob({ sources: [a.url, b.url], digest, size: SIZE, out });
    assert.ok((await readFile(out)).equals(data), 'byte-identical');
    assert.equal(a.blobRequests.length, 1);
    assert.equal(b.blobRequests.length, 1);
    const start = rangeStart(b.blobRequests[0]);
    assert.ok(start > 0 && start <= 1_000_000, `second source asked from ${b.blobRequests[0].range}`);
    assert.deepEqual(r.sources, [a.url, b.url]);
  });

  test('a stalled source is abandoned after the idle timeout and the next one continues', async () => {
    const a = await server({ stallAfter: 500_000 });
    const b = await server();
    const out = join(dir, 'out.bin');
    const r = await fetchBlob({ sources: [a.url, b.url], digest, size: SIZE, out, idleTimeoutMs: 300 });
    assert.ok((await readFile(out)).equals(data));
    assert.ok(rangeStart(b.blobRequests[0]) > 0, 'resumed with Range');
    assert.deepEqual(r.sources, [a.url, b.url]);
  });

  test('a 200 answer to a Range request continues after the bytes held (its prefix is dropped)', async () => {
    const a = await server({ cutAfter: 700_000 });
    const b = await server({ ignoreRange: true });
    const out = join(dir, 'out.bin');
    const r = await fetchBlob({ sources: [a.url, b.url], digest, size: SIZE, out });
    assert.ok((await readFile(out)).equals(data));
    assert.ok(rangeStart(b.blobRequests[0]) > 0);
    // The unified rule (shared/fetch-range.ts, the stage's too): a's bytes are kept, b's answer
    // supplies the rest, and the whole-blob sha256 vouches for both.
    assert.deepEqual(r.sources, [a.url, b.url], 'a kept its piece, b supplied the rest');
    assert.equal(r.downloaded, rangeStart(b.blobRequests[0]) + SIZE, "a's piece, then b's whole body (its first bytes dropped)");
  });

  test('wraps around the sources while each pass makes progress', async () => {
    const a = await server({ cutAfter: 400_000 });
    const b = await server({ cutAfter: 400_000 });
    const out = join(dir, 'out.bin');
    const r = await fetchBlob({ sources: [a.url, b.url], digest, size: SIZE, out, retries: 1, sleep: noSleep });
    assert.ok((await readFile(out)).equals(data));
    const starts = [...a.blobRequests, ...b.blobRequests].map(rangeStart).sort((x, y) => x - y);
    assert.ok(starts.length >= Math.ceil(SIZE / 400_000), `${starts.length} requests`);
    assert.equal(new Set(starts).size, starts.length, 'every request continued from a new offset');
    assert.deepEqual(new Set(r.sources), new Set([a.url, b.url]));
  });

  test('gives up after `retries` passes without progress and keeps the partial', async () => {
    const a = await server({ cutAfter: 500_000 });
    const out = join(dir, 'out.bin');
    const backoff = countingSleep();
    // After the first bytes, a sends headers and nothing else: no further progress.
    const onProgress = (p: { bytes: number }) => {
      if (p.bytes > 0) a.faults = { cutAfter: 0 };
    };
    await assert.rejects(fetchBlob({ sources: [a.url], digest, size: SIZE, out, retries: 2, sleep: backoff.sleep, onProgress }), { code: 'SC_ERR_UPSTREAM' });
    assert.equal(backoff.calls, 2, 'backoff before each extra pass');
    assert.equal(a.blobRequests.length, 4, 'one pass with progress, then 1 + retries passes without');
    assert.equal(existsSync(out), false);
    const partial = await readFile(`${out}.partial`);
    assert.ok(partial.length > 0 && partial.equals(data.subarray(0, partial.length)), 'partial kept for a later resume');
  });

  test('a .partial from an earlier run is re-hashed and continued with Range', async () => {
    const a = await server();
    const out = join(dir, 'out.bin');
    await writeFile(`${out}.partial`, data.subarray(0, 123_456));
    const r = await fetchBlob({ sources: [a.url], digest, size: SIZE, out });
    assert.ok((await readFile(out)).equals(data));
    assert.equal(a.blobRequests[0].range, 'bytes=123456-');
    assert.equal(r.resumedFrom, 123_456);
    assert.equal(r.downloaded, SIZE - 123_456);
  });

  test('a corrupt .partial fails the digest, is discarded, and the blob is fetched again', async () => {
    const a = await server();
    const out = join(dir, 'out.bin');
    const bad = Buffer.from(data.subarray(0, 200_000));
    bad[1000] ^= 0xff;
    await writeFile(`${out}.partial`, bad);
    const r = await fetchBlob({ sources: [a.url], digest, size: SIZE, out });
    assert.ok((await readFile(out)).equals(data));
    assert.deepEqual(
      a.blobRequests.map((q) => q.range),
      ['bytes=200000-', undefined],
    );
    assert.deepEqual(r.sources, [a.url]);
  });

  test('a tampered blob is rejected: no file at out, no partial left', async () => {
    const tampered = Buffer.from(data);
    tampered[SIZE - 1] ^= 1;
    const badPath = join(dir, 'bad.blob');
    await writeFile(badPath, tampered);
    const a = await startReadServer();
    servers.push(a);
    await a.addBlob(badPath, digest);
    const out = join(dir, 'out.bin');
    await assert.rejects(fetchBlob({ sources: [a.url], digest, size: SIZE, out }), { code: 'SC_ERR_DIGEST_MISMATCH' });
    assert.equal(existsSync(out), false);
    assert.equal(existsSync(`${out}.partial`), false);
  });

  test('a source serving a tampered blob is dropped and the next source serves the real one', async () => {
    const tampered = Buffer.from(data);
    tampered[5] ^= 1;
    const badPath = join(dir, 'bad.blob');
    await writeFile(badPath, tampered);
    const bad = await startReadServer();
    servers.push(bad);
    await bad.addBlob(badPath, digest);
    const good = await server();
    const out = join(dir, 'out.bin');
    const r = await fetchBlob({ sources: [bad.url], origin: good.url, digest, size: SIZE, out });
    assert.ok((await readFile(out)).equals(data));
    assert.deepEqual(r.sources, [good.url]);
    assert.equal(bad.blobRequests.length, 1);
  });

  test('a source with a different size for the digest is passed over', async () => {
    const shortPath = join(dir, 'short.blob');
    await writeFile(shortPath, data.subarray(0, 1000));
    const wrong = await startReadServer();
    servers.push(wrong);
    await wrong.addBlob(shortPath, digest);
    const good = await server();
    const out = join(dir, 'out.bin');
    const r = await fetchBlob({ sources: [wrong.url, good.url], digest, size: SIZE, out });
    assert.ok((await readFile(out)).equals(data));
    assert.deepEqual(r.sources, [good.url]);
  });

  test('an existing out with the right digest is not fetched again', async () => {
    const a = await server();
    const out = join(dir, 'out.bin');
    await writeFile(out, data);
    const r = await fetchBlob({ sources: [a.url], digest, size: SIZE, out });
    assert.equal(r.alreadyPresent, true);
    assert.equal(a.blobRequests.length, 0);
  });

  test('an existing out with other content is refused, or replaced with overwrite', async () => {
    const a = await server();
    const out = join(dir, 'out.bin');
    await writeFile(out, 'something else');
    await assert.rejects(fetchBlob({ sources: [a.url], digest, size: SIZE, out }), { code: 'SC_ERR_FILE_EXISTS' });
    assert.equal(await readFile(out, 'utf8'), 'something else');
    await fetchBlob({ sources: [a.url], digest, size: SIZE, out, overwrite: true });
    assert.ok((await readFile(out)).equals(data));
  });

  test('every source answering 404 is SC_ERR_BLOB_NOT_FOUND and leaves nothing behind', async () => {
    const a = await startReadServer();
    const b = await startReadServer();
    servers.push(a, b);
    const out = join(dir, 'out.bin');
    await assert.rejects(fetchBlob({ sources: [a.url, b.url], digest, size: SIZE, out, retries: 0 }), { code: 'SC_ERR_BLOB_NOT_FOUND' });
    assert.equal(existsSync(out), false);
    assert.equal(existsSync(`${out}.partial`), false);
  });

  test('an aborted fetch stops with a code and keeps its partial', async () => {
    const a = await server({ stallAfter: 300_000 });
    const out = join(dir, 'out.bin');
    const ac = new AbortController();
    const p = fetchBlob({
      sources: [a.url],
      digest,
      size: SIZE,
      out,
      signal: ac.signal,
      idleTimeoutMs: 120_000,
      onProgress: (pr) => {
        if (pr.bytes > 0) ac.abort();
      },
    });
    await assert.rejects(p, { code: 'SC_ERR_UNAVAILABLE' });
    assert.ok(existsSync(`${out}.partial`));
  });

  // The disk fills part-way through the second write batch (a 1600 KiB file system; batches are
  // about 1 MiB). The batch after it must not be written at all: it used to land at the failed
  // batch's offset (the partial's length had not moved past it), leaving the blob's later bytes
  // in the middle of the partial kept for a resume.
  test('a full disk fails the fetch with SC_ERR_NO_SPACE and keeps a partial that holds only the blob\'s own prefix', async (t) => {
    const a = await server();
    const mnt = join(dir, 'small-fs');
    mkdirSync(mnt);
    if (spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=1600k', 'tmpfs', mnt]).status !== 0) {
      t.skip('cannot mount a small tmpfs here');
      return;
    }
    try {
      const out = join(mnt, 'out.bin');
      let err: unknown;
      await fetchBlob({ sources: [a.url], digest, size: SIZE, out }).catch((e: unknown) => {
        err = e;
      });
      assert.ok(isScError(err, 'SC_ERR_NO_SPACE'), `expected SC_ERR_NO_SPACE, got ${(err as Error)?.message}`);
      assert.deepEqual(err.details, { errno: 'ENOSPC', path: `${out}.partial` });
      assert.equal(existsSync(out), false);
      const partial = await readFile(`${out}.partial`);
      assert.ok(partial.length > 1 << 20, `partial of ${partial.length} bytes`);
      assert.ok(partial.equals(data.subarray(0, partial.length)), 'the partial is a prefix of the blob');
    } finally {
      execFileSync('umount', [mnt]);
    }
  });

  test('bad input is refused with codes', async () => {
    const out = join(dir, 'out.bin');
    await assert.rejects(fetchBlob({ sources: ['http://127.0.0.1:1'], digest: 'sha256:xyz', size: 1, out }), { code: 'SC_ERR_BAD_DIGEST' });
    await assert.rejects(fetchBlob({ sources: ['http://127.0.0.1:1'], digest, size: -1, out }), { code: 'SC_ERR_BAD_REQUEST' });
    await assert.rejects(fetchBlob({ sources: [], digest, size: 1, out }), { code: 'SC_ERR_NO_UPSTREAM' });
  });

  test('origin is the last resort: a slow stage that keeps making progress keeps the download', async () => {
    // The stage cuts every response after 400 kB (busy), so each pass gains bytes: origin is never asked.
    const stage = await server({ cutAfter: 400_000 });
    const origin = await server();
    const out = join(dir, 'out.bin');
    const r = await fetchBlob({ sources: [stage.url], origin: origin.url, digest, size: SIZE, out, retries: 1, sleep: noSleep });
    assert.ok((await readFile(out)).equals(data));
    assert.equal(origin.blobRequests.length, 0, 'no origin blob request while the stage makes progress');
    assert.deepEqual(r.sources, [stage.url]);
  });

  test('origin is the last resort: a stalled stage is retried `retries` + 1 passes before origin serves the rest', async () => {
    const stage = await server({ stallAfter: 0 });
    const origin = await server();
    const out = join(dir, 'out.bin');
    const backoff = countingSleep();
    const r = await fetchBlob({ sources: [stage.url], origin: origin.url, digest, size: SIZE, out, retries: 2, idleTimeoutMs: 200, sleep: backoff.sleep });
    assert.ok((await readFile(out)).equals(data));
    assert.equal(stage.blobRequests.length, 3, 'the stage got 1 + retries passes first');
    assert.equal(backoff.calls, 2, 'with a backoff before each extra pass');
    assert.equal(origin.blobRequests.length, 1);
    assert.deepEqual(r.sources, [origin.url]);
  });

  test('origin is asked at once when every stage answers 404, or when there is no stage', async () => {
    const stage = await startReadServer(); // knows no blob
    servers.push(stage);
    const origin = await server();
    const out = join(dir, 'out.bin');
    const backoff = countingSleep();
    const sleep = backoff.sleep;
    const r = await fetchBlob({ sources: [stage.url], origin: origin.url, digest, size: SIZE, out, sleep });
    assert.deepEqual(r.sources, [origin.url]);
    assert.equal(stage.blobRequests.length, 1);
    assert.equal(backoff.calls, 0, 'no backoff before origin');
    const out2 = join(dir, 'out2.bin');
    const r2 = await fetchBlob({ sources: [], origin: origin.url, digest, size: SIZE, out: out2, sleep });
    assert.deepEqual(r2.sources, [origin.url]);
  });

  test('a stage that recovers after origin joined is still preferred for the rest', async () => {
    const stage = await server({ cutAfter: 0 });
    const origin = await server({ cutAfter: 300_000 });
    const out = join(dir, 'out.bin');
    const backoff = countingSleep();
    const r = await fetchBlob({
      sources: [stage.url],
      origin: origin.url,
      digest,
      size: SIZE,
      out,
      retries: 1,
      sleep: backoff.sleep,
      onProgress: (p) => {
        if (p.source === origin.url && p.bytes > 0) stage.faults = {};
      },
    });
    assert.ok((await readFile(out)).equals(data));
    assert.equal(origin.blobRequests.length, 1, 'origin served one piece only');
    assert.deepEqual(r.sources, [origin.url, stage.url]);
    assert.equal(backoff.calls, 1);
  });
});
