/**
 * The dashboard in a real browser (chromium through playwright-core) during a rollout of sim
 * hosts: hosts appear, move to "converted", the rollout shows its waves and steps; the token is
 * entered in the page, Pause and Resume are clicked and the state changes; screenshots go to
 * test-results/.
 */
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { Browser, Page } from 'playwright-core';
import { launchChromium, noChromium } from './chromium.js';
import { type ControlFleet, startControlFleet } from '../integration/control-fleet-fixture.js';


describe('dashboard', { skip: noChromium }, () => {
  let cf: ControlFleet;
  let browser: Browser;
  let page: Page;

  before(async () => {
    cf = await startControlFleet({
      colos: [
        { name: 'ams1', hosts: 3 },
        { name: 'fra1', hosts: 3 },
      ],
    });
    browser = await launchChromium();
    page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  });
  after(async () => {
    await browser?.close();
    await cf?.cleanup();
  });

  const tile = (host: string) => page.locator(`.host[data-host="${host}"]`);

  it('shows hosts converting, and pauses and resumes a rollout from the page', async () => {
    await page.goto(cf.control.url);
    assert.equal(await page.title(), 'stagecoach control');
    // Reads need a token: without one the page says so and shows no host.
    await page.locator('body[data-auth="missing"]').waitFor();
    await page.locator('#message.info', { hasText: 'Paste a control token' }).waitFor();
    assert.equal(await page.locator('.host').count(), 0);
    // A read-only token shows the fleet and says it is read-only.
    await page.fill('#token', cf.readToken);
    await page.click('#token-save');
    await page.locator('#whoami', { hasText: 'as viewer (read-only)' }).waitFor();
    // Inventory: every host and both colos with their stage.
    await page.locator('.host').nth(5).waitFor();
    assert.equal(await page.locator('.host').count(), 6);
    assert.equal(await tile('ams1-h1').getAttribute('data-state'), 'idle');
    await page.locator('.colo[data-colo="fra1"] .stage').waitFor();

    // The write token goes into sessionStorage and identifies us.
    await page.fill('#token', cf.token);
    await page.click('#token-save');
    await page.locator('#whoami', { hasText: 'as ops' }).waitFor();

    const created = await cf.client.createRollout({
      base: `${cf.fleet.base.name}@${cf.fleet.base.version}`,
      target: `${cf.fleet.target.name}@${cf.fleet.target.version}`,
      colos: ['ams1', 'fra1'],
      // The bake outlasts the page's clicks even on a loaded machine (the pause must land in it).
      plan: { waves: [3, '100%'], maxInFlight: 3, bakeSeconds: 45 },
    });
    const id = created.spec.id;
    const card = page.locator(`.rollout[data-rollout="${id}"]`);
    await card.waitFor();
    // The first wave converts, live.
    for (const h of created.spec.waves[0]) await page.locator(`.host[data-host="${h}"][data-state="converted"]`).waitFor({ timeout: 120_000 });
    await card.locator('.wave[data-wave="0"] .steps span.completed').first().waitFor();

    // Pause from the page during the bake.
    await card.locator('button[data-action="pause"]:not([disabled])').click();
    await page.locator(`.rollout[data-rollout="${id}"][data-state="paused"]`).waitFor();
    assert.match((await card.locator('.badge').textContent()) ?? '', /paused \(operator\)/);
    assert.equal((await cf.reader.rollout(id)).status.state, 'paused');
    for (const h of created.spec.waves[1]) assert.equal(await tile(h).getAttribute('data-state'), 'pending');
    mkdirSync('test-results', { recursive: true });
    await page.screenshot({ path: join('test-results', 'dashboard-paused.png'), fullPage: true });

    // Resume from the page: the second wave converts.
    await card.locator('button[data-action="resume"]:not([disabled])').click();
    for (const h of created.spec.waves[1]) await page.locator(`.host[data-host="${h}"][data-state="converted"]`).waitFor({ timeout: 120_000 });
    await page.locator(`.rollout[data-rollout="${id}"][data-state="completed"]`).waitFor({ timeout: 30_000 });
    await page.screenshot({ path: join('test-results', 'dashboard-completed.png'), fullPage: true });

    // The audit table shows who did it.
    await page.locator('#audit tbody tr', { hasText: 'rollout.resume' }).waitFor();
    const audit = await cf.reader.audit();
    assert.deepEqual(
      audit.map((a) => `${a.action} ${a.token}`).reverse(),
      ['rollout.create ops', 'rollout.pause ops', 'rollout.resume ops'],
    );
  });
});
