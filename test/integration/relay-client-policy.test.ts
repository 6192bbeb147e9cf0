/**
 * The agent's relay client on misbehaving relays (stand-in HTTP servers on port 0, as in
 * relay-reply-limit.test.ts; the real relay is exercised in relay.test.ts): failover to the next
 * relay on a connection failure, SC_ERR_TLS for a TLS failure, SC_ERR_TIMEOUT for a silent relay
 * (no failover), and the report retry policy (transient codes retried with backoff for up to
 * retryMs, others thrown at once).
 */
import assert from 'node:assert/strict';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, describe, it } from 'node:test';
import { RelayTransport } from '../../services/relay/client.js';
import { isScError, type ScError } from '../../shared/errors.js';
import { silentLogger } from '../../shared/log.js';
import type { ReportFields, StepJob } from '../../shared/protocol/transport.js';

interface StandIn {
  url: string;
  port: number;
  /** `METHOD path` and arrival time (ms) of every request. */
  hits: { line: string; at: number }[];
}

const servers: Server[] = [];

async function standIn(answer: (req: IncomingMessage, res: ServerResponse, n: number) => void): Promise<StandIn> {
  const hits: StandIn['hits'] = [];
  const server = createServer((req, res) => {
    hits.push({ line: `${req.method} ${req.url}`, at: Date.now() });
    req.resume();
    req.on('end', () => answer(req, res, hits.length));
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as AddressInfo).port;
  return { url: `http://127.0.0.1:${port}`, port, hits };
}

/** A port nothing listens on. */
async function deadPort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

const json = (res: ServerResponse, status: number, body: unknown) => {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) }).end(text);
};

const client = (relays: string[], extra: { retryMs?: number; waitSec?: number } = {}) =>
  new RelayTransport({ hostId: 'h1', relays, token: 'relay-token', logger: silentLogger, waitSec: 1, ...extra });

const job = { id: 'job-1' } as StepJob;
const report = { event: 'done' } as unknown as ReportFields;

describe('relay client failures and retries', () => {
  after(async () => {
    for (const s of servers) {
      s.closeAllConnections();
      await new Promise((r) => s.close(r));
    }
  });

  it('moves on to the next relay after a refused connection (SC_ERR_UNAVAILABLE), sending the same wire', async () => {
    const good = await standIn((req, res) => {
      assert.equal(req.headers.authorization, 'Bearer relay-token');
      assert.equal(req.headers['x-stagecoach-host'], 'h1');
      json(res, 200, { job: { id: 'j1' } });
    });
    const t = client([`http://127.0.0.1:${await deadPort()}`, good.url]);
    await assert.rejects(t.next(), (e) => isScError(e, 'SC_ERR_UNAVAILABLE') && /ECONNREFUSED/.test((e as ScError).message));
    assert.equal((await t.next())?.id, 'j1');
    assert.deepEqual(
      good.hits.map((h) => h.line),
      ['GET /v1/relay/hosts/h1/next?wait=1'],
    );
  });

  it('fails with SC_ERR_TLS when the relay does not speak TLS, and moves on', async () => {
    const plain = await standIn((_req, res) => json(res, 200, { job: { id: 'j1' } }));
    const t = client([`https://127.0.0.1:${plain.port}`, plain.url]);
    await assert.rejects(t.next(), (e) => isScError(e, 'SC_ERR_TLS'));
    assert.equal((await t.next())?.id, 'j1');
    // A report retried after a TLS failure reaches the next relay, as after any connection failure.
    await client([`https://127.0.0.1:${plain.port}`, plain.url]).complete(job, {}, report);
    assert.equal(plain.hits.at(-1)?.line, 'POST /v1/relay/jobs/job-1/complete');
  });

  it('fails a silent relay with SC_ERR_TIMEOUT and does not move on', async () => {
    let calls = 0;
    const silent = await standIn((_req, res) => {
      calls++;
      if (calls > 1) res.writeHead(204).end(); // the second poll is answered
    });
    const other = await standIn((_req, res) => res.writeHead(204).end());
    const t = client([silent.url, other.url], { waitSec: 0 }); // the poll's socket timeout is then 15 s
    const t0 = Date.now();
    await assert.rejects(t.next(), (e) => isScError(e, 'SC_ERR_TIMEOUT'));
    assert.ok(Date.now() - t0 >= 14_000, `timed out after ${Date.now() - t0} ms`);
    assert.equal(await t.next(), undefined);
    assert.equal(silent.hits.length, 2);
    assert.equal(other.hits.length, 0);
  });

  it('retries a completion while the relay answers 5xx, with a growing delay', async () => {
    const r = await standIn((_req, res, n) => (n <= 2 ? json(res, 503, { error: { code: 'SC_ERR_UNAVAILABLE', message: 'busy' } }) : res.writeHead(204).end()));
    await client([r.url]).complete(job, { ok: true }, report);
    assert.equal(r.hits.length, 3);
    assert.equal(r.hits[0].line, 'POST /v1/relay/jobs/job-1/complete');
    const gaps = [r.hits[1].at - r.hits[0].at, r.hits[2].at - r.hits[1].at];
    assert.ok(gaps[0] >= 200 && gaps[0] < 1000, `first delay ${gaps[0]} ms`);
    assert.ok(gaps[1] >= 400 && gaps[1] < 2000, `second delay ${gaps[1]} ms`);
  });

  it('does not retry a refused report (4xx), and gives up on 5xx after retryMs', async () => {
    const refusing = await standIn((_req, res) => json(res, 400, { error: { code: 'SC_ERR_BAD_REQUEST', message: 'no' } }));
    await assert.rejects(client([refusing.url]).complete(job, {}, report), (e) => isScError(e, 'SC_ERR_BAD_REQUEST'));
    assert.equal(refusing.hits.length, 1);

    const down = await standIn((_req, res) => json(res, 502, {}));
    const t0 = Date.now();
    await assert.rejects(client([down.url], { retryMs: 1000 }).complete(job, {}, report), (e) => isScError(e, 'SC_ERR_UPSTREAM'));
    const took = Date.now() - t0;
    assert.ok(took >= 900 && took < 3000, `gave up after ${took} ms`);
    // 250 + 500 + (what is left of 1000 ms): three or four attempts.
    assert.ok(down.hits.length >= 3 && down.hits.length <= 4, `${down.hits.length} attempts`);
  });

  it("returns the relay's retry flag from fail(), and false once the relay stays unreachable", async () => {
    const r = await standIn((_req, res, n) => (n === 1 ? json(res, 503, {}) : json(res, 200, { retry: true })));
    const e = { code: 'SC_ERR_UPSTREAM', message: 'x' } as ScError;
    assert.equal(await client([r.url]).fail(job, e, false, report), true);
    assert.equal(r.hits.length, 2);
    assert.equal(await client([`http://127.0.0.1:${await deadPort()}`], { retryMs: 300 }).fail(job, e, false, report), false);
  });
});
