/**
 * The overlapped host pipeline: unpackFile checks the blob's sha256 in the pass that unpacks it,
 * follows a file while it is written, and fetchAndUnpack unpacks a download as it arrives, taking
 * the tree only once the whole blob verified (real HTTP upstreams on 127.0.0.1).
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { type FleetKeys, makeFleetKeys, packBundleFile } from '../../services/demo/fleet.js';
import { makeSampleRootfs } from '../../shared/bundle/index.js';
import { unpackFile, WriteMark } from '../../shared/bundle/unpack-file.js';
import { fetchAndUnpack } from '../../shared/fetch-unpack.js';
import type { Manifest } from '../../shared/manifest.js';
import { type FaultUpstream, startFaultUpstream } from '../helpers/fault-upstream.js';
import { treeSnapshot } from '../helpers/tree.js';

const isMismatch = (e: { code?: string }) => e.code === 'SC_ERR_DIGEST_MISMATCH';

describe('overlapped unpack', () => {
  let root: string;
  let keys: FleetKeys;
  let m: Manifest;
  let file: string;
  /** The same tree packed again: other bytes (fresh file key), same size, also encrypted to the fleet. */
  let twin: { m: Manifest; file: string };
  let expected: Record<string, string>;
  let n = 0;
  const fresh = () => join(root, `out-${n++}`);
  const upstreams: FaultUpstream[] = [];
  const upstream = async () => {
    const u = await startFaultUpstream({ chunkSize: 64 * 1024 });
    upstreams.push(u);
    return u;
  };

  /**
   * fetchAndUnpack of the test bundle from `sources` into a fresh directory (worker path forced);
   * every reset empties that directory and is counted.
   */
  const fetchUnpack = (sources: string[], fetchOpts: { retries?: number } = {}) => {
    const dir = fresh();
    const counted = { dir, resets: 0 };
    const run = fetchAndUnpack(
      { sources, digest: m.blob.digest, size: m.blob.size, out: join(root, `dl-${n++}`), backoffMs: 1, ...fetchOpts },
      m.blob,
      { dir, identities: keys.agent.identities, workerMinBytes: 0 },
      async () => {
        counted.resets++;
        await rm(dir, { recursive: true, force: true });
      },
    );
    return { counted, run };
  };

  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'sc-fetch-unpack-'));
    keys = await makeFleetKeys(join(root, 'keys'));
    const tree = join(root, 'tree');
    await makeSampleRootfs(tree, { id: 'debian', name: 'Debian', version: '12', netFormat: 'ifupdown', sizeMiB: 6 });
    const os = { id: 'debian', version: '12', netFormat: 'ifupdown' } as const;
    file = join(root, 'bundle');
    m = await packBundleFile(keys, { name: 'x', version: '1', role: 'base', dir: tree, os }, file);
    const twinFile = join(root, 'twin');
    twin = { m: await packBundleFile(keys, { name: 'x', version: '1', role: 'base', dir: tree, os }, twinFile), file: twinFile };
    assert.equal(twin.m.blob.size, m.blob.size, 'the twin has the same size');
    assert.notEqual(twin.m.blob.digest, m.blob.digest);
    const ref = fresh();
    await unpackFile(file, m.blob, { dir: ref, identities: keys.agent.identities, workerMinBytes: Number.MAX_SAFE_INTEGER });
    expected = await treeSnapshot(ref);
  });
  after(async () => {
    await Promise.all(upstreams.map((u) => u.close()));
    await rm(root, { recursive: true, force: true, maxRetries: 20, retryDelay: 50 });
  });

  it('checks the digest in the pass that unpacks: authentic age bytes under another digest are refused, on both paths', async () => {
    const wrong = { ...twin.m.blob, digest: m.blob.digest };
    // The worker decrypts and unpacks the twin completely; only its sha256 tells it is not the signed blob.
    await assert.rejects(unpackFile(twin.file, wrong, { dir: fresh(), identities: keys.agent.identities, workerMinBytes: 0 }), isMismatch);
    // The single-thread path hashes first and unpacks nothing.
    const dir = fresh();
    await assert.rejects(unpackFile(twin.file, wrong, { dir, identities: keys.agent.identities, workerMinBytes: Number.MAX_SAFE_INTEGER }), isMismatch);
    assert.equal(existsSync(dir), false);
    // A damaged payload fails to decrypt; the error names the cause, the digest.
    const bad = join(root, 'bad');
    await writeFile(bad, await readFile(file));
    const fh = await open(bad, 'r+');
    await fh.write(Buffer.from([0xff]), 0, 1, Math.floor(m.blob.size / 2));
    await fh.close();
    await assert.rejects(unpackFile(bad, m.blob, { dir: fresh(), identities: keys.agent.identities, workerMinBytes: 0 }), isMismatch);
    // `verified`: the caller vouches for the bytes, and the twin unpacks.
    const ok = fresh();
    await unpackFile(twin.file, wrong, { dir: ok, identities: keys.agent.identities, workerMinBytes: 0, verified: true });
    assert.deepEqual(await treeSnapshot(ok), expected);
  });

  it('follows a file while it is written, reading only below the mark', async () => {
    const src = await readFile(file);
    const growing = join(root, 'growing');
    const fh = await open(growing, 'w');
    const mark = new WriteMark();
    const dir = fresh();
    let done = false;
    const unpacking = unpackFile(growing, m.blob, { dir, identities: keys.agent.identities, workerMinBytes: 0, follow: mark }).finally(() => {
      done = true;
    });
    const piece = 300_000;
    for (let at = 0; at < src.length; at += piece) {
      const end = Math.min(src.length, at + piece);
      await fh.write(src, at, end - at, at);
      await new Promise((r) => setTimeout(r, 5));
      assert.equal(done, false, `finished with ${at} of ${src.length} bytes written`);
      mark.raise(end);
    }
    await fh.close();
    await unpacking;
    assert.deepEqual(await treeSnapshot(dir), expected);
  });

  it('an unpack following a file stops when aborted while it reads the header (it never waits for a mark that will not rise)', async () => {
    const src = await readFile(file);
    const growing = join(root, 'growing-abort');
    await writeFile(growing, src.subarray(0, 1 << 20));
    const mark = new WriteMark();
    mark.raise(1 << 20);
    const ac = new AbortController();
    const unpacking = unpackFile(growing, m.blob, { dir: fresh(), identities: keys.agent.identities, workerMinBytes: 0, follow: mark, signal: ac.signal });
    ac.abort(); // the header's read is in flight
    const hung = new Promise((_, reject) => setTimeout(() => reject(new Error('the unpack did not stop')), 10_000).unref());
    await assert.rejects(Promise.race([unpacking, hung]), (e: { code?: string }) => e.code === 'SC_ERR_UNAVAILABLE');
  });

  it('fetches and unpacks in one pass, also across a cut resumed with Range', async () => {
    const a = await upstream();
    const b = await upstream();
    await a.addBlobFile(file);
    await b.addBlobFile(file);
    a.fault({ kind: 'cut', afterBytes: 2_000_000 });
    const { counted, run } = fetchUnpack([a.url, b.url]);
    const r = await run;
    assert.equal(r.overlapped, true);
    assert.equal(counted.resets, 0);
    assert.deepEqual(r.fetched.sources, [a.url, b.url]);
    assert.ok(b.requests[0].start > 0, 'the second source was asked for the rest only');
    assert.deepEqual(await treeSnapshot(counted.dir), expected);
    assert.deepEqual(await readFile(r.fetched.path), await readFile(file));
  });

  it('a tree unpacked from bytes that then fail the digest is discarded and unpacked again from the verified file', async () => {
    const liar = await upstream();
    const good = await upstream();
    await liar.addBlobFile(twin.file, m.blob.digest); // authentic fleet bytes, not the signed blob
    await good.addBlobFile(file);
    const { counted, run } = fetchUnpack([liar.url, good.url]);
    const r = await run;
    assert.equal(r.overlapped, false, 'the overlapped tree came from bytes that failed the digest');
    assert.equal(counted.resets, 1);
    assert.deepEqual(r.fetched.sources, [good.url]);
    assert.deepEqual(await treeSnapshot(counted.dir), expected);
  });

  it('a fetch that fails leaves nothing unpacked', async () => {
    const a = await upstream();
    await a.addBlobFile(file);
    // Every answer carries one wrong byte late in the blob: the unpack has written files by then.
    a.setFaults([{ kind: 'flip', offset: m.blob.size - 200_000 }]);
    const { counted, run } = fetchUnpack([a.url], { retries: 0 });
    await assert.rejects(run, isMismatch);
    assert.equal(counted.resets, 1);
    assert.deepEqual(await readdir(counted.dir).catch(() => []), []);
  });
});
