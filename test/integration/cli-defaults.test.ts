/**
 * Client defaults: STAGECOACH_* variables and the profile file stand in for flags (a flag wins
 * over the environment, the environment over the profile); a profile may set nothing but
 * stagecoach's own variables; `completion bash` completes the real command tree. The real binary
 * against a real origin on port 0.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { prettyLogs } from '../../shared/log.js';
import { cli, lines } from '../helpers/cli.js';
import { startTestOrigin, type TestOrigin } from '../helpers/origin.js';
import { keyPair, publishDummy } from './control-fixture.js';

let dir: string;
let origin: TestOrigin;
let trustKey: string;
/** This environment without STAGECOACH_* settings, with a profile location of its own (empty). */
let env: NodeJS.ProcessEnv;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'sc-cli-defaults-'));
  env = { ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('STAGECOACH_'))), XDG_CONFIG_HOME: join(dir, 'xdg') };
  const k = keyPair(dir, 'release');
  trustKey = k.pubPath;
  origin = await startTestOrigin();
  await publishDummy(origin, k.priv, 'rescue', '1.0', 'base');
});
after(async () => {
  await origin?.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('client defaults', () => {
  it('get takes the origin and the trusted keys from the environment', async () => {
    const out = join(dir, 'env.bundle');
    const r = await cli(['get', 'rescue@1.0', '-o', out], { env: { ...env, STAGECOACH_ORIGIN: origin.url, STAGECOACH_TRUST_KEY: trustKey } });
    assert.equal(r.code, 0, r.stderr);
    assert.ok(existsSync(out));
    const bare = await cli(['get', 'rescue@1.0', '-o', join(dir, 'bare.bundle')], { env: { ...env, STAGECOACH_ORIGIN: origin.url } });
    assert.equal(bare.code, 1);
    assert.match(bare.stderr, /SC_ERR_BAD_CONFIG: at least one --trust-key \(or STAGECOACH_TRUST_KEY\)/);
  });

  it('bundles reads the origin from the profile; the environment beats the profile, a flag beats both', async () => {
    const profile = join(dir, 'profile');
    writeFileSync(profile, `# release engineer's defaults\nSTAGECOACH_ORIGIN=${origin.url}\n`);
    const fromProfile = await cli(['bundles', '--json'], { env: { ...env, STAGECOACH_PROFILE: profile } });
    assert.equal(fromProfile.code, 0, fromProfile.stderr);
    assert.deepEqual(
      (JSON.parse(fromProfile.stdout) as { name: string }[]).map((b) => b.name),
      ['rescue'],
    );
    const dead = 'http://127.0.0.1:9';
    const envWins = await cli(['bundles', '--json'], { env: { ...env, STAGECOACH_PROFILE: profile, STAGECOACH_ORIGIN: dead } });
    assert.equal(envWins.code, 1, 'the environment named a dead origin');
    assert.match(envWins.stderr, /127\.0\.0\.1:9/);
    const flagWins = await cli(['bundles', '--json', '--origin', origin.url], { env: { ...env, STAGECOACH_PROFILE: profile, STAGECOACH_ORIGIN: dead } });
    assert.equal(flagWins.code, 0, flagWins.stderr);
  });

  it('the default profile location is read too (XDG_CONFIG_HOME/stagecoach/profile)', async () => {
    const xdg = join(dir, 'xdg2');
    spawnSync('mkdir', ['-p', join(xdg, 'stagecoach')]);
    writeFileSync(join(xdg, 'stagecoach', 'profile'), `STAGECOACH_ORIGIN=${origin.url}\n`);
    const r = await cli(['bundles', '--json'], { env: { ...env, XDG_CONFIG_HOME: xdg } });
    assert.equal(r.code, 0, r.stderr);
  });

  it('a profile that sets anything but stagecoach variables is refused, and so is a missing named profile', async () => {
    const bad = join(dir, 'bad-profile');
    writeFileSync(bad, 'PATH=/tmp/evil\n');
    const r = await cli(['bundles'], { env: { ...env, STAGECOACH_PROFILE: bad } });
    assert.equal(r.code, 1);
    assert.match(lines(r.stderr)[0], /^error SC_ERR_BAD_CONFIG: the profile .* sets PATH: only STAGECOACH_/);
    const missing = await cli(['bundles'], { env: { ...env, STAGECOACH_PROFILE: join(dir, 'nope') } });
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /SC_ERR_BAD_CONFIG: cannot read the profile .*nope: ENOENT/);
  });

  it('without any default a required flag is still a usage error', async () => {
    const r = await cli(['bundles'], { env });
    assert.equal(r.code, 2);
    assert.match(r.stderr, /SC_ERR_USAGE: .*--origin/);
  });

  it('--help lists the variables', async () => {
    const r = await cli(['--help'], { env });
    for (const v of ['STAGECOACH_ORIGIN', 'STAGECOACH_CONTROL', 'STAGECOACH_TOKEN_FILE', 'STAGECOACH_TRUST_KEY']) assert.match(r.stdout, new RegExp(v));
  });
});

describe('shell completion', () => {
  it('bash completes commands, subcommands, flags and files after a flag that takes a value', async () => {
    const r = await cli(['completion', 'bash'], { env });
    assert.equal(r.code, 0, r.stderr);
    const script = join(dir, 'completion.bash');
    writeFileSync(script, r.stdout);
    const complete = (...words: string[]) =>
      spawnSync('bash', ['-c', `source ${script}; COMP_WORDS=(${words.map((w) => `'${w}'`).join(' ')}); COMP_CWORD=${words.length - 1}; _stagecoach; echo "\${COMPREPLY[*]}"`], { encoding: 'utf8' }).stdout.trim();
    assert.equal(complete('stagecoach', 'rollo'), 'rollout');
    assert.equal(complete('stagecoach', 'rollout', 'cre'), 'create');
    assert.deepEqual(complete('stagecoach', 'rollout', 'create', '--base', 'x', '--ta').split(' '), ['--target']);
    assert.equal(complete('stagecoach', 'publish', '--origin', join(dir, 'completion.b')), script, 'a file after a flag that takes a value');
  });

  it('zsh gets the same script through bashcompinit; another shell is a usage error', async () => {
    const z = await cli(['completion', 'zsh'], { env });
    assert.match(z.stdout, /^autoload -U \+X bashcompinit && bashcompinit\n/);
    const fish = await cli(['completion', 'fish'], { env });
    assert.notEqual(fish.code, 0);
    assert.match(fish.stderr, /SC_ERR_USAGE: no completion for "fish"/);
  });
});

describe('log format', () => {
  it('pretty on a terminal, JSON elsewhere, as STAGECOACH_LOG_FORMAT says when set', () => {
    assert.equal(prettyLogs({}, true), true);
    assert.equal(prettyLogs({}, false), false);
    assert.equal(prettyLogs({ STAGECOACH_LOG_FORMAT: 'json' }, true), false);
    assert.equal(prettyLogs({ STAGECOACH_LOG_FORMAT: 'pretty' }, false), true);
  });
});
