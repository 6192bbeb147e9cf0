import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { isScError } from '../../shared/errors.js';
import { ReadClient } from '../../services/origin/client.js';
import { loadOriginConfig } from '../../services/origin/config.js';

const REPO = fileURLToPath(new URL('../..', import.meta.url));

describe('origin configuration', () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'sc-origin-cfg-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('layers file < environment < flags, with defaults, and splits env lists on commas', () => {
    const file = join(dir, 'origin.yaml');
    writeFileSync(file, 'listen: 127.0.0.1:9000\ndata: /from/file\ntokenFile: /t\nlogLevel: warn\n');
    const cfg = loadOriginConfig({
      file,
      env: { STAGECOACH_ORIGIN_DATA: '/from/env', STAGECOACH_ORIGIN_TRUST_KEY: 'a.pem, b.pem' },
      flags: { listen: '127.0.0.1:9100', data: undefined },
    });
    assert.equal(cfg.listen, '127.0.0.1:9100');
    assert.equal(cfg.data, '/from/env');
    assert.deepEqual(cfg.trustKey, ['a.pem', 'b.pem']);
    assert.equal(cfg.logLevel, 'warn');
    assert.equal(cfg.maxManifestBytes, 1 << 20);
    assert.ok(Object.isFrozen(cfg));
  });

  it('rejects unknown keys, a bad listen address and a missing data dir with SC_ERR_BAD_CONFIG', () => {
    const bad = (flags: Record<string, unknown>) =>
      assert.throws(() => loadOriginConfig({ env: {}, flags: { data: '/d', tokenFile: '/t', ...flags } }), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
    bad({ colour: 'blue' });
    bad({ listen: 'nowhere' });
    bad({ data: undefined, tokenFile: '/t' });
    assert.throws(() => loadOriginConfig({ env: {}, flags: { tokenFile: '/t' } }), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
  });

  it('runs as `stagecoach origin` and stops cleanly on SIGTERM', async () => {
    writeFileSync(join(dir, 'token'), 'cli-token\n');
    const child = spawn(process.execPath, [join(REPO, 'services/cli/bin.js'), 'origin', '--listen', '127.0.0.1:0', '--token-file', join(dir, 'token')], {
      cwd: REPO,
      env: { ...process.env, STAGECOACH_ORIGIN_DATA: join(dir, 'data') },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    const url = await new Promise<string>((resolve, reject) => {
      child.stderr.on('data', (c) => {
        stderr += c;
        const m = /"url":"(http:\/\/127\.0\.0\.1:\d+)"/.exec(stderr);
        if (m) resolve(m[1]);
      });
      child.on('exit', () => reject(new Error(`origin exited early: ${stderr}`)));
    });
    assert.equal((await new ReadClient(url).health()).ok, true);
    child.kill('SIGTERM');
    assert.equal(await exited, 0);
    assert.match(stderr, /origin stopped/);
    assert.ok(!stderr.includes('cli-token'));
  });
});
