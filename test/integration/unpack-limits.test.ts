/**
 * Limits of the unpack path: the signed manifest's `blob.unpackedSize` (and a cap when a manifest
 * has none) stops a decompression bomb in both of the agent's unpack paths (worker thread and
 * single thread), old manifests without the field stay valid and signed, and a full target file
 * system is SC_ERR_NO_SPACE, which the agent treats as permanent.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { createWriteStream, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { after, before, describe, it } from 'node:test';
import { isPermanent } from '../../services/agent/steps/common.js';
import { unpackFile } from '../../shared/bundle/unpack-file.js';
import { generateAgeIdentity, packBundle, packDirStream } from '../../shared/bundle/index.js';
import { digestFile } from '../../shared/digest.js';
import { isScError } from '../../shared/errors.js';
import { type Manifest, parseManifest, signManifest, verifyManifest } from '../../shared/manifest.js';

const isTooLarge = (e: unknown) => {
  assert.ok(isScError(e, 'SC_ERR_BUNDLE_TOO_LARGE'), `expected SC_ERR_BUNDLE_TOO_LARGE, got ${(e as Error)?.message}`);
  return true;
};

/** Bytes under `dir`, files only (apparent sizes). */
function bytesUnder(dir: string): number {
  let n = 0;
  for (const e of readdirSync(dir, { withFileTypes: true, recursive: true })) if (e.isFile()) n += statSync(join(e.parentPath ?? e.path, e.name)).size;
  return n;
}

describe('unpack limits', () => {
  let base: string;
  let identity: string;
  let bomb: { file: string; blob: Manifest['blob']; plainBytes: number };
  let n = 0;
  const fresh = () => join(base, `out-${n++}`);

  before(async () => {
    base = mkdtempSync(join(tmpdir(), 'sc-unpack-limits-'));
    const id = await generateAgeIdentity();
    identity = id.identity;
    // 96 MiB of one byte: a few KiB once compressed.
    const tree = join(base, 'tree');
    mkdirSync(join(tree, 'var/lib'), { recursive: true });
    writeFileSync(join(tree, 'etc-hostname'), 'bomb\n');
    writeFileSync(join(tree, 'var/lib/big'), Buffer.alloc(96 << 20, 0x61));
    const file = join(base, 'bomb.blob');
    await pipeline(packBundle({ dir: tree }, { compression: 'zstd', recipients: [id.recipient] }), createWriteStream(file));
    let plainBytes = 0;
    for await (const c of packDirStream(tree)) plainBytes += (c as Buffer).length;
    const { digest, size } = await digestFile(file);
    assert.ok(size < 1 << 20, `the bomb is small once compressed (${size} bytes)`);
    bomb = { file, blob: { digest, size, compression: 'zstd', encryption: 'age' }, plainBytes };
  });
  after(() => rmSync(base, { recursive: true, force: true }));

  for (const [path, workerMinBytes] of [
    ['worker thread', 0],
    ['single thread', Number.MAX_SAFE_INTEGER],
  ] as const) {
    it(`stops at the manifest's unpackedSize (${path}) with SC_ERR_BUNDLE_TOO_LARGE`, async () => {
      const out = fresh();
      await assert.rejects(unpackFile(bomb.file, { ...bomb.blob, unpackedSize: 4 << 20 }, { dir: out, identities: [identity], workerMinBytes }), isTooLarge);
      assert.ok(bytesUnder(out) <= 4 << 20, `at most the declared size was written (${bytesUnder(out)} bytes)`);
    });

    it(`without unpackedSize, stops at the cap (${path})`, async () => {
      const out = fresh();
      await assert.rejects(unpackFile(bomb.file, bomb.blob, { dir: out, identities: [identity], workerMinBytes, maxUnpackedBytes: 8 << 20 }), isTooLarge);
      assert.ok(bytesUnder(out) <= 8 << 20);
    });

    it(`unpacks when the plaintext is exactly unpackedSize (${path})`, async () => {
      const out = fresh();
      const r = await unpackFile(bomb.file, { ...bomb.blob, unpackedSize: bomb.plainBytes }, { dir: out, identities: [identity], workerMinBytes });
      assert.equal(r.entries, 4);
      assert.equal(statSync(join(out, 'var/lib/big')).size, 96 << 20);
    });
  }

  it('unpackedSize is optional in the manifest schema, and covered by the signature', () => {
    const keys = generateKeyPairSync('ed25519');
    const base = {
      schema: 1,
      name: 'os',
      version: '1',
      role: 'target',
      os: { id: 'debian', version: '12', family: 'linux', netFormat: 'ifupdown' },
      publishedAt: '2026-01-01T00:00:00.000Z',
      signatures: [],
    };
    const old = parseManifest({ ...base, blob: { ...bomb.blob } });
    assert.equal('unpackedSize' in old.blob, false);
    verifyManifest(signManifest(old, keys.privateKey), [keys.publicKey]);
    const m = signManifest(parseManifest({ ...base, blob: { ...bomb.blob, unpackedSize: 123 } }), keys.privateKey);
    verifyManifest(m, [keys.publicKey]);
    const raised = { ...m, blob: { ...m.blob, unpackedSize: 1 << 40 } };
    assert.throws(() => verifyManifest(raised, [keys.publicKey]), (e: unknown) => isScError(e, 'SC_ERR_BAD_SIGNATURE'));
    const dropped = { ...m, blob: { ...bomb.blob } };
    assert.throws(() => verifyManifest(dropped, [keys.publicKey]), (e: unknown) => isScError(e, 'SC_ERR_BAD_SIGNATURE'));
    assert.throws(() => parseManifest({ ...base, blob: { ...bomb.blob, unpackedSize: -1 } }), (e: unknown) => isScError(e, 'SC_ERR_BAD_MANIFEST'));
    assert.throws(() => parseManifest({ ...base, blob: { ...bomb.blob, unpackedSize: 1.5 } }), (e: unknown) => isScError(e, 'SC_ERR_BAD_MANIFEST'));
  });

  // Twenty times through the worker thread (twice in one thread): the extractor failing on ENOSPC used to race the feeder that was
  // reading the next chunk, which then waited for ever for the destroyed extractor to drain (a
  // hung agent instead of a failed step, about one run in four). With the race, this test hangs.
  it('a full target file system is SC_ERR_NO_SPACE, permanent for the agent, and never hangs', async (t) => {
    for (let i = 0; i < 22; i++) {
      const mnt = join(base, `small-fs-${i}`);
      mkdirSync(mnt);
      if (spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', mnt]).status !== 0) {
        t.skip('cannot mount a small tmpfs here');
        return;
      }
      try {
        let err: unknown;
        await unpackFile(bomb.file, bomb.blob, { dir: join(mnt, 'root'), identities: [identity], workerMinBytes: i < 2 ? Number.MAX_SAFE_INTEGER : 0 }).catch((e) => {
          err = e;
        });
        assert.ok(isScError(err, 'SC_ERR_NO_SPACE'), `expected SC_ERR_NO_SPACE, got ${(err as Error)?.message}`);
        assert.equal((err as { details?: { errno?: string } }).details?.errno, 'ENOSPC');
        assert.equal(isPermanent(err), true);
      } finally {
        execFileSync('umount', [mnt]);
      }
    }
  });
});
