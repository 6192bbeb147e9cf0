/**
 * The origin's blob size cap (maxBlobSize): a PUT that declares more is refused before its body
 * is read, a chunked one is cut off once it passes the cap, and in both cases nothing is stored
 * and no temp file is left.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { request } from 'node:http';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { loadOriginConfig } from '../../services/origin/config.js';
import { sha256Of } from '../../shared/digest.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';
import { filesUnder } from '../helpers/tree.js';

const MiB = 1024 * 1024;


/**
 * A PUT that sends `headers`, then (when `chunks` is given) writes chunks until the server
 * answers. Resolves with the answer; fails after 10 s without one.
 */
function put(base: string, path: string, headers: Record<string, string>, chunks?: () => Buffer | null): Promise<{ status: number; body: string; sent: number }> {
  const u = new URL(base);
  return new Promise((resolve, reject) => {
    let answered = false;
    let sent = 0;
    const timer = setTimeout(() => {
      req.destroy();
      reject(new Error('no answer within 10 s'));
    }, 10_000);
    const req = request({ host: u.hostname, port: u.port, path, method: 'PUT', headers, agent: false }, (res) => {
      answered = true;
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => {
        body += c;
      });
      res.on('end', () => {
        clearTimeout(timer);
        resolve({ status: res.statusCode ?? 0, body, sent });
      });
    });
    req.on('error', (err) => {
      if (!answered) {
        clearTimeout(timer);
        reject(err);
      }
    });
    if (!chunks) {
      req.flushHeaders(); // headers only: the body never comes
      return;
    }
    const pump = () => {
      while (!answered && !req.destroyed) {
        const c = chunks();
        if (!c) {
          req.end();
          return;
        }
        sent += c.length;
        if (!req.write(c)) {
          req.once('drain', pump);
          return;
        }
      }
    };
    pump();
  });
}

describe('origin blob size cap', () => {
  let o: TestOrigin;
  before(async () => {
    o = await startTestOrigin({ maxBlobSize: '1MiB' });
  });
  after(async () => {
    await o.close();
  });

  const stored = () => ({ blobs: filesUnder(join(o.dataDir, 'blobs')), tmp: filesUnder(join(o.dataDir, 'tmp')) });

  it('refuses a PUT whose Content-Length is over the cap before reading its body (413)', async () => {
    const d = sha256Of(randomBytes(16));
    // Only headers are sent: an answer proves the body was not waited for.
    const r = await put(o.url, `/v1/blobs/${d}`, { authorization: `Bearer ${o.token}`, 'content-length': String(2 * MiB) });
    assert.equal(r.status, 413);
    assert.equal(JSON.parse(r.body).error.code, 'SC_ERR_TOO_LARGE');
    assert.deepEqual(stored(), { blobs: [], tmp: [] });
  });

  it('cuts off a chunked PUT once it passes the cap (413), storing nothing', async () => {
    // 64 MiB offered in 64 KiB chunks: far more than the socket buffers between client and server
    // can hold, so the client can only get that far if the origin keeps reading past its cap.
    const chunk = randomBytes(64 * 1024);
    const total = 64 * MiB;
    const d = sha256Of(chunk);
    let off = 0;
    const r = await put(o.url, `/v1/blobs/${d}`, { authorization: `Bearer ${o.token}` }, () => {
      if (off >= total) return null;
      off += chunk.length;
      return chunk;
    });
    assert.equal(r.status, 413);
    assert.equal(JSON.parse(r.body).error.code, 'SC_ERR_TOO_LARGE');
    assert.ok(r.sent < total, `the upload was cut off (${r.sent} of ${total} bytes sent)`);
    assert.deepEqual(stored(), { blobs: [], tmp: [] });
    await assert.rejects(o.store.statBlob(d), (e: Error & { code?: string }) => e.code === 'SC_ERR_BLOB_NOT_FOUND');
  });

  it('still accepts blobs up to the cap, chunked or not', async () => {
    const data = randomBytes(MiB);
    const r = await o.client.putBlob(Readable.from([data]), sha256Of(data), data.length);
    assert.equal(r.created, true);
    const small = randomBytes(1000);
    const queue: Buffer[] = [small];
    const c = await put(o.url, `/v1/blobs/${sha256Of(small)}`, { authorization: `Bearer ${o.token}` }, () => queue.shift() ?? null);
    assert.equal(c.status, 201);
    assert.equal(stored().tmp.length, 0);
  });

  it('reads maxBlobSize as a size from flags, env and file (default 64 GiB)', () => {
    const base = { data: '/tmp/x', tokenFile: '/tmp/t' };
    assert.equal(loadOriginConfig({ flags: base, env: {} }).maxBlobSize, 64 * 1024 ** 3);
    assert.equal(loadOriginConfig({ flags: base, env: { STAGECOACH_ORIGIN_MAX_BLOB_SIZE: '20GiB' } }).maxBlobSize, 20 * 1024 ** 3);
    assert.equal(loadOriginConfig({ flags: { ...base, maxBlobSize: '512MiB' }, env: {} }).maxBlobSize, 512 * MiB);
    assert.throws(() => loadOriginConfig({ flags: { ...base, maxBlobSize: 'lots' }, env: {} }), (e: Error & { code?: string }) => e.code === 'SC_ERR_BAD_CONFIG');
  });
});
