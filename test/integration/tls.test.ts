// TLS on the wire: an origin and a stage listening with certificates from `stagecoach tls gen`,
// the stage filling from the origin over TLS, and a host-side `get` through the stage that
// trusts the fleet CA (--ca, or STAGECOACH_CA) and refuses a server signed by another CA.
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { generateTls, type GeneratedTls } from '../../shared/tls-gen.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import type { Digest } from '../../shared/digest.js';
import { isScError } from '../../shared/errors.js';
import { silentLogger } from '../../shared/log.js';
import { loadServerTls, trustCa } from '../../shared/tls.js';
import { cli } from '../helpers/cli.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';
import { makeManifest, pseudoRandom, releaseKey, tempDir, writeBlob } from './fetch-fixture.js';

const SIZE = 1024 * 1024 + 13;
const key = releaseKey();
let dir: string;
let cleanup: () => Promise<void>;
let fleet: GeneratedTls;
let other: GeneratedTls;
let origin: TestOrigin;
let stage: RunningStage;
let data: Buffer;
let pub: string;

before(async () => {
  ({ dir, cleanup } = await tempDir('sc-tls-'));
  fleet = await generateTls(join(dir, 'fleet'), ['localhost', '127.0.0.1']);
  other = await generateTls(join(dir, 'other'), ['localhost', '127.0.0.1']);
  // This process is the stage's client of the origin and the test's client of both.
  trustCa([fleet.ca]);
  origin = await startTestOrigin({ tls: { cert: fleet.cert, key: fleet.key } });
  data = pseudoRandom(SIZE, 5);
  const blob = join(dir, 'blob');
  const digest: Digest = await writeBlob(blob, data);
  await origin.client.putBlob(blob, digest, SIZE);
  await origin.client.putManifest(makeManifest(key.privateKey, { digest, size: SIZE }));
  pub = join(dir, 'release.pub');
  await writeFile(pub, key.publicPem);
  stage = await startStage(
    { listen: '127.0.0.1:0', upstreams: [origin.url], cache: join(dir, 'stage'), colo: 'x', trustKeys: [pub], logLevel: 'silent', tlsCert: fleet.cert, tlsKey: fleet.key, ca: fleet.ca },
    { log: silentLogger },
  );
});
after(async () => {
  await stage?.close();
  await origin?.close();
  await cleanup();
});

test('origin and stage listen with TLS; the stage fills from the origin over TLS', () => {
  assert.match(origin.url, /^https:\/\/127\.0\.0\.1:\d+$/);
  assert.match(stage.url, /^https:\/\/127\.0\.0\.1:\d+$/);
});

test('a host fetches through the TLS stage, trusting the fleet CA given with --ca', async () => {
  const out = join(dir, 'ok.bundle');
  const r = await cli(['get', 'rescue-os@1.0.0', '--from', stage.url, '-o', out, '--trust-key', pub, '--ca', fleet.ca, '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.ok((await readFile(out)).equals(data));
});

test('STAGECOACH_CA trusts the fleet CA for every client of the process', async () => {
  const out = join(dir, 'env.bundle');
  const r = await cli(['get', 'rescue-os@1.0.0', '--from', stage.url, '-o', out, '--trust-key', pub], { env: { ...process.env, STAGECOACH_CA: fleet.ca } });
  assert.equal(r.code, 0, r.stderr);
  assert.ok((await readFile(out)).equals(data));
});

test('a server signed by another CA is refused with SC_ERR_TLS, and nothing is written', async () => {
  for (const extra of [['--ca', other.ca], []]) {
    const out = join(dir, `refused-${extra.length}.bundle`);
    const r = await cli(['get', 'rescue-os@1.0.0', '--from', stage.url, '-o', out, '--trust-key', pub, ...extra], { env: { ...process.env, STAGECOACH_CA: '' } });
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /SC_ERR_TLS/);
    assert.match(r.stderr, /not signed by a trusted CA/);
    assert.equal(existsSync(out), false);
  }
});

test('a server certificate without its key, or with the wrong key, is a config error', () => {
  const code = (f: () => unknown) => {
    try {
      f();
    } catch (err) {
      return isScError(err) ? err.code : String(err);
    }
    return 'no error';
  };
  assert.equal(code(() => loadServerTls({ tlsCert: fleet.cert })), 'SC_ERR_BAD_CONFIG');
  assert.equal(code(() => loadServerTls({ tlsCert: fleet.cert, tlsKey: other.key })), 'SC_ERR_BAD_CONFIG');
  assert.equal(code(() => loadServerTls({ tlsCert: fleet.key, tlsKey: fleet.key })), 'SC_ERR_BAD_CONFIG');
  assert.equal(code(() => trustCa([fleet.cert])), 'SC_ERR_BAD_CONFIG', 'a server certificate is not a CA');
  assert.ok(loadServerTls({ tlsCert: fleet.cert, tlsKey: fleet.key }));
});
