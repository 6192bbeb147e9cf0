/**
 * The CLI's failures, as a person meets them: one `error SC_ERR_…: message` line (and at most one
 * `hint:` line), never a library's own wording; usage errors exit 2 with the command's usage line;
 * output into a closed pipe ends quietly. Each case runs the real binary; servers are real
 * (origin on port 0), and "Redis is down" is a port nothing listens on.
 */
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { readTokenFile } from '../../shared/config.js';
import { freePort } from '../../shared/redis.js';
import { cli, lines } from '../helpers/cli.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';
import { keyPair, publishDummy } from './control-fixture.js';

/** stderr of a failure: exactly one error line with `code`, then at most one hint line. */
function assertOneError(stderr: string, code: string): { error: string; hint?: string } {
  const l = lines(stderr);
  assert.ok(l.length === 1 || (l.length === 2 && l[1].startsWith('hint: ')), `expected one error line (and a hint), got:\n${stderr}`);
  assert.ok(l[0].startsWith(`error ${code}: `), `expected error ${code}, got:\n${stderr}`);
  return { error: l[0], hint: l[1] };
}

/** This environment without any STAGECOACH_* setting, so a missing setting stays missing. */
function cleanEnv(): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('STAGECOACH_')));
}

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), 'sc-cli-errors-'));
});
after(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe('usage errors', () => {
  it('exit 2 with SC_ERR_USAGE and the one-line usage, not the whole help', async () => {
    const cases: [string[], RegExp][] = [
      [['get', 'x@1'], /required option '-o, --out <file>' not specified/],
      [['get', 'x@1', '-o', join(dir, 'f'), '--bogus'], /unknown option '--bogus'/],
      [['get', '-o', join(dir, 'f')], /missing required argument 'ref'/],
    ];
    for (const [args, why] of cases) {
      const r = await cli(args);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.deepEqual(lines(r.stderr).length, 2, r.stderr);
      assert.match(lines(r.stderr)[0], /^error SC_ERR_USAGE: /);
      assert.match(lines(r.stderr)[0], why);
      assert.equal(lines(r.stderr)[1], 'usage: stagecoach get [options] <ref>');
      assert.equal(r.stdout, '');
    }
  });

  it('name the subcommand in the usage line', async () => {
    const r = await cli(['rollout', 'pause']);
    assert.equal(r.code, 2, r.stderr);
    assert.deepEqual(lines(r.stderr), ["error SC_ERR_USAGE: missing required argument 'id'", 'usage: stagecoach rollout pause [options] <id>']);
  });
});

describe('library errors are translated', () => {
  it('a missing service setting is named with its flag and environment variable', async () => {
    const r = await cli(['origin', '--token-file', join(dir, 'nope')], { env: cleanEnv() });
    assert.equal(r.code, 1);
    const { error } = assertOneError(r.stderr, 'SC_ERR_BAD_CONFIG');
    assert.match(error, /missing setting 'data' \(--data or STAGECOACH_ORIGIN_DATA\)/);
    assert.doesNotMatch(error, /Invalid input|received undefined/);
  });

  it("control whose Redis does not answer: SC_ERR_REDIS_UNAVAILABLE with the URL, not the password", async () => {
    const k = keyPair(dir, 'redis-down');
    writeFileSync(join(dir, 'ct'), 'ops:abc\n');
    const url = `redis://ops:s3cret-pw@127.0.0.1:${await freePort()}`;
    const r = await cli(
      ['control', '--redis', url, '--origin', 'http://127.0.0.1:1', '--token-file', join(dir, 'ct'), '--signing-key', k.privPath, '--listen', '127.0.0.1:0', '--log-level', 'silent'],
      { env: cleanEnv(), timeoutMs: 60_000 },
    );
    assert.equal(r.code, 1, r.stderr);
    const { error } = assertOneError(r.stderr, 'SC_ERR_REDIS_UNAVAILABLE');
    assert.match(error, /redis:\/\/ops@127\.0\.0\.1:\d+/);
    assert.doesNotMatch(r.stderr, /s3cret-pw|max retries/i);
  });

  it('a public key given as --signing-key says so, with a hint (control and publish)', async () => {
    const k = keyPair(dir, 'pub-as-key');
    writeFileSync(join(dir, 'ct2'), 'ops:abc\n');
    const control = await cli(
      ['control', '--redis', 'redis://127.0.0.1:1', '--origin', 'http://127.0.0.1:1', '--token-file', join(dir, 'ct2'), '--signing-key', k.pubPath, '--log-level', 'silent'],
      { env: cleanEnv(), timeoutMs: 60_000 },
    );
    mkdirSync(join(dir, 'tree'), { recursive: true });
    const publish = await cli(
      ['publish', join(dir, 'tree'), '--origin', 'http://127.0.0.1:1', '--name', 'x', '--version', '1.0', '--role', 'base', '--token-file', join(dir, 'ct2'), '--signing-key', k.pubPath],
      { timeoutMs: 60_000 },
    );
    for (const r of [control, publish]) {
      assert.equal(r.code, 1, r.stderr);
      const { hint } = assertOneError(r.stderr, 'SC_ERR_BAD_KEY');
      assert.equal(hint, "hint: this looks like a public key; --signing-key wants the private key from 'stagecoach keys gen' (release.key or control.key)");
      assert.doesNotMatch(r.stderr, /DECODER|routines/);
    }
  });

  it('keys gen into a directory that cannot be made fails at once (no endless mkdir)', { skip: !existsSync('/proc/self') }, async () => {
    const t0 = Date.now();
    const r = await cli(['keys', 'gen', '--out', '/proc/nope'], { timeoutMs: 15_000 });
    assert.equal(r.timedOut, false, 'keys gen --out /proc/nope did not end within 15 s');
    assert.equal(r.code, 1);
    const { error } = assertOneError(r.stderr, 'SC_ERR_FILE_ACCESS');
    assert.match(error, /\/proc\/nope/);
    assert.ok(Date.now() - t0 < 15_000);
  });
});

describe('get against a real origin', () => {
  let origin: TestOrigin;
  let trustKey: string;
  before(async () => {
    const k = keyPair(dir, 'release');
    trustKey = k.pubPath;
    origin = await startTestOrigin();
    await publishDummy(origin, k.priv, 'rescue', '1.0', 'base');
  });
  after(async () => {
    await origin?.close();
  });

  it('a typo in NAME@VERSION: one line with the ref, the URL once, and a hint to list bundles', async () => {
    const r = await cli(['get', 'rescue@1.1', '--origin', origin.url, '--trust-key', trustKey, '-o', join(dir, 'typo.bundle')]);
    assert.equal(r.code, 1);
    const { error, hint } = assertOneError(r.stderr, 'SC_ERR_MANIFEST_NOT_FOUND');
    assert.match(error, /rescue@1\.1/);
    assert.equal(error.split(origin.url).length - 1, 1, `the URL should appear once: ${error}`);
    assert.equal(hint, `hint: run 'stagecoach bundles --origin ${origin.url}' to see what is published`);
  });

  it('get into a directory that does not exist: SC_ERR_FILE_ACCESS with the path, no ENOENT text', async () => {
    const missing = join(dir, 'no-such-dir');
    const r = await cli(['get', 'rescue@1.0', '--origin', origin.url, '--trust-key', trustKey, '-o', join(missing, 'b.bundle')]);
    assert.equal(r.code, 1);
    const { error } = assertOneError(r.stderr, 'SC_ERR_FILE_ACCESS');
    assert.ok(error.includes(missing), error);
    assert.doesNotMatch(error, /ENOENT: no such file/);
  });
});

describe('output into a closed pipe', () => {
  it('ends quietly with status 0 (machine log, acl gen)', async () => {
    const m = join(dir, 'machine');
    const init = await cli(['machine', 'init', m, '--host-id', 'h1', '--ip', '10.0.0.5/24', '--gateway', '10.0.0.1']);
    assert.equal(init.code, 0, init.stderr);
    writeFileSync(join(dir, 'acl-secret'), 'a-long-enough-test-secret\n');
    const hosts = Array.from({ length: 2000 }, (_, i) => `h${i}`).join(',');
    for (const args of [
      ['machine', 'log', m],
      ['acl', 'gen', '--secret-file', join(dir, 'acl-secret'), '--hosts', hosts],
    ]) {
      const r = await cli(args, { closeStdout: true });
      assert.equal(r.stderr, '', `${args[0]} ${args[1]}: ${r.stderr}`);
      assert.equal(r.code, 0);
    }
  });
});

describe('token files', () => {
  it('the CLI reads the servers\' format: NAME:TOKEN lines, comments, or a bare token', () => {
    writeFileSync(join(dir, 'named'), '# control write tokens\nops:abc123\nci:def456\n');
    writeFileSync(join(dir, 'bare'), 'xyz789\n');
    assert.equal(readTokenFile(join(dir, 'named')), 'abc123');
    assert.equal(readTokenFile(join(dir, 'bare')), 'xyz789');
  });
});
