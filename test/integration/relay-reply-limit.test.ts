/**
 * The agent's relay client caps reply bodies (MAX_RELAY_REPLY_BYTES): a relay that answers with a
 * huge body, declared or chunked, fails the request with SC_ERR_REPLY_TOO_LARGE instead of being
 * buffered, and the next request goes to the next relay.
 */
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, describe, it } from 'node:test';
import { MAX_RELAY_REPLY_BYTES, RelayTransport } from '../../services/relay/client.js';
import { isScError } from '../../shared/errors.js';
import { silentLogger } from '../../shared/log.js';

const MiB = 1024 * 1024;

interface TestRelay {
  url: string;
  hits: string[];
  server: Server;
}

/** A relay stand-in on port 0; `mode` says how it answers every request. */
async function relayServer(mode: 'huge-declared' | 'huge-chunked' | 'job' | 'empty'): Promise<TestRelay> {
  const hits: string[] = [];
  const server = createServer((req, res) => {
    hits.push(`${req.method} ${req.url}`);
    req.resume();
    if (mode === 'empty') {
      res.writeHead(204).end();
      return;
    }
    if (mode === 'job') {
      const body = JSON.stringify({ job: { id: 'j1', pad: 'x'.repeat(100_000) } });
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }).end(body);
      return;
    }
    const chunk = Buffer.alloc(64 * 1024, 0x20);
    const total = 5 * MiB;
    res.writeHead(200, { 'content-type': 'application/json', ...(mode === 'huge-declared' ? { 'content-length': String(total) } : {}) });
    res.write('{"job":{"id":"j1","pad":"');
    let sent = 0;
    const pump = () => {
      while (sent < total - 100 && !res.destroyed) {
        sent += chunk.length;
        if (!res.write(chunk)) {
          res.once('drain', pump);
          return;
        }
      }
      if (!res.destroyed) res.end('"}}');
    };
    pump();
    res.on('error', () => {});
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, hits, server };
}

describe('relay reply size cap', () => {
  const servers: Server[] = [];
  after(async () => {
    for (const s of servers) {
      s.closeAllConnections();
      await new Promise((r) => s.close(r));
    }
  });
  const start = async (mode: Parameters<typeof relayServer>[0]) => {
    const r = await relayServer(mode);
    servers.push(r.server);
    return r;
  };
  const client = (relays: string[]) => new RelayTransport({ hostId: 'h1', relays, token: 'relay-token', logger: silentLogger, waitSec: 1 });

  it('fails a 5 MiB reply with a Content-Length with SC_ERR_REPLY_TOO_LARGE', async () => {
    const r = await start('huge-declared');
    await assert.rejects(client([r.url]).next(), (e) => isScError(e, 'SC_ERR_REPLY_TOO_LARGE'));
    assert.equal(r.hits.length, 1);
  });

  it('fails a chunked 5 MiB reply with SC_ERR_REPLY_TOO_LARGE once it passes the cap', async () => {
    const r = await start('huge-chunked');
    await assert.rejects(client([r.url]).next(), (e) => isScError(e, 'SC_ERR_REPLY_TOO_LARGE'));
    assert.equal(r.hits.length, 1);
  });

  it('moves on to the next relay after an oversize reply, and accepts replies under the cap', async () => {
    const bad = await start('huge-chunked');
    const good = await start('empty');
    const t = client([bad.url, good.url]);
    await assert.rejects(t.next(), (e) => isScError(e, 'SC_ERR_REPLY_TOO_LARGE'));
    assert.equal(await t.next(), undefined);
    assert.equal(good.hits.length, 1);
    const ok = await start('job');
    const job = await client([ok.url]).next();
    assert.equal(job?.id, 'j1');
    assert.ok(MAX_RELAY_REPLY_BYTES >= 100_000);
  });
});
