/**
 * The fault-injecting upstream (fault-upstream.ts) under the names stage tests and benchmarks
 * use for it, as a controllable origin; plus small HTTP helpers for those tests (`httpGet`,
 * `metricValue`, `waitFor`).
 */
import { request } from 'node:http';

export {
  type BlobRequest,
  type Fault,
  type FaultUpstream as TestOrigin,
  type FaultUpstreamOptions as TestOriginOptions,
  startFaultUpstream as startTestOrigin,
} from './fault-upstream.js';

/** The outcome of `httpGet`: `complete` is false when the body ended short of Content-Length or the socket broke. */
export interface GetResult {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
  complete: boolean;
}

/**
 * GET (or HEAD) with node:http, never throwing for HTTP statuses or a broken body: a response
 * aborted mid-body resolves with `complete: false` and the bytes received.
 */
export function httpGet(url: string, headers: Record<string, string> = {}, method = 'GET'): Promise<GetResult> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method, headers, agent: false }, (res) => {
      const parts: Buffer[] = [];
      let settled = false;
      const finish = (ok: boolean) => {
        if (settled) return;
        settled = true;
        const body = Buffer.concat(parts);
        const cl = res.headers['content-length'];
        const complete = ok && (method === 'HEAD' || cl === undefined || Number(cl) === body.length);
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body, complete });
      };
      res.on('data', (c: Buffer) => parts.push(c));
      res.on('end', () => finish(!res.aborted));
      res.on('aborted', () => finish(false));
      res.on('error', () => finish(false));
      res.on('close', () => finish(res.complete));
    });
    req.on('error', reject);
    req.end();
  });
}

/** Sums every sample of metric `name` (any labels) in Prometheus text. */
export function metricValue(text: string, name: string): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith(`${name} `) || line.startsWith(`${name}{`)) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return sum;
}

/** Polls `cond` every 20 ms until it is truthy; throws after `ms`. */
export async function waitFor<T>(cond: () => T | Promise<T>, ms = 20_000, what = 'condition'): Promise<NonNullable<T>> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v as NonNullable<T>;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
