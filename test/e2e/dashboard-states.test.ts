/**
 * The dashboard never shows a state the fleet is not in, in a real browser against a real
 * control plane and Redis:
 * - a sim fleet: the loading state before the first data, a refused token, a host converted by a
 *   rollout whose reinstall then fails at boot-target (the firmware falls back to the rescue OS) is
 *   red and says it runs its rescue OS, the operation shows its current step while it runs and its
 *   failed outcome with the code after, and a rescued host has the rescue colour;
 * - 10,000 registered hosts (written the way agents register): a per-colo summary with counts by
 *   state and no tiles, drill-down to one colo's tiles and to one state, and the unreachable state
 *   once control is gone.
 * Screenshots go to a temp directory whose paths are printed as diagnostics.
 */
import assert from 'node:assert/strict';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import type { Browser, Page } from 'playwright-core';
import { fleetAgentConfig } from '../../services/demo/fleet.js';
import { simFault } from '../../services/agent/machine/sim.js';
import { startAgent } from '../../services/agent/runtime.js';
import { silentLogger } from '../../shared/log.js';
import { type HostRecord, queuePresence } from '../../shared/protocol/index.js';
import { type ControlFixture, controlFixture, REDIS_URL, until } from '../integration/control-fixture.js';
import { type ControlFleet, startControlFleet } from '../integration/control-fleet-fixture.js';
import { launchChromium, noChromium } from './chromium.js';

const TOKEN_KEY = 'stagecoach.token';
/** The colours of style.css, as computed styles report them. */
const RED = 'rgb(220, 38, 38)';
const GREEN = 'rgb(22, 163, 74)';
const PURPLE = 'rgb(168, 85, 247)';
const BLUE = 'rgb(59, 130, 246)';

const shots = mkdtempSync(join(tmpdir(), 'sc-dashboard-e2e-'));
async function shot(t: TestContext, page: Page, name: string, fullPage = true): Promise<void> {
  const path = join(shots, `${name}.png`);
  await page.screenshot({ path, fullPage });
  t.diagnostic(`screenshot ${path}`);
}

/**
 * The computed background colour of the element `selector` finds. Playwright finds the element,
 * then evaluates on it in a second call: when the dashboard re-renders in between, the element
 * found is detached, and a detached element has no computed style (''). Then it looks again.
 */
async function bg(page: Page, selector: string): Promise<string> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const c = await page.locator(selector).evaluate((e) => (e.isConnected ? getComputedStyle(e).backgroundColor : ''));
    if (c || Date.now() > deadline) return c;
    await page.waitForTimeout(50);
  }
}

/** Opens the dashboard with `token` already in sessionStorage (as after pasting it). */
async function openWithToken(browser: Browser, url: string, token: string, hold?: string): Promise<{ page: Page; release: () => void }> {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  await page.addInitScript(([k, v]) => sessionStorage.setItem(k, v), [TOKEN_KEY, token] as const);
  let release = () => {};
  if (hold) {
    // The real request, answered by the real control, but only once the test has looked.
    const held = new Promise<void>((r) => (release = r));
    await page.route(hold, async (route) => {
      await held;
      await route.continue();
    });
  }
  await page.goto(url, { waitUntil: 'commit' });
  return { page, release };
}

