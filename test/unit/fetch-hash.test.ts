/**
 * The partial file's hash (shared/fetch-hash.ts): from the threshold up it runs on a thread that
 * reads the file back, so it hashes what is in the file, not the bytes handed to `add`.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { partialHash } from '../../shared/fetch-hash.js';

const sha = (...bufs: Buffer[]) => {
  const h = createHash('sha256');
  for (const b of bufs) h.update(b);
  return h.digest('hex');
};

test('below the threshold the bytes added are hashed; from it the file is read back, in order, across resets', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'sc-fetch-hash-'));
  const fh = await open(join(dir, 'partial'), 'w+');
  try {
    const a = randomBytes(5 << 20);
    const b = randomBytes(123_457);
    await fh.write(a, 0, a.length, 0);
    await fh.write(b, 0, b.length, a.length);

    const inline = partialHash(fh.fd, 100, 1000);
    assert.equal(inline.readsFile, false);
    inline.add([b]);
    inline.written(b.length);
    assert.equal(await inline.digest(), sha(b), 'inline: what was added, not the file');

    const thread = partialHash(fh.fd, a.length + b.length, 1000);
    try {
      assert.equal(thread.readsFile, true);
      thread.add([b]); // ignored: the thread reads the file
      thread.written(a.length);
      assert.equal(await thread.digest(), sha(a));
      thread.written(a.length + b.length);
      assert.equal(await thread.digest(), sha(a, b), 'the digest goes on from where it was');
      thread.reset();
      thread.written(1000);
      assert.equal(await thread.digest(), sha(a.subarray(0, 1000)), 'a reset starts over from the first byte');
      thread.written(a.length + b.length + 1);
      await assert.rejects(thread.digest(), /ends at/, 'a file shorter than said fails the hash');
    } finally {
      await thread.close();
    }
    await assert.rejects(thread.digest(), /hashing thread/, 'a closed thread answers no digest');
  } finally {
    await fh.close();
    await rm(dir, { recursive: true, force: true });
  }
});
