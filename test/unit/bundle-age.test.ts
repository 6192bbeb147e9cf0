import assert from 'node:assert/strict';
import { createCipheriv, createHmac, createPublicKey, diffieHellman, generateKeyPairSync, hkdfSync, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { after, before, describe, it } from 'node:test';
import {
  AGE_CHUNK_SIZE,
  decryptStream,
  encryptStream,
  generateAgeIdentity,
  parseIdentity,
  parseRecipient,
  readIdentityFile,
  readRecipientsFile,
} from '../../shared/bundle/index.js';
import { isScError } from '../../shared/errors.js';

/** Feeds `data` in pieces of the given sizes (cycled), to hit every chunk-boundary case. */
function source(data: Buffer, pieces: number[] = [data.length || 1]): Readable {
  const parts: Buffer[] = [];
  for (let off = 0, i = 0; off < data.length; i++) {
    const n = Math.max(1, pieces[i % pieces.length]);
    parts.push(data.subarray(off, off + n));
    off += n;
  }
  return Readable.from(parts, { objectMode: false });
}

async function collect(src: Readable, ...transforms: NodeJS.ReadWriteStream[]): Promise<Buffer> {
  const out: Buffer[] = [];
  await pipeline(
    src,
    ...(transforms as unknown as [NodeJS.ReadWriteStream]),
    new Writable({
      write(c: Buffer, _e, cb) {
        out.push(c);
        cb();
      },
    }),
  );
  return Buffer.concat(out);
}

const encrypt = (data: Buffer, recipients: string[], pieces?: number[]) => collect(source(data, pieces), encryptStream(recipients));
const decrypt = (data: Buffer, identities: string[], pieces?: number[]) => collect(source(data, pieces), decryptStream(identities));

/**
 * A minimal age encoder written from the spec, independent of shared/bundle/age.ts, that can
 * also produce framings the spec forbids.
 */
function craft(recipient: string, chunks: { data: Buffer; last: boolean }[], badMac = false): Buffer {
  const b64 = (x: Buffer) => x.toString('base64').replace(/=+$/, '');
  const hkdf = (ikm: Buffer, salt: Buffer, info: string) => Buffer.from(hkdfSync('sha256', ikm, salt, info, 32));
  const seal = (key: Buffer, nonce: Buffer, pt: Buffer) => {
    const c = createCipheriv('chacha20-poly1305', key, nonce, { authTagLength: 16 });
    const out = Buffer.concat([c.update(pt), c.final()]);
    return Buffer.concat([out, c.getAuthTag()]);
  };
  const recip = parseRecipient(recipient).publicKey;
  const eph = generateKeyPairSync('x25519');
  const share = eph.publicKey.export({ type: 'spki', format: 'der' }).subarray(-32);
  const theirs = createPublicKey({ key: Buffer.concat([Buffer.from('302a300506032b656e032100', 'hex'), recip]), format: 'der', type: 'spki' });
  const shared = diffieHellman({ privateKey: eph.privateKey, publicKey: theirs });
  const fileKey = randomBytes(16);
  const wrapKey = hkdf(shared, Buffer.concat([share, recip]), 'age-encryption.org/v1/X25519');
  const body = seal(wrapKey, Buffer.alloc(12), fileKey);
  const head = `age-encryption.org/v1\n-> X25519 ${b64(share)}\n${b64(body)}\n---`;
  const mac = createHmac('sha256', hkdf(fileKey, Buffer.alloc(0), 'header')).update(head).digest();
  if (badMac) mac[0] ^= 1;
  const nonce = randomBytes(16);
  const key = hkdf(fileKey, nonce, 'payload');
  const parts = [Buffer.from(`${head} ${b64(mac)}\n`), nonce];
  chunks.forEach((c, i) => {
    const n = Buffer.alloc(12);
    n.writeUIntBE(i, 5, 6);
    n[11] = c.last ? 1 : 0;
    parts.push(seal(key, n, c.data));
  });
  return Buffer.concat(parts);
}

/** Index of the payload (after the header and the 16-byte nonce). */
function payloadStart(ct: Buffer): number {
  const mac = ct.indexOf('\n---');
  return ct.indexOf('\n', mac + 1) + 1 + 16;
}

async function rejectsDecrypt(p: Promise<unknown>, re?: RegExp): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(isScError(err, 'SC_ERR_DECRYPT'), `expected SC_ERR_DECRYPT, got ${(err as Error)?.message}`);
    if (re) assert.match((err as Error).message, re);
    return true;
  });
}