describe('dashboard states', { skip: noChromium }, () => {
  let browser: Browser;
  before(async () => {
    browser = await launchChromium();
  });
  after(async () => {
    await browser?.close();
  });

  describe('a sim fleet: rollout, then host operations', () => {
    let cf: ControlFleet;
    let page: Page;
    // Holds the agent of ams1-h1 between a reboot and its next start while set (the machine is
    // "rebooting"): the operation stays at its current step until the test opens it.
    let gate: Promise<void> | null = null;
    let openGate = () => {};

    before(async () => {
      cf = await startControlFleet({ colos: [{ name: 'ams1', hosts: 3 }] });
      const h1 = cf.fleet.hosts.find((h) => h.hostId === 'ams1-h1')!;
      await cf.agents.handles.get(h1.hostId)!.stop();
      const cfg = fleetAgentConfig(h1, {
        redisUrl: REDIS_URL,
        prefix: cf.fleet.prefix,
        keys: cf.fleet.keys,
        stages: { ams1: [cf.stages.ams1.url] },
        origin: cf.fleet.origin.url,
        heartbeatMs: 500,
      });
      const handle = await startAgent(cfg, {
        logger: silentLogger,
        keys: cf.fleet.keys.agent,
        onReboot: async () => {
          if (gate) await gate;
        },
      });
      // The fixture's cleanup stops every handle in this map.
      cf.agents.handles.set(h1.hostId, handle);
    });
    after(async () => {
      openGate();
      await page?.close();
      await cf?.cleanup();
    });

    it('shows a loading state until the first data, then the fleet', async (t) => {
      const opened = await openWithToken(browser, cf.control.url, cf.token, '**/v1/hosts');
      page = opened.page;
      await page.locator('body[data-view="loading"] #loading').waitFor({ state: 'visible' });
      assert.match((await page.locator('#loading').textContent()) ?? '', /Loading the fleet/);
      assert.equal(await page.locator('.host').count(), 0);
      await shot(t, page, 'loading');
      opened.release();
      await page.locator('body[data-view="ready"]').waitFor();
      await page.locator('#loading').waitFor({ state: 'hidden' });
      await page.unroute('**/v1/hosts');
      for (const h of ['ams1-h1', 'ams1-h2', 'ams1-h3']) await page.locator(`.host[data-host="${h}"][data-state="idle"]`).waitFor();
      await page.locator('#ops', { hasText: 'no host operations yet' }).waitFor();
      // Every colour state has its own colour.
      const colours = new Map<string, string>();
      for (const s of ['running', 'queued', 'pending', 'failed', 'rescue', 'aborted', 'converted', 'skipped', 'idle', 'stale']) {
        colours.set(s, await bg(page, `#legend .swatch[data-state="${s}"]`));
      }
      assert.equal(new Set(colours.values()).size, colours.size, JSON.stringify(Object.fromEntries(colours)));
    });

    it('says so when the token is refused', async (t) => {
      const other = await browser.newPage({ viewport: { width: 1400, height: 600 } });
      try {
        await other.goto(cf.control.url);
        await other.fill('#token', 'not-a-token-control-knows');
        await other.click('#token-save');
        await other.locator('body[data-view="refused"]').waitFor();
        assert.match((await other.locator('#message.error').textContent()) ?? '', /refused the token \(HTTP 403 SC_ERR_FORBIDDEN\)/);
        assert.equal(await other.locator('main').isVisible(), false, 'nothing is shown with a refused token');
        await shot(t, other, 'token-refused');
      } finally {
        await other.close();
      }
    });

    it('a converted host whose reinstall fails at boot-target is red, on its rescue OS, and the operation shows its steps and outcome', async (t) => {
      const created = await cf.client.createRollout({
        base: `${cf.fleet.base.name}@${cf.fleet.base.version}`,
        target: `${cf.fleet.target.name}@${cf.fleet.target.version}`,
        colos: ['ams1'],
        plan: { waves: ['100%'], maxInFlight: 3 },
      });
      const end = await cf.waitRollout(created.spec.id);
      assert.equal(end.status.state, 'completed', JSON.stringify(end.hosts.map((h) => [h.host, h.status, h.error])));
      for (const h of ['ams1-h1', 'ams1-h2', 'ams1-h3']) await page.locator(`.host[data-host="${h}"][data-state="converted"]`).waitFor();
      assert.equal(await bg(page, '.host[data-host="ams1-h1"]'), GREEN);

      // The target no longer boots: a reinstall gets through rescue, wipe and install, then the
      // firmware falls back to B at boot-target.
      const h1 = cf.fleet.hosts.find((h) => h.hostId === 'ams1-h1')!;
      await simFault(h1.dir, 'fail-boot', 'disk1p1');
      gate = new Promise<void>((r) => (openGate = r));
      const op = await cf.client.reinstall('ams1-h1');
      const card = page.locator(`.op[data-op="${op.id}"]`);
      // While the machine reboots into B, the operation is at its first step, running.
      await page.locator(`.op[data-op="${op.id}"][data-status="running"]`).waitFor();
      await card.locator('.steps span[data-step="rescue"].running').waitFor();
      assert.equal((await card.locator('.progress-text').textContent())?.trim(), 'at step 1/5: rescue');
      assert.equal(await card.locator('.outcome').textContent(), 'in progress');
      await page.locator('.host[data-host="ams1-h1"][data-state="running"]').waitFor();
      assert.equal(await bg(page, '.host[data-host="ams1-h1"]'), BLUE);
      assert.match((await page.locator('.host[data-host="ams1-h1"] .label').textContent()) ?? '', new RegExp(`running · reinstall ${op.id} · rescue`));
      await shot(t, page, 'op-running');
      openGate();

      await page.locator(`.op[data-op="${op.id}"][data-status="failed"]`).waitFor({ timeout: 120_000 });
      const api = await cf.reader.op(op.id);
      assert.equal(api.status, 'failed');
      assert.equal(api.error?.step, 'boot-target');
      assert.equal(api.error?.code, 'SC_ERR_BOOT_FAILED');
      assert.equal(await card.locator('.outcome').textContent(), 'failed at boot-target: SC_ERR_BOOT_FAILED');
      assert.equal((await card.locator('.progress-text').textContent())?.trim(), 'stopped at step 4/5: boot-target');
      assert.deepEqual(
        await card.locator('.steps span').evaluateAll((xs) => xs.map((x) => `${x.getAttribute('data-step')}:${x.className}`)),
        ['rescue:completed', 'wipe-target-disk:completed', 'install-target:completed', 'boot-target:failed', 'verify:'],
      );
      assert.match((await card.locator('.failure').textContent()) ?? '', /ams1-h1 reinstall failed at boot-target: SC_ERR_BOOT_FAILED/);

      // The earlier rollout converted it; the host is red now, and says it runs its rescue OS.
      assert.equal((await cf.reader.rollout(created.spec.id)).hosts.find((h) => h.host === 'ams1-h1')?.status, 'converted');
      const tile = page.locator('.host[data-host="ams1-h1"][data-state="failed"][data-rescue-os="true"]');
      await tile.waitFor();
      assert.equal(await bg(page, '.host[data-host="ams1-h1"]'), RED);
      const label = (await tile.locator('.label').textContent()) ?? '';
      assert.match(label, new RegExp(`^failed · reinstall ${op.id} at boot-target: SC_ERR_BOOT_FAILED · on rescue OS$`));
      assert.match((await tile.textContent()) ?? '', /@disk2p1 rescue OS/);
      // The summary counts it as failed.
      assert.equal(await page.locator('tr[data-summary-colo="ams1"] td[data-count="failed"]').textContent(), '1');
      assert.equal(await page.locator('tr[data-summary-colo="ams1"] td[data-count="converted"]').textContent(), '2');
      await shot(t, page, 'reinstall-failed');
    });

    it('a rescued host shows the rescue colour', async (t) => {
      const op = await cf.client.rescue('ams1-h2');
      const done = await until(
        'rescue op',
        async () => {
          const x = await cf.reader.op(op.id);
          return x.status === 'done' || x.status === 'failed' ? x : null;
        },
        120_000,
        100,
      );
      assert.equal(done.status, 'done', JSON.stringify(done));
      await page.locator('.host[data-host="ams1-h2"][data-state="rescue"][data-rescue-os="true"]').waitFor();
      assert.equal(await bg(page, '.host[data-host="ams1-h2"]'), PURPLE);
      await page.locator(`.op[data-op="${op.id}"][data-status="done"] .outcome[data-outcome="done"]`).waitFor();
      assert.equal((await page.locator(`.op[data-op="${op.id}"] .progress-text`).textContent())?.trim(), '1/1 steps done');
      // The third host is still converted: three hosts, three different states.
      assert.equal(await page.locator('.host[data-host="ams1-h3"]').getAttribute('data-state'), 'converted');
      await shot(t, page, 'rescued');
    });
  });

  describe('10,000 hosts: per-colo summary with drill-down', () => {
    const COLOS = ['ams1', 'fra1', 'lhr1', 'nyc1', 'sjc1'];
    const PER_COLO = 2000;
    let fx: ControlFixture;
    let url: string;
    let close: () => Promise<void>;
    let page: Page;
    /** What each colo should count, by colour state. */
    const expected = new Map<string, Record<string, number>>();

    before(async () => {
      fx = await controlFixture();
      const now = Date.now();
      for (const [k, colo] of COLOS.entries()) {
        const counts: Record<string, number> = { failed: 0, rescue: 0, stale: 0, idle: 0 };
        for (let start = 1; start <= PER_COLO; start += 1000) {
          const pipe = fx.redis.pipeline();
          for (let i = start; i < start + 1000 && i <= PER_COLO; i++) {
            // Per colo a different share of failed, rescue-OS and silent hosts.
            let st = 'idle';
            if (i % (97 - k) === 0) st = 'failed';
            else if (i % (89 - 2 * k) === 0) st = 'rescue';
            else if (i % (83 - 3 * k) === 0) st = 'stale';
            counts[st]++;
            const fields: Partial<HostRecord> = {
              colo,
              ip: `10.${k}.${i >> 8}.${i & 255}/16`,
              running: st === 'rescue' ? { id: 'debian', version: '12', device: 'disk2p1' } : { id: 'debian', version: '11', device: 'disk1p1' },
              bootDevice: st === 'rescue' ? 'disk2p1' : 'disk1p1',
              agentVersion: 'test',
              state: st === 'failed' ? 'failed' : 'idle',
              rollout: null,
              step: st === 'failed' ? 'fetch' : null,
            };
            // The same writes an agent's registration and heartbeats make.
            queuePresence(pipe, fx.prefix, { kind: 'host', host: `${colo}-h${i}` }, `${colo}-h${i}`, fields, st === 'stale' ? now - 2 * 3600_000 : now);
          }
          await pipe.exec();
        }
        expected.set(colo, counts);
      }
      const c = await fx.start({ staleSec: 3600 });
      url = c.url;
      close = () => c.close();
    });
    after(async () => {
      await page?.close();
      await fx?.cleanup();
    });

    it('shows counts per colo, no tiles until a colo is picked, then that colo and one state', async (t) => {
      ({ page } = await openWithToken(browser, url, fx.tokens.viewer));
      await page.locator('body[data-view="ready"]').waitFor({ timeout: 60_000 });
      await page.locator('tr[data-summary-colo="sjc1"]').waitFor();
      const count = async (colo: string, what: string) => Number(((await page.locator(`tr[data-summary-colo="${colo}"] td[data-count="${what}"]`).textContent()) ?? '').replace(/[,·]/g, '') || 0);
      for (const colo of COLOS) {
        const e = expected.get(colo)!;
        assert.equal(await count(colo, 'hosts'), PER_COLO, colo);
        for (const st of ['failed', 'rescue', 'stale', 'idle']) assert.equal(await count(colo, st), e[st], `${colo} ${st}`);
        assert.equal(await count(colo, 'converted'), 0);
      }
      assert.equal(await count('*', 'failed'), [...expected.values()].reduce((a, e) => a + e.failed, 0));
      assert.equal(await page.locator('.host').count(), 0, 'no tiles for 10,000 hosts');
      assert.match((await page.locator('#hosts-head').textContent()) ?? '', /10,000 hosts: more than 300/);
      await shot(t, page, 'fleet-10k-summary');

      // Drill down to one colo: its tiles, and only its.
      await page.click('button[data-drill="fra1"]');
      await page.locator('#hosts-head [data-drilled="fra1"]').waitFor();
      await page.locator('#hosts .host').nth(PER_COLO - 1).waitFor();
      const ids = await page.locator('#hosts .host').evaluateAll((xs) => xs.map((x) => x.getAttribute('data-host') ?? ''));
      assert.equal(ids.length, PER_COLO);
      assert.ok(ids.every((id) => id.startsWith('fra1-')));
      assert.equal(await page.locator('#hosts .host[data-state="rescue"]').count(), expected.get('fra1')!.rescue);
      assert.equal(new URL(page.url()).hash, '#colo=fra1');
      await shot(t, page, 'fleet-10k-fra1', false);

      // One state of another colo, from its count.
      await page.click('tr[data-summary-colo="lhr1"] button.count[data-state="failed"]');
      await page.locator('#hosts-head [data-drilled="lhr1"]').waitFor();
      await until('lhr1 failed tiles', async () => (await page.locator('#hosts .host').count()) === expected.get('lhr1')!.failed);
      const states = await page.locator('#hosts .host').evaluateAll((xs) => xs.map((x) => `${x.getAttribute('data-host')?.split('-')[0]} ${x.getAttribute('data-state')}`));
      assert.deepEqual(new Set(states), new Set(['lhr1 failed']));
      assert.equal(await bg(page, '#hosts .host >> nth=0'), RED);
      await shot(t, page, 'fleet-10k-lhr1-failed');

      await page.click('button[data-action="all-colos"]');
      await until('tiles gone', async () => (await page.locator('#hosts .host').count()) === 0);
    });

    it('says control is unreachable once it is gone, and marks what it shows as old', async (t) => {
      await close();
      await page.locator('body[data-view="unreachable"]').waitFor({ timeout: 60_000 });
      assert.match((await page.locator('#message.error').textContent()) ?? '', /^Control is unreachable \(.+\); retrying\. Shown below is the state as of .+, not current\.$/);
      await shot(t, page, 'control-unreachable');
    });
  });
});
