// The read API contract (shared/http/read-api.ts): one table of requests, run against a real
// origin and a real stage in front of it, cold (every blob a miss: the fill path) and warm
// (every blob a cache hit). Each answer must match origin's in status, error code and headers.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { sha256Of } from '../../shared/digest.js';
import { silentLogger } from '../../shared/log.js';
import { canonicalJson } from '../../shared/manifest.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import type { TestOrigin } from '../helpers/origin.js';
import { waitFor } from '../helpers/test-origin.js';
import { type Answer, type ContractOrigin, checkAnswer, type Fixture, ROWS, type Row, send, startContractOrigin } from '../helpers/read-api-rows.js';

describe('read API contract: origin and stage answer alike', () => {
  let origin: TestOrigin;
  let stage: RunningStage;
  let dir: string;
  let c: ContractOrigin;
  const fixture = (i: number): Fixture => c.fixture(i);

  before(async () => {
    c = await startContractOrigin(64 * 1024);
    origin = c.origin;
    dir = await mkdtemp(join(tmpdir(), 'read-api-contract-'));
    stage = await startStage(
      { listen: '127.0.0.1:0', upstreams: [origin.url], cache: join(dir, 'cache'), cacheSize: '64MiB', colo: 'contract' },
      { log: silentLogger },
    );
  });

  after(async () => {
    await stage?.close();
    await origin?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  /** Checks one answer against the row and against origin's answer to the same request. */
  function check(row: Row, i: number, tier: 'origin' | 'stage', a: Answer): void {
    checkAnswer(row, fixture(i), tier, a, c.answers.get(row.name)!);
  }

  it('origin answers every row as the contract says', () => {
    for (const [i, row] of ROWS.entries()) check(row, i, 'origin', c.answers.get(row.name)!);
  });

  for (const pass of ['cold', 'warm'] as const) {
    it(`a ${pass} stage answers every row as origin does`, async () => {
      if (pass === 'warm') {
        await waitFor(() => stage.fills().every((x) => x.state !== 'filling'), 20_000, 'the fills to finish');
        const cold = stage.fills().filter((x) => x.state === 'committed').length;
        assert.ok(cold >= 10, `the cold pass filled the row blobs (${cold} committed)`);
      }
      for (const [i, row] of ROWS.entries()) {
        const f = fixture(i);
        check(row, i, 'stage', await send(stage.url, row.path(f), row.method, row.headers?.(f)));
      }
    });
  }

  it('the listing and the manifest carry the same content on both', async () => {
    const [o, s] = await Promise.all([send(origin.url, '/v1/bundles'), send(stage.url, '/v1/bundles')]);
    assert.deepEqual(JSON.parse(s.body.toString()), JSON.parse(o.body.toString()));
    assert.equal((JSON.parse(o.body.toString()) as unknown[]).length, 1);
    assert.equal(c.answers.get('manifest')!.headers.etag, `"${sha256Of(canonicalJson(c.fixture(0).manifest))}"`);
  });

  it('a 1 MB header gets 431 SC_ERR_HEADER_TOO_LARGE with a JSON body from both', async () => {
    for (const base of [origin.url, stage.url]) {
      const reply = await new Promise<string>((resolve, reject) => {
        const s = connect(Number(new URL(base).port), '127.0.0.1');
        let got = '';
        s.on('data', (c) => {
          got += c.toString();
        });
        s.on('close', () => resolve(got));
        s.on('error', (err: NodeJS.ErrnoException) => (err.code === 'ECONNRESET' || err.code === 'EPIPE' ? resolve(got) : reject(err)));
        s.write(`GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(1024 * 1024)}\r\n\r\n`);
      });
      assert.match(reply, /^HTTP\/1\.1 431 /, base);
      assert.match(reply, /"code":"SC_ERR_HEADER_TOO_LARGE"/, base);
      assert.equal((await send(base, '/healthz')).status, 200, base);
    }
  });
});
