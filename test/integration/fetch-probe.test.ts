import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { probeSources, selectSources } from '../../shared/fetch.js';
import { deadPort, type ReadServer, startReadServer } from './fetch-fixture.js';

let fast: ReadServer;
let slow: ReadServer;
let sick: ReadServer;
let origin: ReadServer;
let hung: ReadServer;
let dead: string;

before(async () => {
  fast = await startReadServer();
  slow = await startReadServer({ healthDelayMs: 300 });
  sick = await startReadServer({ healthStatus: 500 });
  origin = await startReadServer();
  hung = await startReadServer({ healthDelayMs: 600_000 });
  dead = `http://127.0.0.1:${await deadPort()}`;
});
after(async () => {
  await Promise.all([fast, slow, sick, origin, hung].map((s) => s.close()));
});

test('probe: healthy by RTT, then unhealthy, then unreachable', async () => {
  const r = await probeSources([dead, sick.url, slow.url, fast.url]);
  assert.deepEqual(
    r.map((p) => p.url),
    [fast.url, slow.url, sick.url, dead],
  );
  assert.deepEqual(
    r.map((p) => p.healthy),
    [true, true, false, false],
  );
  assert.equal(r[2].reachable, true);
  assert.equal(r[2].status, 500);
  assert.equal(r[3].reachable, false);
  assert.ok(r[3].error);
});

test('probe: duplicates and trailing slashes collapse', async () => {
  const r = await probeSources([`${fast.url}/`, fast.url]);
  assert.deepEqual(
    r.map((p) => p.url),
    [fast.url],
  );
});

test('probe: a source that does not answer within the timeout counts as unreachable', async () => {
  const r = await probeSources([hung.url, fast.url], { timeoutMs: 500 });
  assert.deepEqual(
    r.map((p) => [p.url, p.healthy, p.reachable]),
    [
      [fast.url, true, true],
      [hung.url, false, false],
    ],
  );
});

test('select: dead stage skipped, origin last', async () => {
  const { sources, probes } = await selectSources([dead, sick.url, slow.url, fast.url], { origin: origin.url });
  assert.deepEqual(sources, [fast.url, slow.url, sick.url, origin.url]);
  assert.equal(probes.length, 4);
  assert.ok(!probes.some((p) => p.url === origin.url), 'origin is not probed');
});

test('select: when every stage is unreachable they are still returned as a last resort', async () => {
  const { sources } = await selectSources([dead]);
  assert.deepEqual(sources, [dead]);
  const withOrigin = await selectSources([dead], { origin: origin.url });
  assert.deepEqual(withOrigin.sources, [origin.url]);
});

test('select: malformed URLs are refused with a code', async () => {
  await assert.rejects(selectSources(['ftp://x']), { code: 'SC_ERR_BAD_CONFIG' });
  await assert.rejects(selectSources(['not a url']), { code: 'SC_ERR_BAD_CONFIG' });
});
