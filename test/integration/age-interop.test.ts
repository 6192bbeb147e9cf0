/**
 * Interop of shared/bundle/age.ts with the reference `age` CLI (Go, Debian package) in both
 * directions, and with the `age-encryption` npm package (typage) as a second peer.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { after, before, describe, it } from 'node:test';
import { Decrypter, Encrypter } from 'age-encryption';
import { decryptStream, encryptStream, generateAgeIdentity } from '../../shared/bundle/index.js';
import { isScError } from '../../shared/errors.js';

const hasAge = spawnSync('age', ['--version'], { stdio: 'ignore' }).status === 0;
const SIZES = [0, 1, 65535, 65536, 65537, 3 * 65536, 5 * 1024 * 1024 + 123];

describe('age interop', { skip: hasAge ? false : 'the age CLI is not installed' }, () => {
  let dir: string;
  let me: { identity: string; recipient: string };
  let other: { identity: string; recipient: string };
  let idFile: string;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'sc-age-interop-'));
    me = await generateAgeIdentity();
    other = await generateAgeIdentity();
    idFile = join(dir, 'key.txt');
    writeFileSync(idFile, `# created: 2024-01-01T00:00:00Z\n# public key: ${me.recipient}\n${me.identity}\n`, { mode: 0o600 });
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  const ours = async (src: string, dst: string, t: NodeJS.ReadWriteStream) =>
    pipeline(createReadStream(src, { highWaterMark: 1 << 20 }), t, createWriteStream(dst));

  it('our encryption decrypts with `age -d -i`', async () => {
    for (const size of SIZES) {
      const data = randomBytes(size);
      writeFileSync(join(dir, 'p'), data);
      await ours(join(dir, 'p'), join(dir, 'c'), encryptStream([me.recipient]));
      const out = execFileSync('age', ['-d', '-i', idFile, join(dir, 'c')], { maxBuffer: 64 << 20 });
      assert.ok(out.equals(data), `age -d of our ${size}-byte file`);
    }
  });

  it('`age -r` output decrypts with ours', async () => {
    for (const size of SIZES) {
      const data = randomBytes(size);
      writeFileSync(join(dir, 'p'), data);
      execFileSync('age', ['-r', me.recipient, '-r', other.recipient, '-o', join(dir, 'c'), join(dir, 'p')]);
      await ours(join(dir, 'c'), join(dir, 'd'), decryptStream([me.identity]));
      assert.ok(readFileSync(join(dir, 'd')).equals(data), `our decryption of age -r, ${size} bytes`);
    }
  });

  it('age CLI files: wrong identity, a flipped byte and truncation fail with SC_ERR_DECRYPT', async () => {
    const data = randomBytes(200_000);
    writeFileSync(join(dir, 'p'), data);
    execFileSync('age', ['-r', me.recipient, '-o', join(dir, 'c'), join(dir, 'p')]);
    const ct = readFileSync(join(dir, 'c'));
    const tryDecrypt = (buf: Buffer, ids: string[]) =>
      pipeline(Readable.from([buf]), decryptStream(ids), async (src: AsyncIterable<Buffer>) => {
        for await (const _ of src) {
          /* drain */
        }
      });
    const isDecrypt = (e: unknown) => isScError(e, 'SC_ERR_DECRYPT');
    await assert.rejects(tryDecrypt(ct, [other.identity]), isDecrypt);
    const flipped = Buffer.from(ct);
    flipped[ct.length - 70_000] ^= 0x80;
    await assert.rejects(tryDecrypt(flipped, [me.identity]), isDecrypt);
    await assert.rejects(tryDecrypt(ct.subarray(0, ct.length - 1000), [me.identity]), isDecrypt);
    // cut exactly after the first 64 KiB chunk (65536 + 16 bytes of ciphertext)
    const payload = ct.indexOf('\n', ct.indexOf('\n---') + 1) + 1 + 16;
    await assert.rejects(tryDecrypt(ct.subarray(0, payload + 65552), [me.identity]), isDecrypt);
    await tryDecrypt(ct, [me.identity]);
  });

  it('interoperates with the age-encryption package both ways', async () => {
    const data = randomBytes(3 * 65536 + 999);
    writeFileSync(join(dir, 'p'), data);
    await ours(join(dir, 'p'), join(dir, 'c'), encryptStream([me.recipient]));
    const d = new Decrypter();
    d.addIdentity(me.identity);
    const plain = await d.decrypt(readFileSync(join(dir, 'c')));
    assert.ok(Buffer.from(plain).equals(data), 'age-encryption decrypts ours');

    const e = new Encrypter();
    e.addRecipient(me.recipient);
    writeFileSync(join(dir, 'c2'), await e.encrypt(data));
    await ours(join(dir, 'c2'), join(dir, 'd2'), decryptStream([me.identity]));
    assert.ok(readFileSync(join(dir, 'd2')).equals(data), 'ours decrypts age-encryption');
  });
});
