/**
 * The control plane's HTTP API (express 5): inventory, rollouts, host operations, audit, live
 * events (SSE), the dashboard (static files) and bull-board under `/queues`. Every read needs a
 * token, read-only or write (unless `openReads`); every write needs a write token and is recorded
 * in the audit log (401 without a token, 403 wrong or read-only; compared in constant time).
 * `/healthz` and the dashboard's static files are open, `/metrics` too unless `metricsToken`.
 * bull-board also takes HTTP Basic credentials (any user name, the token as password), so a
 * browser can send them with the requests its own page makes. Errors become responses only in
 * shared/http.ts `errorHandler`.
 */
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import express, { type NextFunction, type Request, type RequestHandler, type Response } from 'express';
import { isScError, scError } from '../../shared/errors.js';
import { errorHandler, notFoundHandler, tokenMatches } from '../../shared/http.js';
import type { Logger } from '../../shared/log.js';
import { Gauge, httpMetrics, type Registry } from '../../shared/metrics.js';
import { HOST_ID_RE } from '../../shared/protocol/index.js';
import type { AuditLog } from './audit.js';
import type { NamedToken } from './config.js';
import type { Inventory } from './inventory.js';
import { parseCreateRollout } from './plan.js';
import type { Board } from './queues.js';
import type { HostOp, RolloutEngine } from './rollouts/index.js';

/** Directory of the dashboard's static files. */
export const DASHBOARD_DIR = join(dirname(fileURLToPath(import.meta.url)), 'dashboard');

/** Everything the HTTP layer needs. */
export interface ControlAppDeps {
  engine: RolloutEngine;
  inventory: Inventory;
  audit: AuditLog;
  board: Board | null;
  /** Write tokens (they read too). */
  tokens: NamedToken[];
  /** Read-only tokens. */
  readTokens?: NamedToken[];
  /** Reads without a token (a lab). */
  openReads?: boolean;
  /** `/metrics` needs a token. */
  metricsToken?: boolean;
  registry: Registry;
  log: Logger;
  redisReady: () => boolean;
}

const ACTOR_RE = /^[A-Za-z0-9_.@+ -]{1,64}$/;

/** What a token may do. */
export type TokenRole = 'read' | 'write';

/** A named token with its role. */
export interface RoleToken extends NamedToken {
  role: TokenRole;
}

/** The credential of a request: `Bearer TOKEN`, or with `basic`, HTTP Basic with the token as password. */
function credential(h: string | undefined, basic: boolean): string | null {
  if (!h) return null;
  const bearer = /^Bearer\s+(\S+)\s*$/i.exec(h);
  if (bearer) return bearer[1];
  const b = basic ? /^Basic\s+([A-Za-z0-9+/=]{1,8192})\s*$/i.exec(h) : null;
  if (!b) return null;
  const text = Buffer.from(b[1], 'base64').toString('utf8');
  const i = text.indexOf(':');
  return i >= 0 && i < text.length - 1 ? text.slice(i + 1) : null;
}

/**
 * Who is calling, for a request that needs `need`: `res.locals.token` (token name),
 * `res.locals.role` and `res.locals.actor` (X-Actor or the token name). 401 without a
 * credential (with a Basic challenge when `basic`), 403 for an unknown token or a read-only
 * token on a write.
 */
export function requireRole(tokens: readonly RoleToken[], need: TokenRole, opts: { basic?: boolean } = {}): RequestHandler {
  return (req, res, next) => {
    const c = credential(req.headers.authorization, opts.basic ?? false);
    if (!c) {
      if (opts.basic) res.set('WWW-Authenticate', 'Basic realm="stagecoach control", charset="UTF-8"');
      return next(scError('SC_ERR_UNAUTHORIZED', need === 'write' ? 'this needs a write token' : 'reads need a token (read-only or write)'));
    }
    let found: RoleToken | null = null;
    // Compare with every token (no early exit), so timing does not tell which one matched.
    for (const t of tokens) if (tokenMatches(c, t.token) && !found) found = t;
    if (!found) return next(scError('SC_ERR_FORBIDDEN'));
    if (need === 'write' && found.role !== 'write') return next(scError('SC_ERR_FORBIDDEN', `token ${found.name} is read-only`));
    const actor = req.headers['x-actor'];
    if (actor !== undefined && (typeof actor !== 'string' || !ACTOR_RE.test(actor))) {
      return next(scError('SC_ERR_BAD_REQUEST', 'X-Actor must be 1-64 characters of [A-Za-z0-9_.@+ -]'));
    }
    res.locals.token = found.name;
    res.locals.role = found.role;
    res.locals.actor = typeof actor === 'string' ? actor : found.name;
    next();
  };
}

