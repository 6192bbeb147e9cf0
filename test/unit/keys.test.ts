import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { generateKeys, KEY_FILES } from '../../shared/keys.js';
import { decryptStream, encryptStream, parseIdentity, readIdentityFile, readRecipientsFile } from '../../shared/bundle/index.js';
import { isScError } from '../../shared/errors.js';
import { keyId, loadPrivateKey, loadPublicKey, signBytes, verifyBytes } from '../../shared/manifest.js';

const BIN = fileURLToPath(new URL('../../services/cli/bin.js', import.meta.url));

describe('stagecoach keys gen', () => {
  let base: string;
  beforeEach(() => {
    base = mkdtempSync(join(tmpdir(), 'sc-keys-'));
  });
  afterEach(() => rmSync(base, { recursive: true, force: true }));

  it('writes six files with private keys 0600, and every key loads and works', async () => {
    const out = join(base, 'keys');
    const r = await generateKeys(out);
    assert.deepEqual(readdirSync(out).sort(), Object.values(KEY_FILES).sort());
    const mode = (f: string) => statSync(join(out, f)).mode & 0o777;
    for (const f of ['release.key', 'control.key', 'fleet.age']) assert.equal(mode(f), 0o600, f);
    for (const f of ['release.pub', 'control.pub', 'fleet.age.pub']) assert.equal(mode(f), 0o644, f);
    assert.equal(statSync(out).mode & 0o777, 0o700);

    for (const name of ['release', 'control'] as const) {
      const priv = loadPrivateKey(readFileSync(join(out, `${name}.key`)));
      const pub = loadPublicKey(readFileSync(join(out, `${name}.pub`)));
      assert.equal(keyId(pub), r.keyIds[name]);
      assert.ok(verifyBytes(pub, Buffer.from('x'), signBytes(priv, Buffer.from('x'))));
    }
    assert.notEqual(r.keyIds.release, r.keyIds.control);

    const idText = readFileSync(join(out, 'fleet.age'), 'utf8');
    assert.match(idText, /^# created: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n# public key: age1[0-9a-z]{58}\nAGE-SECRET-KEY-1[0-9A-Z]{58}\n$/);
    const [identity] = await readIdentityFile(join(out, 'fleet.age'));
    const [recipient] = await readRecipientsFile(join(out, 'fleet.age.pub'));
    assert.equal(recipient, r.recipient);
    assert.equal(parseIdentity(identity).recipient, recipient);
    const data = randomBytes(70_000);
    const chunks: Buffer[] = [];
    await pipeline(Readable.from([data]), encryptStream([recipient]), decryptStream([identity]), async (s: AsyncIterable<Buffer>) => {
      for await (const c of s) chunks.push(c);
    });
    assert.ok(Buffer.concat(chunks).equals(data));
  });

  it('refuses to overwrite and writes nothing when any one file exists', async () => {
    const out = join(base, 'keys');
    mkdirSync(out);
    writeFileSync(join(out, 'fleet.age.pub'), 'keep me\n');
    await assert.rejects(generateKeys(out), (e: unknown) => isScError(e, 'SC_ERR_FILE_EXISTS'));
    assert.deepEqual(readdirSync(out), ['fleet.age.pub']);
    assert.equal(readFileSync(join(out, 'fleet.age.pub'), 'utf8'), 'keep me\n');
  });

  it('runs as a CLI: --json prints paths and key ids; a second run exits 1 with SC_ERR_FILE_EXISTS', () => {
    const out = join(base, 'cli');
    const first = spawnSync(process.execPath, [BIN, 'keys', 'gen', '--out', out, '--json'], { encoding: 'utf8' });
    assert.equal(first.status, 0, first.stderr);
    const r = JSON.parse(first.stdout);
    assert.equal(r.files.releaseKey, join(out, 'release.key'));
    assert.match(r.keyIds.release, /^[0-9a-f]{16}$/);
    assert.match(r.recipient, /^age1/);
    for (const p of Object.values(r.files) as string[]) assert.ok(existsSync(p));
    const before = readFileSync(join(out, 'release.key'));
    const second = spawnSync(process.execPath, [BIN, 'keys', 'gen', '--out', out], { encoding: 'utf8' });
    assert.equal(second.status, 1);
    assert.match(second.stderr, /error SC_ERR_FILE_EXISTS/);
    assert.ok(readFileSync(join(out, 'release.key')).equals(before));
  });
});
