/**
 * The step queue consumer (shared/protocol/consumer.ts) against real Redis, a unique BullMQ prefix
 * per test: take and complete; a retryable failure goes back to wait with its attempt counted,
 * a permanent one to the failed set with the encoded reason; a consumer closed without releasing
 * its job is re-adopted by the same token and not by another; renewal keeps a job active past
 * its lock duration, and a job whose holder stopped renewing comes back through the stalled
 * check. Also the failure codec, and that failureOf reads every reason as control's codeInReason.
 */
import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { type JobsOptions, Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import { ERRORS } from '../../shared/errors.js';
import { silentLogger } from '../../shared/log.js';
import {
  encodeFailure,
  FAILURE_MESSAGE_MAX,
  failureOf,
  isFailureCode,
  lockRenewalIntervalMs,
  StepQueueConsumer,
} from '../../shared/protocol/index.js';
import { createRedis } from '../../shared/redis.js';
import { deletePrefix, until } from '../helpers/fleet.js';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const Q = 'host.h1';
const A = 'agent:h1';
const B = 'relay:c1';

describe('step queue consumer', () => {
  let redis: Redis;
  let prefix: string;
  let queue: Queue;
  let consumers: StepQueueConsumer[];

  beforeEach(async () => {
    prefix = `t-consumer-${randomUUID()}`;
    redis = createRedis(REDIS_URL, { forBullmq: true, name: 'step-consumer-test' });
    queue = new Queue(Q, { connection: redis, prefix });
    consumers = [];
  });
  afterEach(async () => {
    for (const c of consumers) await c.close();
    await queue.close();
    await deletePrefix(redis, prefix);
    await redis.quit();
  });

  const open = async (token: string, lockDurationMs = 30_000, stalledIntervalMs = 30_000) => {
    const c = new StepQueueConsumer({ queue: Q, token, connection: redis, prefix, lockDurationMs, stalledIntervalMs, maxStalledCount: 10, logger: silentLogger });
    consumers.push(c);
    await c.open();
    return c;
  };
  const add = (id: string, opts: JobsOptions = {}) => queue.add('fetch', { payload: { host: 'h1' } }, { jobId: id, attempts: 3, ...opts });
  const lockOf = (id: string) => redis.get(`${prefix}:${Q}:${id}:lock`);

  it('takes a job under its token and completes it', async () => {
    const c = await open(A);
    await add('r1.0.fetch');
    const j = await c.next();
    assert.equal(j?.id, 'r1.0.fetch');
    assert.equal(await queue.getJobState(j.id!), 'active');
    assert.equal(await lockOf(j.id!), A);
    c.hold(j, () => assert.fail('the lock is not lost'));
    assert.equal(c.heldCount, 1);
    await c.complete(j, { bytes: 42 });
    assert.equal(c.heldCount, 0);
    assert.equal(await queue.getJobState(j.id!), 'completed');
    assert.deepEqual((await queue.getJob(j.id!))?.returnvalue, { bytes: 42 });
  });

  it('a retryable failure goes back to wait with the attempt counted, until attempts run out', async () => {
    const c = await open(A);
    await add('r1.0.fetch', { attempts: 2 });
    const j1 = (await c.next())!;
    assert.deepEqual(await c.fail(j1, { code: 'SC_ERR_UPSTREAM', message: 'stage answered 502' }, false), { retry: true });
    assert.equal(await queue.getJobState(j1.id!), 'waiting');
    const stored = (await queue.getJob(j1.id!))!;
    assert.equal(stored.attemptsMade, 1);
    assert.deepEqual(failureOf(stored.failedReason), { code: 'SC_ERR_UPSTREAM', message: 'stage answered 502' });

    const j2 = (await c.next())!;
    assert.equal(j2.id, j1.id);
    assert.deepEqual(await c.fail(j2, { code: 'SC_ERR_UPSTREAM', message: 'again' }, false), { retry: false });
    assert.equal(await queue.getJobState(j2.id!), 'failed');
    assert.equal((await queue.getJob(j2.id!))!.attemptsMade, 2);
  });

  it('a retryable failure with a backoff waits in the delayed set', async () => {
    const c = await open(A);
    await add('r1.0.fetch', { backoff: { type: 'fixed', delay: 60_000 } });
    const j = (await c.next())!;
    assert.deepEqual(await c.fail(j, { code: 'SC_ERR_TIMEOUT', message: 'slow' }, false), { retry: true });
    assert.equal(await queue.getJobState(j.id!), 'delayed');
  });

  it('a permanent failure goes to the failed set with the encoded reason', async () => {
    const c = await open(A);
    await add('r1.0.fetch');
    const j = (await c.next())!;
    c.hold(j, () => assert.fail('the lock is not lost'));
    const failure = { code: 'SC_ERR_DIGEST_MISMATCH', message: 'blob sha256:ab… does not match: got sha256:cd…' };
    assert.deepEqual(await c.fail(j, failure, true), { retry: false });
    assert.equal(c.heldCount, 0);
    assert.deepEqual(
      (await queue.getFailed()).map((x) => x.id),
      [j.id],
    );
    const stored = (await queue.getJob(j.id!))!;
    assert.equal(stored.attemptsMade, 1);
    assert.equal(stored.failedReason, encodeFailure(failure));
    assert.equal(stored.failedReason, `${failure.code}: ${failure.message}`);
    assert.deepEqual(failureOf(stored.failedReason), failure);
  });

  it('a bad failure code is refused before the job is touched', async () => {
    const c = await open(A);
    await add('r1.0.fetch');
    const j = (await c.next())!;
    await assert.rejects(c.fail(j, { code: 'ENOENT', message: 'x' }, true), { code: 'SC_ERR_INTERNAL' });
    assert.equal(await queue.getJobState(j.id!), 'active');
    assert.equal(await lockOf(j.id!), A);
  });

  it('a consumer closed without releasing its job: the same token re-adopts it, another does not', async () => {
    const first = await open(A);
    await add('r1.0.fetch');
    const j = (await first.next())!;
    first.hold(j, () => {});
    await first.close();
    assert.equal(await first.next(), undefined, 'a closed consumer takes nothing');
    assert.equal(await queue.getJobState(j.id!), 'active');

    const other = await open(B);
    assert.deepEqual(await other.readopt(), []);
    assert.equal(await lockOf(j.id!), A, 'another token leaves the lock alone');

    const again = await open(A);
    const adopted = await again.readopt();
    assert.deepEqual(
      adopted.map((x) => x.id),
      [j.id],
    );
    again.hold(adopted[0], () => assert.fail('the lock is not lost'));
    await again.complete(adopted[0], {});
    assert.equal(await queue.getJobState(j.id!), 'completed');
  });

  it('renewal keeps a held job active well past its lock duration', async () => {
    const lockMs = 1000;
    const c = await open(A, lockMs, 250);
    assert.equal(c.renewalIntervalMs, lockRenewalIntervalMs(lockMs));
    await add('r1.0.fetch');
    const j = (await c.next())!;
    let lost = false;
    c.hold(j, () => {
      lost = true;
    });
    // Behaviour, not timing: four lock periods with the stalled check running every quarter.
    await new Promise((r) => setTimeout(r, 4 * lockMs));
    assert.equal(lost, false);
    assert.equal(await queue.getJobState(j.id!), 'active');
    assert.equal(await lockOf(j.id!), A);
    await c.complete(j, {});
    assert.equal(await queue.getJobState(j.id!), 'completed');
  });

  it('the stalled check returns a job whose holder stopped renewing, and another consumer takes it', async () => {
    const lockMs = 1000;
    const holder = await open(A, lockMs, 250);
    await add('r1.0.fetch');
    const j = (await holder.next())!;
    const release = holder.hold(j, () => {});
    release();
    assert.equal(holder.heldCount, 0);
    await until(async () => (await queue.getJobState(j.id!)) === 'waiting', 20 * lockMs, 'the stalled job back in wait');
    const taker = await open(B, lockMs, 250);
    const again = (await taker.next())!;
    assert.equal(again.id, j.id);
    assert.equal(await lockOf(j.id!), B);
    // The former holder cannot finish it any more.
    await assert.rejects(holder.complete(j, {}));
    await taker.complete(again, {});
  });

  it('a held job whose lock another token took is reported lost once and no longer held', async () => {
    const lockMs = 1000;
    const c = await open(A, lockMs, 60_000);
    await add('r1.0.fetch');
    const j = (await c.next())!;
    let lost = 0;
    c.hold(j, () => {
      lost++;
    });
    await redis.set(`${prefix}:${Q}:${j.id}:lock`, 'someone-else', 'PX', 60_000);
    await until(() => lost > 0, 10 * lockMs, 'the lock loss');
    assert.equal(c.heldCount, 0);
    await new Promise((r) => setTimeout(r, 2 * c.renewalIntervalMs));
    assert.equal(lost, 1);
    assert.equal(await lockOf(j.id!), 'someone-else');
  });

  it('next resolves undefined when the consumer closes during the wait', async () => {
    const c = await open(A);
    const pending = c.next();
    await new Promise((r) => setTimeout(r, 100));
    await c.close();
    assert.equal(await pending, undefined);
  });
});

/** control's reading of a failure reason (services/control/queues.ts codeInReason), copied as it is. */
function codeInReason(reason: string | undefined): string | undefined {
  return reason ? /\bSC_ERR_[A-Z_]+\b/.exec(reason)?.[0] : undefined;
}

describe('failure codec', () => {
  it('round-trips every registered code, and caps the message', () => {
    for (const code of Object.keys(ERRORS)) {
      assert.ok(isFailureCode(code), code);
      assert.deepEqual(failureOf(encodeFailure({ code, message: `${code} happened: a: b` })), { code, message: `${code} happened: a: b` });
    }
    assert.deepEqual(failureOf(encodeFailure({ code: 'SC_ERR_X', message: '' })), { code: 'SC_ERR_X', message: '' });
    const long = encodeFailure({ code: 'SC_ERR_STEP_FAILED', message: 'x'.repeat(FAILURE_MESSAGE_MAX + 50) });
    assert.equal(long.length, 'SC_ERR_STEP_FAILED: '.length + FAILURE_MESSAGE_MAX);
    // A cut never ends in half a surrogate pair.
    const emoji = encodeFailure({ code: 'SC_ERR_STEP_FAILED', message: `${'x'.repeat(FAILURE_MESSAGE_MAX - 1)}😀` });
    assert.equal(emoji, `SC_ERR_STEP_FAILED: ${'x'.repeat(FAILURE_MESSAGE_MAX - 1)}`);
  });

  it('refuses codes that are not SC_ERR_[A-Z_]{1,60}', () => {
    for (const code of ['', 'SC_ERR_', 'SC_ERR_lower', 'SC_ERR_X1', 'ERR_X', 'SC_ERR_X: y', ` SC_ERR_X`, `SC_ERR_${'A'.repeat(61)}`]) {
      assert.equal(isFailureCode(code), false, code);
      assert.throws(() => encodeFailure({ code, message: 'm' }), { code: 'SC_ERR_INTERNAL' }, code);
    }
    assert.equal(isFailureCode(`SC_ERR_${'A'.repeat(60)}`), true);
    assert.equal(isFailureCode(undefined), false);
  });

  it('reads reasons not written by encodeFailure as control does', () => {
    assert.equal(failureOf(undefined), null);
    assert.equal(failureOf(''), null);
    assert.equal(failureOf('job stalled more than allowable limit'), null);
    assert.deepEqual(failureOf('not run: child bull:q:1 failed (SC_ERR_TIMEOUT)'), { code: 'SC_ERR_TIMEOUT', message: 'not run: child bull:q:1 failed (SC_ERR_TIMEOUT)' });
    assert.deepEqual(failureOf('SC_ERR_ABORTED'), { code: 'SC_ERR_ABORTED', message: 'SC_ERR_ABORTED' });
    assert.deepEqual(failureOf('SC_ERR_STEP_FAILED: not run: SC_ERR_BOOT_FAILED: no'), { code: 'SC_ERR_STEP_FAILED', message: 'not run: SC_ERR_BOOT_FAILED: no' });
  });

  it("is a drop-in for control's codeInReason: the same code for every reason", () => {
    const fixed = [
      'SC_ERR_X: m',
      'SC_ERR_X:m',
      'SC_ERR_X',
      'xSC_ERR_X',
      'SC_ERR_Xa',
      'SC_ERR_X1 then SC_ERR_Y',
      'SC_ERR_',
      'SC_ERR__',
      'SC_ERR___: m',
      '-SC_ERR_A-B',
      `SC_ERR_${'A'.repeat(200)}: long`,
      'sc_err_x',
      'SC_ERR_É',
      '\nSC_ERR_NL\n',
      'a SC_ERR_ABORTED b',
    ];
    const alphabet = ['SC_ERR_', 'SC_ERR_A', 'A', 'Z', '_', ':', ': ', ' ', 'a', '1', '(', ')', '.', 'é', '\n', '-'];
    const random = Array.from({ length: 5000 }, () => {
      const b = randomBytes(8);
      return Array.from(b, (x) => alphabet[x % alphabet.length]).join('');
    });
    for (const reason of [undefined, '', ...fixed, ...random]) {
      const want = codeInReason(reason);
      const got = failureOf(reason);
      assert.equal(got?.code, want, JSON.stringify(reason));
      assert.equal(got === null, want === undefined, JSON.stringify(reason));
    }
  });
});
