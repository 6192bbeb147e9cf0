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
  assert.equal(r[1].slow, true, 'a timeout is slow, not refused');
});

test('select: a refusing stage is skipped, a busy one kept after the answering ones, origin last', async () => {
  const r = await selectSources([dead, hung.url, sick.url, slow.url, fast.url], { origin: origin.url, timeoutMs: 500 });
  assert.deepEqual(r.sources, [fast.url, slow.url, sick.url, hung.url, origin.url]);
  assert.deepEqual(r.stages, [fast.url, slow.url, sick.url, hung.url], 'the blob candidates: no origin');
  assert.equal(r.origin, origin.url);
  assert.equal(r.probes.length, 5);
  assert.ok(!r.probes.some((p) => p.url === origin.url), 'origin is not probed');
  assert.equal(r.probes.find((p) => p.url === dead)?.slow, undefined, 'refused is not slow');
});

test('select: when every stage is unreachable they are still returned as a last resort', async () => {
  const { sources } = await selectSources([dead]);
  assert.deepEqual(sources, [dead]);
  const withOrigin = await selectSources([dead], { origin: origin.url });
  assert.deepEqual(withOrigin.sources, [origin.url]);
  assert.deepEqual(withOrigin.stages, []);
});

test('select: malformed URLs are refused with a code', async () => {
  await assert.rejects(selectSources(['ftp://x']), { code: 'SC_ERR_BAD_CONFIG' });
  await assert.rejects(selectSources(['not a url']), { code: 'SC_ERR_BAD_CONFIG' });
});
