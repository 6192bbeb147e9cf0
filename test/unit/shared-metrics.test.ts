import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Counter, createRegistry } from '../../shared/metrics.js';

test('metrics: the process metrics are collected once per process, each registry labels them as its own', async () => {
  const a = createRegistry('stage', { colo: 'c1' });
  const b = createRegistry('stage', { colo: 'c2' });
  const c = createRegistry('origin');
  // One event-loop sampler, one GC observer, one set of process gauges: the same metric objects.
  for (const name of ['nodejs_eventloop_lag_p99_seconds', 'process_cpu_user_seconds_total', 'nodejs_gc_duration_seconds']) {
    const m = a.getSingleMetric(name);
    assert.ok(m, name);
    assert.equal(b.getSingleMetric(name), m, name);
    assert.equal(c.getSingleMetric(name), m, name);
  }
  // Each registry's own metrics stay its own.
  new Counter({ name: 'stage_things_total', help: 'things', registers: [a] });
  assert.equal(b.getSingleMetric('stage_things_total'), undefined);

  const [ta, tb, tc] = await Promise.all([a.metrics(), b.metrics(), c.metrics()]);
  assert.match(ta, /^process_cpu_user_seconds_total\{component="stage",colo="c1"\} /m);
  assert.match(tb, /^process_cpu_user_seconds_total\{component="stage",colo="c2"\} /m);
  assert.match(tc, /^process_cpu_user_seconds_total\{component="origin"\} /m);
  assert.match(ta, /^nodejs_eventloop_lag_p99_seconds\{component="stage",colo="c1"\} /m);
  assert.match(ta, /^stage_things_total\{component="stage",colo="c1"\} 0$/m);
  assert.doesNotMatch(tb, /stage_things_total/);
});
