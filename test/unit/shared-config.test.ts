import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { z } from 'zod';
import { loadConfig, parseBytes, parseListen } from '../../shared/config.js';
import { ERRORS, isScError } from '../../shared/errors.js';
import { readFileSync } from 'node:fs';

const schema = z.strictObject({
  listen: z.string().default('127.0.0.1:7070'),
  cacheSize: z.coerce.number().int().positive().default(100),
  colo: z.string().optional(),
});

test('config: file < env < flags, then frozen', () => {
  const dir = mkdtempSync(join(tmpdir(), 'sc-cfg-'));
  try {
    const file = join(dir, 'c.yaml');
    writeFileSync(file, 'listen: 0.0.0.0:1\ncacheSize: 5\ncolo: fra1\n');
    const c = loadConfig(schema, { file, env: { SC_CACHE_SIZE: '7' }, envPrefix: 'SC_', flags: { listen: '127.0.0.1:9', colo: undefined } });
    assert.deepEqual({ ...c }, { listen: '127.0.0.1:9', cacheSize: 7, colo: 'fra1' });
    assert.ok(Object.isFrozen(c));
    assert.throws(() => {
      (c as { listen: string }).listen = 'x';
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('config: unknown keys and bad values are SC_ERR_BAD_CONFIG naming the key', () => {
  assert.throws(() => loadConfig(schema, { flags: { nope: 1 } }), (e) => isScError(e, 'SC_ERR_BAD_CONFIG') && /nope/.test(e.message));
  assert.throws(
    () => loadConfig(schema, { env: { SC_CACHE_SIZE: '-3' }, envPrefix: 'SC_' }),
    (e) => isScError(e, 'SC_ERR_BAD_CONFIG') && /cacheSize/.test(e.message),
  );
});

test('parseBytes and parseListen', () => {
  assert.equal(parseBytes('20GiB'), 20 * 1024 ** 3);
  assert.equal(parseBytes('512MiB'), 512 * 1024 ** 2);
  assert.equal(parseBytes('1GB'), 1e9);
  assert.equal(parseBytes('4096'), 4096);
  assert.throws(() => parseBytes('lots'), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
  assert.deepEqual(parseListen('127.0.0.1:7080'), { host: '127.0.0.1', port: 7080 });
  assert.deepEqual(parseListen(':0'), { host: '127.0.0.1', port: 0 });
  assert.throws(() => parseListen('127.0.0.1:99999'), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
});

test('every error code is documented in the README with its HTTP status', () => {
  const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
  for (const [code, { status }] of Object.entries(ERRORS)) {
    assert.match(readme, new RegExp(`\\| \`${code}\` \\| ${status} \\|`), `${code} (${status}) is not in README's error table`);
  }
});