function intParam(v: unknown, def: number, max: number): number {
  if (v === undefined) return def;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw scError('SC_ERR_BAD_REQUEST', 'limit must be a positive integer');
  return Math.min(n, max);
}

function hostParam(req: Request): string {
  const id = req.params.id as string;
  if (!HOST_ID_RE.test(id)) throw scError('SC_ERR_BAD_NAME', 'bad host id', { host: String(id).slice(0, 80) });
  return id;
}

/** Builds the express app. */
export function createControlApp(d: ControlAppDeps): express.Express {
  const { engine, inventory, audit, log } = d;
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);
  const http = httpMetrics(d.registry, 'control');
  new Gauge({
    name: 'control_rollouts_active',
    help: 'Rollouts not yet finished',
    registers: [d.registry],
    collect() {
      this.set(engine.activeIds().length);
    },
  });

  new Gauge({
    name: 'control_reports_read_total',
    help: 'Step reports read from the agents\' reports stream by this instance (a counter)',
    registers: [d.registry],
    collect() {
      this.set(engine.stats().reportsApplied);
    },
  });
  new Gauge({
    name: 'control_rollout_hosts',
    help: 'Hosts of active rollouts by status (pending, queued, running, converted, failed, aborted, skipped, inFlight, rescued)',
    labelNames: ['status'] as const,
    registers: [d.registry],
    collect() {
      for (const [k, v] of Object.entries(engine.stats().hosts)) this.set({ status: k }, v);
    },
  });

  app.use((req, res, next) => {
    res.on('finish', () => {
      const route = (req.route?.path as string | undefined) ?? (req.path.startsWith('/queues') ? '/queues' : 'other');
      http.requests.inc({ method: req.method, route, status: String(res.statusCode) });
    });
    next();
  });

  const all: RoleToken[] = [...d.tokens.map((t) => ({ ...t, role: 'write' as const })), ...(d.readTokens ?? []).map((t) => ({ ...t, role: 'read' as const }))];
  const auth = requireRole(all, 'write');
  const open: RequestHandler = (_req, _res, next) => next();
  const reader = requireRole(all, 'read');
  const readAuth = d.openReads ? open : reader;
  const isRead = (req: Request) => req.method === 'GET' || req.method === 'HEAD';
  // Every read of the API; writes carry `auth` on their routes.
  app.use('/v1', (req, res, next) => (isRead(req) ? readAuth(req, res, next) : next()));
  const json = express.json({ limit: '4mb' });
  const noStore: RequestHandler = (_req, res, next) => {
    res.set('Cache-Control', 'no-store');
    next();
  };
  const record = async (res: Response, req: Request, action: string, target: string, details?: Record<string, unknown>) => {
    await audit.append({ actor: res.locals.actor, token: res.locals.token, action, target, ...(details ? { details } : {}), remote: req.ip });
  };

  app.get('/healthz', noStore, (_req, res) => {
    res.json({ ok: d.redisReady(), role: 'control', activeRollouts: engine.activeIds().length });
  });
  app.get('/metrics', d.metricsToken ? reader : open, async (_req, res) => {
    res.set('Content-Type', d.registry.contentType).send(await d.registry.metrics());
  });

  // ------------------------------------------------------------- inventory
  app.get('/v1/hosts', noStore, async (req, res) => {
    const colo = req.query.colo;
    if (colo !== undefined && (typeof colo !== 'string' || !/^[a-z0-9][a-z0-9._-]{0,63}$/.test(colo))) throw scError('SC_ERR_BAD_NAME', 'bad colo');
    const hosts = await inventory.hosts(colo as string | undefined);
    for (const h of hosts) {
      h.work = engine.workOf(h.hostId);
      h.last = engine.lastResultOf(h.hostId);
    }
    res.json({ hosts });
  });
  app.get('/v1/hosts/:id', noStore, async (req, res) => {
    const id = hostParam(req);
    const h = (await inventory.hosts()).find((x) => x.hostId === id);
    if (!h) throw scError('SC_ERR_NOT_FOUND', `host ${id} is not registered`);
    h.work = engine.workOf(id);
    h.last = engine.lastResultOf(id);
    res.json(h);
  });
  app.get('/v1/colos', noStore, async (_req, res) => {
    res.json({ colos: await inventory.colos() });
  });

  // ------------------------------------------------------------- rollouts
  app.get('/v1/rollouts', noStore, async (req, res) => {
    res.json({ rollouts: await engine.list(intParam(req.query.limit, 50, 500)) });
  });
  app.post('/v1/rollouts', auth, json, async (req, res) => {
    const body = parseCreateRollout(req.body);
    const r = await engine.create(body, res.locals.actor);
    await record(res, req, 'rollout.create', r.spec.id, {
      base: body.base,
      target: body.target,
      ...(body.hosts ? { hosts: body.hosts.length } : { colos: body.colos }),
      plan: r.spec.plan,
    });
    res.status(201).json(r);
  });
  app.get('/v1/rollouts/:id', noStore, async (req, res) => {
    res.json(await engine.get(String(req.params.id), { logs: req.query.logs !== '0' }));
  });
  for (const verb of ['pause', 'resume', 'abort'] as const) {
    app.post(`/v1/rollouts/:id/${verb}`, auth, async (req, res) => {
      const id = String(req.params.id);
      if (!/^r-[a-z0-9-]{1,60}$/.test(id)) throw scError('SC_ERR_NOT_FOUND', 'no such rollout');
      const r = await engine[verb](id);
      await record(res, req, `rollout.${verb}`, id);
      res.json(r);
    });
  }

  // ------------------------------------------------------------- host operations
  for (const kind of ['rescue', 'reinstall', 'install'] as const) {
    app.post(`/v1/hosts/:id/${kind}`, auth, json, async (req, res) => {
      const id = hostParam(req);
      const bundle = (req.body as { bundle?: unknown } | undefined)?.bundle;
      if (kind === 'install' && typeof bundle !== 'string') throw scError('SC_ERR_BAD_REQUEST', 'install needs {"bundle": "NAME@VERSION"}');
      const op: HostOp = await engine.hostOp(id, kind, res.locals.actor, bundle as string | undefined);
      await record(res, req, `host.${kind}`, id, { op: op.id, ...(op.bundle ? { bundle: op.bundle } : {}) });
      res.status(202).json(op);
    });
  }
  app.get('/v1/ops', noStore, async (req, res) => {
    const host = req.query.host;
    if (host !== undefined && (typeof host !== 'string' || !HOST_ID_RE.test(host))) throw scError('SC_ERR_BAD_NAME', 'bad host id');
    res.json({ ops: await engine.listOps(intParam(req.query.limit, 50, 500), host as string | undefined) });
  });
  app.get('/v1/ops/:id', noStore, async (req, res) => {
    res.json(await engine.getOp(String(req.params.id)));
  });

  // ------------------------------------------------------------- audit, identity, events
  app.get('/v1/audit', noStore, async (req, res) => {
    const before = req.query.before;
    if (before !== undefined && (typeof before !== 'string' || !/^\d{1,20}-\d{1,20}$/.test(before))) throw scError('SC_ERR_BAD_REQUEST', 'bad before id');
    res.json({ entries: await audit.list(intParam(req.query.limit, 100, 1000), before as string | undefined) });
  });
  app.get('/v1/whoami', noStore, reader, (_req, res) => {
    res.json({ token: res.locals.token, role: res.locals.role, actor: res.locals.actor });
  });
  app.get('/v1/events', (_req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-store', Connection: 'keep-alive', 'X-Accel-Buffering': 'no' });
    res.write('retry: 2000\n\n');
    let pending = new Map<string, { kind: string; id: string }>();
    let timer: NodeJS.Timeout | null = null;
    const flush = () => {
      timer = null;
      for (const ev of pending.values()) res.write(`event: change\ndata: ${JSON.stringify(ev)}\n\n`);
      pending = new Map();
    };
    const onChange = (ev: { kind: string; id: string }) => {
      pending.set(`${ev.kind}:${ev.id}`, ev);
      timer ??= setTimeout(flush, 200);
    };
    const ping = setInterval(() => res.write(': ping\n\n'), 15_000);
    engine.on('change', onChange);
    res.on('close', () => {
      engine.off('change', onChange);
      clearInterval(ping);
      if (timer) clearTimeout(timer);
    });
  });

  // ------------------------------------------------------------- dashboard and bull-board
  if (d.board) {
    // bull-board's page and API: reads with any token, its job actions (retry, clean…) with a write token.
    const boardRead = d.openReads ? open : requireRole(all, 'read', { basic: true });
    const boardWrite = requireRole(all, 'write', { basic: true });
    app.use('/queues', (req, res, next) => (isRead(req) ? boardRead(req, res, next) : boardWrite(req, res, next)), d.board.adapter.getRouter() as RequestHandler);
  }
  app.use(express.static(DASHBOARD_DIR, { index: 'index.html', maxAge: 0 }));

  app.use(notFoundHandler());
  app.use((err: unknown, req: Request, res: Response, next: NextFunction) => {
    // Redis outages surface as driver errors: answer 503 with a stable code.
    const m = (err as Error)?.message ?? '';
    if (!isScError(err) && /Connection is closed|ECONNREFUSED|MaxRetriesPerRequest|Stream isn't writeable/.test(m)) {
      return errorHandler(log)(scError('SC_ERR_REDIS_UNAVAILABLE', 'Redis is not reachable'), req, res, next);
    }
    return errorHandler(log)(err, req, res, next);
  });
  return app;
}
