/**
 * prom-client metrics. Every server owns its own Registry (several servers share a process in
 * tests and in the demo), created here with the default process metrics.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export { Counter, Gauge, Histogram, Registry };

/**
 * How often the event-loop lag is sampled, ms. prom-client's default (10 ms) wakes an idle
 * process 100 times a second, about 5 ms of CPU per second; at 100 ms it costs about 1 ms (README,
 * "Idle cost"). A lag worth alerting on is longer than that anyway.
 */
export const EVENT_LOOP_SAMPLE_MS = 100;

/** A fresh registry with `component` as a default label and the process metrics. */
export function createRegistry(component: string, labels: Record<string, string> = {}): Registry {
  const r = new Registry();
  r.setDefaultLabels({ component, ...labels });
  collectDefaultMetrics({ register: r, eventLoopMonitoringPrecision: EVENT_LOOP_SAMPLE_MS });
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
