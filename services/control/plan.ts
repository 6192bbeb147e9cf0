/**
 * Rollout requests and wave planning: the zod schema of `POST /v1/rollouts` and the pure
 * functions that turn a plan into concrete waves of host ids. No I/O here.
 *
 * Plan semantics (documented in the README, "Rollout plans"):
 * - Hosts are ordered by colo round-robin (colos sorted, hosts sorted naturally inside a colo),
 *   so every wave spreads over the colos.
 * - `canary: N` makes the first N hosts wave 0. The rollout goes past the canary wave only when
 *   every canary host converted; any canary failure pauses the rollout (`canary-failed`).
 * - `waves` are CUMULATIVE targets over the whole selection (canary included): `[1, 5, "20%",
 *   "100%"]` means 1 host done after the first wave, 5 after the second, 20 % of the selection
 *   after the third, all after the fourth. A percentage is rounded up (at least one host).
 *   Targets that do not grow are dropped; a final `100%` is implied.
 * - `failureBudget`: how many failed hosts are tolerated (a count, or a percentage of the
 *   selection rounded down). One more failure pauses the rollout (`failure-budget`). After a
 *   resume the budget counts only failures that happen after the resume.
 * - `maxInFlight` (global) and `maxInFlightPerColo`: hosts queued or running a step at once.
 * - `bakeSeconds`: wait between the end of one wave and the start of the next.
 */
import { z } from 'zod';
import { HOST_ID_RE } from '../../shared/protocol/index.js';
import { scError } from '../../shared/errors.js';
import { NAME_RE, parseRef } from '../../shared/names.js';

const percent = z.string().regex(/^(100|[1-9][0-9]?|0?\.[0-9]+|[1-9][0-9]?\.[0-9]+)%$/, 'expected a percentage such as "20%" (0 < P <= 100)');
const count = z.number().int().min(1).max(1_000_000);

/** A plan as given by the caller; every field optional. */
export const planSchema = z.strictObject({
  canary: z.number().int().min(0).max(10_000).default(0),
  waves: z.array(z.union([count, percent])).min(1).max(100).default(['100%']),
  maxInFlight: z.number().int().min(1).max(100_000).default(10),
  maxInFlightPerColo: z.number().int().min(1).max(100_000).optional(),
  failureBudget: z.union([z.number().int().min(0).max(1_000_000), percent.or(z.literal('0%'))]).default(0),
  bakeSeconds: z.number().min(0).max(7 * 86_400).default(0),
});

/** A validated plan, defaults filled in. */
export type Plan = z.infer<typeof planSchema>;

const refSchema = z.string().max(200).refine((s) => {
  try {
    parseRef(s);
    return true;
  } catch {
    return false;
  }
}, 'expected NAME@VERSION');

/** The body of `POST /v1/rollouts`: exactly one of `hosts` or `colos`. */
export const createRolloutSchema = z
  .strictObject({
    base: refSchema,
    target: refSchema,
    hosts: z.array(z.string().regex(HOST_ID_RE, 'bad host id')).min(1).max(100_000).optional(),
    colos: z.array(z.string().regex(NAME_RE, 'bad colo name')).min(1).max(1000).optional(),
    plan: planSchema.default(planSchema.parse({})),
  })
  .refine((b) => (b.hosts ? 1 : 0) + (b.colos ? 1 : 0) === 1, { message: 'give exactly one of hosts or colos', path: ['hosts'] });

/** A validated rollout request. */
export type CreateRolloutRequest = z.infer<typeof createRolloutSchema>;
/** What a caller sends (plan fields optional). */
export type CreateRolloutInput = z.input<typeof createRolloutSchema>;

/** Validates a rollout request; throws SC_ERR_BAD_REQUEST with the zod issues in `details.issues`. */
export function parseCreateRollout(body: unknown): CreateRolloutRequest {
  const r = createRolloutSchema.safeParse(body);
  if (!r.success) {
    throw scError('SC_ERR_BAD_REQUEST', 'invalid rollout request', {
      issues: r.error.issues.slice(0, 20).map((i) => `${i.path.join('.') || '(body)'}: ${i.message}`),
    });
  }
  const b = r.data;
  if (b.hosts && new Set(b.hosts).size !== b.hosts.length) throw scError('SC_ERR_BAD_REQUEST', 'a host appears twice in hosts');
  return b;
}

/** Resolves a count or percentage of `n` hosts. Percentages round up (`mode: 'ceil'`, at least 1) or down. */
export function resolveAmount(v: number | string, n: number, mode: 'ceil' | 'floor'): number {
  if (typeof v === 'number') return Math.min(v, n);
  const p = Number(v.slice(0, -1));
  const exact = (p / 100) * n;
  const r = mode === 'ceil' ? Math.max(1, Math.ceil(exact - 1e-9)) : Math.floor(exact + 1e-9);
  return Math.min(r, n);
}

/** The cumulative host counts after each wave (strictly increasing, ending at `n`). */
export function cumulativeTargets(plan: Pick<Plan, 'canary' | 'waves'>, n: number): number[] {
  const raw = [...(plan.canary > 0 ? [plan.canary] : []), ...plan.waves.map((w) => resolveAmount(w, n, 'ceil')), n];
  const out: number[] = [];
  for (const t of raw) {
    const c = Math.min(t, n);
    if (c > (out.at(-1) ?? 0)) out.push(c);
  }
  return out;
}

/** Natural order for host ids (`h2` before `h10`). */
export function naturalCompare(a: string, b: string): number {
  return a.localeCompare(b, 'en', { numeric: true });
}

/** Orders hosts colo round-robin: colos sorted, hosts sorted naturally inside each colo. */
export function orderHosts(hosts: { host: string; colo: string }[]): { host: string; colo: string }[] {
  const byColo = new Map<string, string[]>();
  for (const h of hosts) byColo.set(h.colo, [...(byColo.get(h.colo) ?? []), h.host]);
  const colos = [...byColo.keys()].sort(naturalCompare);
  for (const c of colos) byColo.get(c)!.sort(naturalCompare);
  const out: { host: string; colo: string }[] = [];
  for (let i = 0; out.length < hosts.length; i++) {
    for (const c of colos) {
      const h = byColo.get(c)![i];
      if (h !== undefined) out.push({ host: h, colo: c });
    }
  }
  return out;
}

/** Splits the ordered hosts into waves (arrays of host ids) by the plan's cumulative targets. */
export function planWaves(hosts: { host: string; colo: string }[], plan: Pick<Plan, 'canary' | 'waves'>): string[][] {
  const ordered = orderHosts(hosts);
  const targets = cumulativeTargets(plan, ordered.length);
  const waves: string[][] = [];
  let from = 0;
  for (const t of targets) {
    waves.push(ordered.slice(from, t).map((h) => h.host));
    from = t;
  }
  return waves;
}

/** The failure budget as a host count. */
export function resolveBudget(plan: Pick<Plan, 'failureBudget'>, n: number): number {
  return resolveAmount(plan.failureBudget, n, 'floor');
}
