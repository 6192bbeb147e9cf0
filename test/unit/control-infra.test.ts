/**
 * The deployment files in infra/ stay valid: every example YAML config passes its service's
 * config schema, and every systemd unit restarts always and starts after the network.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { describe, it } from 'node:test';
import { loadAgentConfig } from '../../services/agent/config.js';
import { loadControlConfig, parseStagesFlag } from '../../services/control/config.js';
import { loadOriginConfig } from '../../services/origin/config.js';
import { loadStageConfig } from '../../services/stage/config.js';
import { renderNginxSite } from '../../services/stage/accel.js';

describe('infra examples', () => {
  it('example configs validate against the service schemas', () => {
    const o = loadOriginConfig({ file: 'infra/config/origin.yaml', env: {} });
    const s = loadStageConfig({ file: 'infra/config/stage.yaml', env: {} });
    assert.equal(s.colo, 'ams1');
    const a = loadAgentConfig({ file: 'infra/config/agent.yaml', env: {} });
    assert.equal(a.machine, 'linux');
    const c = loadControlConfig({ file: 'infra/config/control.yaml', env: {} });
    assert.equal(c.prefix, 'stagecoach');
    assert.deepEqual(parseStagesFlag(c.stages).get('ams1')?.length, 2);
    // Loopback by default, TLS configured, and every URL a client is given is https.
    for (const x of [o, s, c]) {
      assert.match(x.listen, /^127\.0\.0\.1:/);
      assert.ok(x.tlsCert && x.tlsKey);
    }
    for (const u of [...s.upstreams, a.origin ?? '', ...a.stages, c.origin, ...c.stages.map((x) => x.slice(x.indexOf('=') + 1))]) assert.match(u, /^https:\/\//);
    for (const x of [s, a, c]) assert.ok(x.ca);
  });

  it('control config: env overrides file, flags override env, unknown keys are refused', () => {
    const c = loadControlConfig({ file: 'infra/config/control.yaml', env: { STAGECOACH_CONTROL_TICK_MS: '200' }, flags: { listen: '127.0.0.1:9' } });
    assert.equal(c.tickMs, 200);
    assert.equal(c.listen, '127.0.0.1:9');
    assert.throws(() => loadControlConfig({ env: {}, flags: { redis: 'redis://x', origin: 'http://o', tokenFile: 't', signingKey: 'k', surprise: 1 } }), /surprise/);
    assert.throws(() => loadControlConfig({ env: {}, flags: { redis: 'http://x', origin: 'http://o', tokenFile: 't', signingKey: 'k' } }), /redis/);
  });

  it('the example nginx site is what `stage --nginx-conf` prints for the example stage', () => {
    const s = loadStageConfig({ file: 'infra/config/stage.yaml', env: {}, flags: { accelRedirect: '/_stagecoach' } });
    assert.equal(readFileSync('infra/nginx/stagecoach-stage.conf', 'utf8'), renderNginxSite(s, { front: '0.0.0.0:7443' }));
  });

  it('systemd units restart always and wait for the network', () => {
    const units = readdirSync('infra/systemd').filter((f) => f.endsWith('.service'));
    assert.deepEqual(units.sort(), ['stagecoach-agent.service', 'stagecoach-control.service', 'stagecoach-origin.service', 'stagecoach-stage.service']);
    for (const u of units) {
      const t = readFileSync(`infra/systemd/${u}`, 'utf8');
      assert.match(t, /^Restart=always$/m, u);
      assert.match(t, /^After=network-online\.target/m, u);
      assert.match(t, /^WantedBy=multi-user\.target$/m, u);
      const cmd = /^ExecStart=(.*)$/m.exec(t)![1];
      // Production runs the compiled JavaScript of the runtime directory (see README, "The agent on a real host").
      assert.match(cmd, new RegExp(`^/opt/stagecoach/bin/node (--[a-z0-9-]+(=[0-9a-z]+)? )*/opt/stagecoach/app/dist/services/cli/main\\.js ${u.replace(/^stagecoach-|\.service$/g, '')} --config /etc/stagecoach/`), u);
    }
  });
});
