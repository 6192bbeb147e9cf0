/**
 * Control talks only to the stages its own configuration names. A host registration that names
 * another stage URL (here an attacker's server that records every request) is shown as reported
 * by the host, but control never contacts it: not while the API's colo view is read, not during
 * a rollout's preheat, and never with its stage token. The configured stage gets its prefetch.
 */
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { RunningControl } from '../../services/control/main.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import { silentLogger } from '../../shared/log.js';
import { type ControlFixture, controlFixture, until } from './control-fixture.js';

describe('control contacts only configured stages', () => {
  let f: ControlFixture;
  let c: RunningControl;
  let stage: RunningStage;
  let attacker: Server;
  let attackerUrl: string;
  const hits: { method?: string; url?: string; headers: IncomingHttpHeaders }[] = [];
  const stageToken = 'configured-stage-token';

  before(async () => {
    attacker = createServer((req, res) => {
      hits.push({ method: req.method, url: req.url, headers: req.headers });
      req.resume();
      res.writeHead(200, { 'content-type': 'application/json' }).end('{"fills":[],"accepted":[]}');
    });
    await new Promise<void>((r) => attacker.listen(0, '127.0.0.1', r));
    attackerUrl = `http://127.0.0.1:${(attacker.address() as AddressInfo).port}`;

    f = await controlFixture();
    writeFileSync(join(f.dir, 'stage-token'), `${stageToken}\n`);
    mkdirSync(join(f.dir, 'stage-cache'));
    stage = await startStage(
      { listen: '127.0.0.1:0', upstreams: [f.origin.url], cache: join(f.dir, 'stage-cache'), colo: 'east', token: stageToken, logLevel: 'silent' },
      { log: silentLogger },
    );
    await f.register('h1', 'east', { stages: [`${attackerUrl}/`, stage.url] });
    await f.register('h2', 'east', { stages: [attackerUrl] });
    await f.register('h3', 'west', { stages: [attackerUrl] });
    c = await f.start({ stages: [`east=${stage.url}`], stageTokenFile: join(f.dir, 'stage-token') });
  });
  after(async () => {
    await f?.cleanup();
    await stage?.close();
    attacker?.closeAllConnections();
    await new Promise((r) => attacker?.close(r));
  });

  it('shows registered stage URLs as reported by hosts without contacting them', async () => {
    const colos = (await f.call(c.url, 'GET', '/v1/colos')).body.colos;
    const east = colos.find((x: { colo: string }) => x.colo === 'east');
    const west = colos.find((x: { colo: string }) => x.colo === 'west');
    assert.deepEqual(
      east.stages.map((s: { url: string; source: string[]; ok: boolean }) => [s.url, s.source, s.ok]),
      [[stage.url, ['flag', 'agents'], true]],
    );
    assert.deepEqual(east.reportedStages, [{ url: attackerUrl, hosts: 2 }]);
    assert.deepEqual(west.stages, []);
    assert.deepEqual(west.reportedStages, [{ url: attackerUrl, hosts: 1 }]);
    const h1 = (await f.call(c.url, 'GET', '/v1/hosts/h1')).body;
    assert.deepEqual(h1.stages, [`${attackerUrl}/`, stage.url], 'the host record still shows what the host registered');
    assert.equal(hits.length, 0, `the attacker was contacted: ${JSON.stringify(hits.map((h) => `${h.method} ${h.url}`))}`);
  });

  it('preheats only the configured stage, with the token; the registered URL gets no request', async () => {
    const r = await f.call(c.url, 'POST', '/v1/rollouts', {
      token: f.tokens.ops,
      body: { base: 'rescue@1.0', target: 'debian@12.1', colos: ['east', 'west'], plan: { maxInFlight: 1 } },
    });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    const rid = r.body.spec.id;
    // One wave holds every host: both colos preheat at once.
    const v = await until('preheat of east and west', async () => {
      const x = (await f.call(c.url, 'GET', `/v1/rollouts/${rid}`)).body;
      return x.preheat.east?.state === 'done' && x.preheat.west ? x : null;
    });
    // West's hosts name only the attacker's URL: west has no stage to preheat.
    assert.equal(v.preheat.west.state, 'skipped');
    assert.deepEqual(v.preheat.west.stages, []);
    assert.deepEqual(
      v.preheat.east.stages.map((s: { url: string }) => s.url),
      [stage.url],
    );
    // The stage refuses prefetch without its token (403): committed fills prove it was sent.
    const fills = stage.fills();
    for (const d of [f.base.blob.digest, f.target.blob.digest]) assert.ok(fills.some((x) => x.digest === d && x.state === 'committed'), d);
    // Read the colo view again (stage cache expired) while the engine keeps ticking.
    await new Promise((res) => setTimeout(res, 2100));
    await f.call(c.url, 'GET', '/v1/colos');
    assert.equal(hits.length, 0, `the attacker was contacted: ${JSON.stringify(hits.map((h) => `${h.method} ${h.url} auth=${Boolean(h.headers.authorization)}`))}`);
  });
});
