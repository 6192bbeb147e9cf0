/**
 * prom-client metrics. Every server owns its own Registry (several servers share a process in
 * tests, the demo and the benchmarks), created here. The process metrics (CPU, memory, handles,
 * event-loop lag, GC) describe the process, not a server: they are collected once per process
 * and registered in every server's registry, where each server's default labels mark them.
 */
import { Counter, Gauge, Histogram, type Metric, Registry, collectDefaultMetrics } from 'prom-client';

export { Counter, Gauge, Histogram, Registry };

/**
 * How often the event-loop lag is sampled, ms. prom-client's default (10 ms) wakes an idle
 * process 100 times a second, about 5 ms of CPU per second; at 100 ms it costs about 1 ms (README,
 * "Idle cost"). A lag worth alerting on is longer than that anyway.
 */
export const EVENT_LOOP_SAMPLE_MS = 100;

/**
 * The process metrics, made on first use. One set per process: each set samples the event loop
 * on a timer of its own (about 0.8 ms of CPU per second at 100 ms, measured), so 50 stages in one
 * process, each with its own set, spent ten times one set's CPU sampling the same loop. The lag
 * histogram is read and reset by each scrape of any registry: it covers the time since the
 * process's last scrape.
 */
let processMetrics: Metric[] | undefined;

function processWide(): Metric[] {
  if (!processMetrics) {
    const r = new Registry();
    collectDefaultMetrics({ register: r, eventLoopMonitoringPrecision: EVENT_LOOP_SAMPLE_MS });
    processMetrics = r.getMetricsAsArray().map((m) => r.getSingleMetric(m.name)!);
  }
  return processMetrics;
}

/** A fresh registry with `component` as a default label and the process metrics. */
export function createRegistry(component: string, labels: Record<string, string> = {}): Registry {
  const r = new Registry();
  r.setDefaultLabels({ component, ...labels });
  for (const m of processWide()) r.registerMetric(m);
  return r;
}

/** The common HTTP counters every server exports. */
export function httpMetrics(r: Registry, prefix: string) {
  return {
    requests: new Counter({
      name: `${prefix}_http_requests_total`,
      help: 'HTTP requests by method, route and status',
      labelNames: ['method', 'route', 'status'] as const,
      registers: [r],
    }),
    bytesOut: new Counter({ name: `${prefix}_bytes_out_total`, help: 'Body bytes sent', labelNames: ['route'] as const, registers: [r] }),
    bytesIn: new Counter({ name: `${prefix}_bytes_in_total`, help: 'Body bytes received', labelNames: ['route'] as const, registers: [r] }),
  };
}
