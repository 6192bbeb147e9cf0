// The host's stall checks (fetchBlob's `stallCheckMs`): a /healthz probe that times out means
// busy, not down. A source that answers nothing and delivers nothing is left when the idle timeout
// ends its request, like any stalled source (asked again next pass; origin joins once `retries` + 1
// passes made no progress); a source that delivers bytes is kept however slow its /healthz; a
// /healthz that answers 5xx still makes the host leave at once. Real HTTP servers on 127.0.0.1
// port 0 (fetch-fixture.ts); no wall-clock assertions (timing goals live in loadtest/).
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, test } from 'node:test';
import type { Digest } from '../../shared/digest.js';
import { fetchBlob } from '../../shared/fetch.js';
import { countingSleep, pseudoRandom, rangeStart, type ReadServer, startReadServer, tempDir, writeBlob } from './fetch-fixture.js';

const SIZE = 3 * 1024 * 1024 + 4321;
/** A /healthz that never answers within any probe deadline used here. */
const HANG = 3_600_000;
let dir: string;
let cleanup: () => Promise<void>;
let data: Buffer;
let digest: Digest;
let blobPath: string;
const servers: ReadServer[] = [];

async function server(faults = {}): Promise<ReadServer> {
  const s = await startReadServer(faults);
  await s.addBlob(blobPath);
  servers.push(s);
  return s;
}

beforeEach(async () => {
  ({ dir, cleanup } = await tempDir('sc-fetch-stall-'));
  data = pseudoRandom(SIZE, 11);
  blobPath = join(dir, 'src.blob');
  digest = await writeBlob(blobPath, data);
});
afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => s.close()));
  await cleanup();
});

test('a stage that freezes mid-body and whose /healthz hangs is left at the idle timeout, and origin serves the rest after the retry passes', async () => {
  const stage = await server({ freezeAfter: 700_000, healthDelayMs: HANG });
  const origin = await server();
  const out = join(dir, 'out.bin');
  const backoff = countingSleep();
  const r = await fetchBlob({
    sources: [stage.url],
    origin: origin.url,
    digest,
    size: SIZE,
    out,
    idleTimeoutMs: 1500,
    stallCheckMs: 200,
    probeTimeoutMs: 300,
    retries: 1,
    sleep: backoff.sleep,
    // Only a bound for a broken build: each request to the frozen stage must end at its idle timeout.
    signal: AbortSignal.timeout(120_000),
  });
  assert.ok((await readFile(out)).equals(data), 'byte-identical');
  assert.ok(stage.frozen, 'the stage froze mid-body');
  assert.deepEqual(r.sources, [stage.url, origin.url], 'the stage bytes are kept, origin served the rest');
  // The pass with the first bytes, then 1 + retries passes without progress (its timed-out
  // checks never made the host leave early: busy is not down).
  assert.equal(stage.blobRequests.length, 3);
  assert.equal(backoff.calls, 1, 'one backoff, before the one extra pass');
  assert.equal(origin.blobRequests.length, 1, 'origin was asked once, for the rest');
  assert.ok(rangeStart(origin.blobRequests[0]) > 0, 'with Range');
});

test('a stage that freezes before sending anything and whose /healthz hangs is left at the idle timeout, and origin serves the blob after the retry passes', async () => {
  const stage = await server({ freezeAfter: 0, healthDelayMs: HANG });
  const origin = await server();
  const out = join(dir, 'out.bin');
  const backoff = countingSleep();
  const r = await fetchBlob({
    sources: [stage.url],
    origin: origin.url,
    digest,
    size: SIZE,
    out,
    idleTimeoutMs: 1000,
    stallCheckMs: 200,
    probeTimeoutMs: 300,
    retries: 1,
    sleep: backoff.sleep,
    signal: AbortSignal.timeout(120_000),
  });
  assert.ok((await readFile(out)).equals(data));
  assert.deepEqual(r.sources, [origin.url]);
  assert.equal(stage.blobRequests.length, 2, '1 + retries passes without progress');
  assert.equal(backoff.calls, 1);
  assert.equal(origin.blobRequests.length, 1);
});

test('busy is not down: a stage that keeps delivering bytes is kept although its /healthz probes time out', async () => {
  // 4 pieces with gaps of 600 ms: every gap outlasts stallCheckMs, and the probe it triggers times out.
  const stage = await server({ trickle: { bytes: Math.ceil(SIZE / 4), everyMs: 600 }, healthDelayMs: HANG });
  const origin = await server();
  const out = join(dir, 'out.bin');
  const r = await fetchBlob({
    sources: [stage.url],
    origin: origin.url,
    digest,
    size: SIZE,
    out,
    idleTimeoutMs: 30_000,
    stallCheckMs: 100,
    probeTimeoutMs: 100,
    signal: AbortSignal.timeout(120_000),
  });
  assert.ok((await readFile(out)).equals(data));
  assert.deepEqual(r.sources, [stage.url], 'the stage served everything');
  assert.equal(stage.blobRequests.length, 1, 'in one request');
  assert.equal(origin.blobRequests.length, 0, 'origin was not asked');
});

test('a stage whose /healthz answers 503 during a silence is still left at once', async () => {
  const stage = await server({ stallAfter: 500_000, healthStatus: 503 });
  const origin = await server();
  const out = join(dir, 'out.bin');
  const backoff = countingSleep();
  const r = await fetchBlob({
    sources: [stage.url],
    origin: origin.url,
    digest,
    size: SIZE,
    out,
    // Far beyond the test's bound: completing proves the stage was left on its /healthz answer.
    idleTimeoutMs: 600_000,
    stallCheckMs: 200,
    probeTimeoutMs: 1000,
    sleep: backoff.sleep,
    signal: AbortSignal.timeout(120_000),
  });
  assert.ok((await readFile(out)).equals(data));
  assert.deepEqual(r.sources, [stage.url, origin.url]);
  assert.equal(stage.blobRequests.length, 1);
  assert.equal(backoff.calls, 0);
});
