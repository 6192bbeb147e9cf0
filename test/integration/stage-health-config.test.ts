// The stage's upstream health timings come from its configuration (file, env or in-process):
// with the background check off, nothing is known of an upstream until a request goes to it;
// with a short period, the check runs on its own. Real test origin and stages on 127.0.0.1.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { loadStageConfig, type StageConfigInput } from '../../services/stage/config.js';
import { type RunningStage, startStage } from '../../services/stage/main.js';
import type { UpstreamHealth } from '../../services/stage/upstreams.js';
import { silentLogger } from '../../shared/log.js';
import { httpGet, startTestOrigin, waitFor } from '../helpers/test-origin.js';

const cleanups: (() => Promise<unknown>)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c().catch(() => {});
});

async function stage(upstream: string, extra: Partial<StageConfigInput>): Promise<RunningStage> {
  const dir = await mkdtemp(join(tmpdir(), 'stage-health-config-'));
  const s = await startStage({ listen: '127.0.0.1:0', upstreams: [upstream], cache: join(dir, 'cache'), cacheSize: '16MiB', colo: 'cfg', ...extra }, { log: silentLogger });
  cleanups.push(() => s.close(), () => rm(dir, { recursive: true, force: true }));
  return s;
}

const upstreamHealth = async (s: RunningStage): Promise<UpstreamHealth> => (JSON.parse((await httpGet(`${s.url}/healthz`)).body.toString()) as { upstreamHealth: UpstreamHealth[] }).upstreamHealth[0];

test('upstreamCheckIntervalMs sets the background check (0: none), and env and file can set it', async () => {
  const o = await startTestOrigin();
  cleanups.push(() => o.close());
  const quiet = await stage(o.url, { upstreamCheckIntervalMs: 0 });
  const busy = await stage(o.url, { upstreamCheckIntervalMs: 50, upstreamCheckTimeoutMs: 500, upstreamDownAfter: 1 });
  await waitFor(async () => (await upstreamHealth(busy)).checkedAt !== null, 10_000, 'the 50 ms check ran');
  assert.equal((await upstreamHealth(busy)).reachable, true);
  const q = await upstreamHealth(quiet);
  assert.equal(q.checkedAt, null, 'no background check with upstreamCheckIntervalMs 0');
  assert.equal(q.reachable, null);

  const env = { STAGECOACH_STAGE_UPSTREAMS: o.url, STAGECOACH_STAGE_CACHE: '/tmp/x', STAGECOACH_STAGE_COLO: 'cfg', STAGECOACH_STAGE_UPSTREAM_CHECK_INTERVAL_MS: '750', STAGECOACH_STAGE_UPSTREAM_DOWN_AFTER: '3' };
  const c = loadStageConfig({ env });
  assert.equal(c.upstreamCheckIntervalMs, 750);
  assert.equal(c.upstreamDownAfter, 3);
  assert.equal(c.upstreamCheckTimeoutMs, 2000, 'the default');
  assert.throws(() => loadStageConfig({ env: { ...env, STAGECOACH_STAGE_UPSTREAM_DOWN_AFTER: '0' } }), (e: Error & { code?: string }) => e.code === 'SC_ERR_BAD_CONFIG');
});
