import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { z } from 'zod';
import { loadConfig, parseBytes, parseListen, parseTokenLines } from '../../shared/config.js';
import { parseTokens } from '../../services/control/config.js';
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

test('config: a missing setting is named with its flag and environment variable', () => {
  const required = z.strictObject({ data: z.string(), upstreams: z.array(z.string()), colo: z.string().optional() });
  assert.throws(
    () => loadConfig(required, { env: {}, envPrefix: 'SC_X_', flagNames: { upstreams: '--upstream' } }),
    (e) =>
      isScError(e, 'SC_ERR_BAD_CONFIG') &&
      e.message === "missing settings 'data' (--data or SC_X_DATA), 'upstreams' (--upstream or SC_X_UPSTREAMS)",
  );
  // A setting that is there but wrong keeps its own complaint.
  assert.throws(
    () => loadConfig(required, { env: {}, envPrefix: 'SC_X_', flags: { data: 5, upstreams: ['u'] } }),
    (e) => isScError(e, 'SC_ERR_BAD_CONFIG') && /^invalid configuration: data: /.test(e.message),
  );
});

test('token files: one format; the shared parser and control agree', () => {
  const text = '# control write tokens\nops:abc123\n\nci:def-456\n';
  assert.deepEqual(parseTokenLines(text), [
    { name: 'ops', token: 'abc123' },
    { name: 'ci', token: 'def-456' },
  ]);
  assert.deepEqual(parseTokenLines('bare-token\n'), [{ name: 'admin', token: 'bare-token' }]);
  for (const t of [text, 'bare-token\n', 'a.b_c-1:x:y\n']) assert.deepEqual(parseTokenLines(t), parseTokens(t));
  for (const bad of ['', '# only a comment\n', 'a:1\na:2\n', 'two words\n']) {
    assert.throws(() => parseTokenLines(bad), (e) => isScError(e, 'SC_ERR_BAD_CONFIG'));
  }
});