describe('age codec (node:crypto)', () => {
  let a: { identity: string; recipient: string };
  let b: { identity: string; recipient: string };
  let dir: string;

  before(async () => {
    a = await generateAgeIdentity();
    b = await generateAgeIdentity();
    dir = mkdtempSync(join(tmpdir(), 'sc-age-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('round-trips sizes around the 64 KiB chunk boundary with exact STREAM framing', async () => {
    const C = AGE_CHUNK_SIZE;
    for (const size of [0, 1, C - 1, C, C + 1, 2 * C, 3 * C, 3 * C + 7]) {
      const data = randomBytes(size);
      for (const pieces of [[size || 1], [1000], [C], [C + 1, 3], [7 * C + 5]]) {
        const ct = await encrypt(data, [a.recipient], pieces);
        // One chunk per started 64 KiB, at least one; a full last chunk only for exact multiples.
        const chunks = Math.max(1, Math.ceil(size / C));
        assert.equal(ct.length - payloadStart(ct), size + 16 * chunks, `ciphertext framing for ${size} bytes fed as ${pieces}`);
        const pt = await decrypt(ct, [a.identity], [4096, 1, C + 16, 17]);
        assert.ok(pt.equals(data), `round trip ${size} fed as ${pieces}`);
      }
    }
  });

  it('writes a spec header: version line, X25519 stanza, 64-column body, MAC line', async () => {
    const ct = await encrypt(Buffer.from('hi'), [a.recipient, b.recipient]);
    const header = ct.subarray(0, payloadStart(ct) - 16).toString('latin1');
    const lines = header.split('\n');
    assert.equal(lines[0], 'age-encryption.org/v1');
    assert.match(lines[1], /^-> X25519 [A-Za-z0-9+/]{43}$/);
    assert.match(lines[2], /^[A-Za-z0-9+/]{43}$/);
    assert.match(lines[3], /^-> X25519 [A-Za-z0-9+/]{43}$/);
    assert.match(lines[5], /^--- [A-Za-z0-9+/]{43}$/);
    assert.equal(lines[6], '');
  });

  it('decrypts for each of several recipients, and with any matching identity of several', async () => {
    const data = randomBytes(100_000);
    const ct = await encrypt(data, [a.recipient, b.recipient]);
    assert.ok((await decrypt(ct, [a.identity])).equals(data));
    assert.ok((await decrypt(ct, [b.identity])).equals(data));
    const only = await encrypt(data, [b.recipient]);
    assert.ok((await decrypt(only, [a.identity, b.identity])).equals(data));
  });

  it('fails with SC_ERR_DECRYPT on a wrong identity', async () => {
    const ct = await encrypt(randomBytes(1000), [a.recipient]);
    await rejectsDecrypt(decrypt(ct, [b.identity]), /no identity matched/);
  });

  it('fails with SC_ERR_DECRYPT on a flipped byte anywhere: header, MAC, nonce, payload, last tag', async () => {
    const data = randomBytes(3 * AGE_CHUNK_SIZE + 10);
    const ct = await encrypt(data, [a.recipient]);
    const p = payloadStart(ct);
    for (const at of [30, p - 30, p - 5, p + 10, p + AGE_CHUNK_SIZE + 20, ct.length - 1]) {
      const bad = Buffer.from(ct);
      bad[at] ^= 0x01;
      await rejectsDecrypt(decrypt(bad, [a.identity]));
    }
  });

  it('never ends cleanly on a truncated file, also exactly at a chunk boundary', async () => {
    const data = randomBytes(2 * AGE_CHUNK_SIZE + 100);
    const ct = await encrypt(data, [a.recipient]);
    const p = payloadStart(ct);
    const cuts = [
      10, // inside the version line
      p - 20, // inside the header
      p - 3, // inside the nonce
      p, // no payload at all
      p + 8, // shorter than a tag
      p + AGE_CHUNK_SIZE + 16, // exactly after the first full chunk
      p + 2 * (AGE_CHUNK_SIZE + 16), // exactly after the second full chunk (the last one is gone)
      ct.length - 1,
    ];
    for (const cut of cuts) await rejectsDecrypt(decrypt(ct.subarray(0, cut), [a.identity]));
    // For an exact multiple of 64 KiB the last chunk is full; a stream cut after a full
    // non-last chunk must not pass for a complete one.
    const exact = await encrypt(randomBytes(2 * AGE_CHUNK_SIZE), [a.recipient]);
    await rejectsDecrypt(decrypt(exact.subarray(0, payloadStart(exact) + AGE_CHUNK_SIZE + 16), [a.identity]));
  });

  it('refuses STREAM framings the spec forbids, built independently from the spec', async () => {
    const C = AGE_CHUNK_SIZE;
    const ok = craft(a.recipient, [
      { data: randomBytes(C), last: false },
      { data: randomBytes(5), last: true },
    ]);
    assert.equal((await decrypt(ok, [a.identity])).length, C + 5, 'the independent encoder agrees with the decoder');
    // A full chunk followed by an empty last chunk: only an empty file may have an empty last chunk.
    await rejectsDecrypt(decrypt(craft(a.recipient, [{ data: randomBytes(C), last: false }, { data: Buffer.alloc(0), last: true }]), [a.identity]), /empty/);
    // No chunk flagged last at all.
    await rejectsDecrypt(decrypt(craft(a.recipient, [{ data: randomBytes(C), last: false }]), [a.identity]));
    // A short chunk that is not flagged last, followed by more.
    await rejectsDecrypt(decrypt(craft(a.recipient, [{ data: randomBytes(10), last: false }, { data: randomBytes(10), last: true }]), [a.identity]));
    // A header with a wrong MAC.
    await rejectsDecrypt(decrypt(craft(a.recipient, [{ data: randomBytes(10), last: true }], true), [a.identity]), /MAC/);
  });

  it('fails on trailing garbage and on a non-age input', async () => {
    const ct = await encrypt(randomBytes(500), [a.recipient]);
    await rejectsDecrypt(decrypt(Buffer.concat([ct, Buffer.from('x')]), [a.identity]));
    await rejectsDecrypt(decrypt(Buffer.from('hello world, this is not an age file\n'), [a.identity]), /not an age/);
    await rejectsDecrypt(decrypt(Buffer.from('-----BEGIN AGE ENCRYPTED FILE-----\n'), [a.identity]), /armored/);
  });

  it('parses and validates recipients and identities (SC_ERR_BAD_KEY), never echoing a secret', () => {
    const id = parseIdentity(a.identity);
    assert.equal(id.recipient, a.recipient);
    assert.equal(parseIdentity(a.identity.toLowerCase()).recipient, a.recipient);
    assert.equal(parseRecipient(a.recipient).publicKey.length, 32);
    assert.equal(parseRecipient(a.recipient.toUpperCase()).text, a.recipient);
    const flipped = `${a.recipient.slice(0, -1)}${a.recipient.endsWith('x') ? 'y' : 'x'}`; // one character changed: the checksum fails
    for (const bad of ['', 'age1', flipped, a.identity, 'age1pq1abc']) {
      assert.throws(() => parseRecipient(bad), (e: unknown) => isScError(e, 'SC_ERR_BAD_KEY'));
    }
    const tampered = `${a.identity.slice(0, -2)}QQ`;
    for (const bad of ['', a.recipient, tampered, `${a.identity.slice(0, 20)}${a.identity.slice(20).toLowerCase()}`]) {
      assert.throws(
        () => parseIdentity(bad),
        (e: unknown) => isScError(e, 'SC_ERR_BAD_KEY') && !JSON.stringify({ m: (e as Error).message, d: (e as { details?: unknown }).details }).includes(bad.slice(16) || '\0'),
      );
    }
    assert.throws(() => encryptStream([]), (e: unknown) => isScError(e, 'SC_ERR_BAD_KEY'));
    assert.throws(() => decryptStream([]), (e: unknown) => isScError(e, 'SC_ERR_BAD_KEY'));
  });

  it('reads recipients and identity files in age format', async () => {
    const rf = join(dir, 'recipients.txt');
    writeFileSync(rf, `# fleet\n\n${a.recipient}\n  ${b.recipient}  \n# end\n`);
    assert.deepEqual(await readRecipientsFile(rf), [a.recipient, b.recipient]);
    const idf = join(dir, 'key.txt');
    writeFileSync(idf, `# created: 2024-01-01T00:00:00Z\n# public key: ${a.recipient}\n${a.identity}\n`);
    assert.deepEqual(await readIdentityFile(idf), [a.identity]);
    writeFileSync(join(dir, 'empty.txt'), '# nothing\n');
    await assert.rejects(readRecipientsFile(join(dir, 'empty.txt')), (e: unknown) => isScError(e, 'SC_ERR_BAD_CONFIG'));
    await assert.rejects(readRecipientsFile(join(dir, 'missing.txt')), (e: unknown) => isScError(e, 'SC_ERR_BAD_CONFIG'));
    writeFileSync(join(dir, 'bad.txt'), `${a.recipient}\nnot-a-key\n`);
    await assert.rejects(readRecipientsFile(join(dir, 'bad.txt')), (e: unknown) => isScError(e, 'SC_ERR_BAD_KEY'));
  });
});
