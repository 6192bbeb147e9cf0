/** The stage's nginx front (services/stage/accel.ts): what goes into nginx's config, and what is refused. */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { accelTarget, renderNginxMain, renderNginxSite } from '../../services/stage/accel.js';
import { parseStageConfig } from '../../services/stage/config.js';
import { isScError } from '../../shared/errors.js';
import type { Digest } from '../../shared/digest.js';

const base = { listen: '127.0.0.1:7080', upstreams: ['https://origin.internal:7070'], cache: '/var/cache/stagecoach', colo: 'ams1', accelRedirect: '/_stagecoach' };
const badConfig = (f: () => unknown, re: RegExp) => assert.throws(f, (e: unknown) => isScError(e, 'SC_ERR_BAD_CONFIG') && re.test((e as Error).message));

describe('stage accel (nginx front)', () => {
  it('names a committed blob under the prefix by its hex', () => {
    const d = `sha256:${'ab'.repeat(32)}` as Digest;
    assert.equal(accelTarget('/_stagecoach', d), `/_stagecoach/blobs/${'ab'.repeat(32)}`);
  });

  it('renders the front: proxy with the accel header, an internal location that aliases the blobs', () => {
    const site = renderNginxSite(parseStageConfig({ ...base, listen: '0.0.0.0:7080', accelRedirect: '/x.y/z' }), { front: '[::]:7443' });
    assert.match(site, /^ {2}server 127\.0\.0\.1:7080;$/m, 'a wildcard listen is reached on loopback');
    assert.match(site, /^ {2}listen \[::\]:7443;$/m);
    assert.match(site, /^ {4}proxy_pass http:\/\/stagecoach_stage_ams1;$/m);
    assert.match(site, /^ {4}proxy_set_header Stagecoach-Accel 1;$/m);
    assert.match(site, /^ {2}location ~ "\^\/x\\\.y\/z\/blobs\/\(\[0-9a-f\]\{64\}\)\$" \{$/m, 'the prefix is escaped in the regex');
    assert.match(site, /^ {4}internal;$/m);
    assert.match(site, /^ {4}alias \/var\/cache\/stagecoach\/blobs\/\$1;$/m);
    assert.doesNotMatch(site, /ssl/);
  });

  it('with TLS, nginx listens with the stage certificate and reaches the stage over TLS', () => {
    const site = renderNginxSite(parseStageConfig({ ...base, tlsCert: '/etc/sc/c.pem', tlsKey: '/etc/sc/k.pem' }), { front: '0.0.0.0:7443' });
    assert.match(site, /^ {2}listen 0\.0\.0\.0:7443 ssl;$/m);
    assert.match(site, /^ {2}ssl_certificate \/etc\/sc\/c\.pem;$/m);
    assert.match(site, /^ {2}ssl_certificate_key \/etc\/sc\/k\.pem;$/m);
    assert.match(site, /^ {4}proxy_pass https:\/\/stagecoach_stage_ams1;$/m);
  });

  it('refuses what cannot be written into nginx config safely', () => {
    badConfig(() => renderNginxSite(parseStageConfig({ ...base, accelRedirect: undefined }), { front: '0.0.0.0:7443' }), /needs accelRedirect/);
    badConfig(() => renderNginxSite(parseStageConfig({ ...base, listen: '127.0.0.1:0' }), { front: '0.0.0.0:7443' }), /fixed port/);
    badConfig(() => renderNginxSite(parseStageConfig({ ...base, cache: '/var/cache/my cache' }), { front: '0.0.0.0:7443' }), /cache .*cannot go into an nginx config/);
    badConfig(() => renderNginxSite(parseStageConfig({ ...base, cache: '/var/$uri' }), { front: '0.0.0.0:7443' }), /cannot go into an nginx config/);
    badConfig(() => renderNginxSite(parseStageConfig(base), { front: 'a;b:7443' }), /front host/);
    badConfig(() => renderNginxMain('/tmp/x;y', ''), /dir/);
  });

  it('the config refuses an accelRedirect that is not a plain path prefix', () => {
    for (const p of ['_stagecoach', '/', '/a/../b', '/a/./b', '/a b', '/a/', '/a?x', '/a$b']) badConfig(() => parseStageConfig({ ...base, accelRedirect: p }), /accelRedirect/);
    assert.equal(parseStageConfig({ ...base, accelRedirect: '/a/b-c.d_e' }).accelRedirect, '/a/b-c.d_e');
  });
});
