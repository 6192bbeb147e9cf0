/**
 * A stage behind nginx: nginx sends committed blobs from the stage's cache files with sendfile,
 * and everything else stays the stage's own answer.
 *
 * How a request goes: nginx proxies every request to the stage, adding `Stagecoach-Accel: 1`
 * (shared/http/read-api.ts ACCEL_HEADER). For a whole-blob GET of a committed blob, the stage
 * answers with the blob's status and headers, an empty body and
 * `X-Accel-Redirect: <accelRedirect>/blobs/<hex>`. nginx then sends the file from an internal
 * location (`alias <cache>/blobs/<hex>`) and adds the ETag from the path. Everything else is
 * the stage's own answer, relayed unbuffered:
 * - misses, streamed from their fill with the last byte held back until the digest is verified;
 * - ranges and conditional requests (the router never hands those off);
 * - HEAD, manifests, listings, the relay, prefetch, health, metrics, and every error (JSON with
 *   its code).
 *
 * The integrity rule is unchanged: only committed blobs are handed off, and a blob is committed
 * only once its sha256 matched. A handed-off blob stays pinned for ACCEL_PIN_MS after the
 * stage's answer, so that eviction cannot unlink it before nginx opens it. Once nginx has it
 * open, an unlink does not cut the transfer.
 *
 * `renderNginxSite` writes the http-context part (an `upstream` and a `server`) for a system
 * nginx's conf.d; `stagecoach stage --nginx-conf HOST:PORT` prints it from the stage's config.
 * `renderNginxMain` wraps it into a whole nginx.conf for an nginx run apart (tests, benchmarks).
 */
import { resolve } from 'node:path';
import type { Digest } from '../../shared/digest.js';
import { parseListen } from '../../shared/config.js';
import { scError } from '../../shared/errors.js';
import type { StageConfig } from './config.js';

/** How long a handed-off blob stays pinned after the stage's answer, ms. */
export const ACCEL_PIN_MS = 30_000;

/** The `X-Accel-Redirect` path of committed blob `digest` (`accelRedirect` is the prefix). */
export function accelTarget(prefix: string, digest: Digest): string {
  return `${prefix}/blobs/${digest.slice('sha256:'.length)}`;
}

/** Paths and addresses written into the config: no quoting, spaces or nginx variables. */
const PLAIN = /^[A-Za-z0-9._/+:@-]+$/;

function plain(what: string, v: string): string {
  if (!PLAIN.test(v)) throw scError('SC_ERR_BAD_CONFIG', `${what} ${JSON.stringify(v)} cannot go into an nginx config: use only [A-Za-z0-9._/+:@-]`);
  return v;
}

/** HOST:PORT as nginx writes it (`[v6]:port`), from parsed parts of plain characters only. */
function hostPort(what: string, host: string, port: number): string {
  if (!/^[A-Za-z0-9.:-]+$/.test(host)) throw scError('SC_ERR_BAD_CONFIG', `${what} host ${JSON.stringify(host)} cannot go into an nginx config`);
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

/** Where nginx reaches the stage: its listen address, with a wildcard host made loopback. */
function stageAddress(listen: string): string {
  const { host, port } = parseListen(listen);
  if (port === 0) throw scError('SC_ERR_BAD_CONFIG', 'the stage behind nginx needs a fixed port (listen HOST:PORT, not port 0)');
  const h = host === '0.0.0.0' ? '127.0.0.1' : host === '::' ? '::1' : host;
  return hostPort('listen', h, port);
}

/** What the site needs besides the stage's config. */
export interface NginxSiteOptions {
  /** HOST:PORT nginx listens on for hosts and child stages. */
  front: string;
}

/**
 * The http-context nginx config fronting the stage of `config`, which must have
 * `accelRedirect`. With the stage's `tlsCert`/`tlsKey`, nginx listens with the same certificate
 * and reaches the stage over TLS on its own address (loopback, not verified). Throws
 * SC_ERR_BAD_CONFIG when a path or address cannot be written into it.
 */
export function renderNginxSite(config: StageConfig, opts: NginxSiteOptions): string {
  if (!config.accelRedirect) throw scError('SC_ERR_BAD_CONFIG', 'the stage behind nginx needs accelRedirect (--accel-redirect /_stagecoach)');
  const front = parseListen(opts.front);
  const tls = Boolean(config.tlsCert && config.tlsKey);
  const name = `stagecoach_stage_${config.colo.replace(/[^A-Za-z0-9_]/g, '_')}`;
  const blobs = plain('cache', resolve(config.cache, 'blobs'));
  const prefix = plain('accelRedirect', config.accelRedirect);
  const lines = [
    `# nginx in front of the stagecoach stage of colo ${config.colo}: \`stagecoach stage --nginx-conf ${opts.front}\`.`,
    '# nginx sends committed blobs from the stage cache with sendfile (X-Accel-Redirect). Every',
    '# other answer (misses streamed from their fill, ranges, manifests, the relay, errors) is',
    "# the stage's own, passed through unbuffered. The cache's files must be readable by nginx's user.",
    `upstream ${name} {`,
    `  server ${stageAddress(config.listen)};`,
    '  keepalive 32;',
    '}',
    'server {',
    `  listen ${hostPort('front', front.host, front.port)}${tls ? ' ssl' : ''};`,
    ...(tls ? [`  ssl_certificate ${plain('tlsCert', resolve(config.tlsCert ?? ''))};`, `  ssl_certificate_key ${plain('tlsKey', resolve(config.tlsKey ?? ''))};`] : []),
    '  server_tokens off;',
    '  client_max_body_size 1m;',
    '  sendfile on;',
    '  tcp_nopush on;',
    '  location / {',
    `    proxy_pass ${tls ? 'https' : 'http'}://${name};`,
    '    proxy_http_version 1.1;',
    '    proxy_set_header Connection "";',
    '    proxy_set_header Host $http_host;',
    '    proxy_set_header Stagecoach-Accel 1;',
    // Unbuffered, nginx relays through one buffer of proxy_buffer_size per request: small
    // ones cost a read and a write per 4 KiB of a streamed fill.
    '    proxy_buffering off;',
    '    proxy_buffer_size 128k;',
    '    proxy_buffers 4 128k;',
    '    proxy_busy_buffers_size 128k;',
    '    proxy_request_buffering off;',
    // The relay's long polls last up to relayMaxWaitSec (at most 300 s).
    '    proxy_read_timeout 330s;',
    '    proxy_send_timeout 330s;',
    ...(tls ? ['    proxy_ssl_verify off;'] : []),
    '  }',
    `  location ~ "^${prefix.replace(/\./g, '\\.')}/blobs/([0-9a-f]{64})$" {`,
    '    internal;',
    `    alias ${blobs}/$1;`,
    // The stage already answered conditionals and ranges: nginx must not answer them again.
    '    etag off;',
    '    if_modified_since off;',
    '    max_ranges 0;',
    '    types { }',
    '    default_type application/octet-stream;',
    '    add_header ETag "\\"sha256:$1\\"";',
    '    add_header Last-Modified "";',
    '  }',
    '}',
  ];
  return `${lines.join('\n')}\n`;
}

/**
 * A whole nginx.conf around `site` for an nginx run apart from the system's (`nginx -p DIR -c
 * DIR/nginx.conf`): one worker, pid, logs and temp files under `dir`. `user` is the workers'
 * user when nginx starts as root (default nginx's own, `nobody`).
 */
export function renderNginxMain(dir: string, site: string, user?: string): string {
  const d = plain('dir', resolve(dir));
  return [
    ...(user ? [`user ${plain('user', user)};`] : []),
    'worker_processes 1;',
    `pid ${d}/nginx.pid;`,
    `error_log ${d}/error.log warn;`,
    'events { worker_connections 4096; }',
    'http {',
    '  access_log off;',
    `  client_body_temp_path ${d}/client_body;`,
    `  proxy_temp_path ${d}/proxy_temp;`,
    `  fastcgi_temp_path ${d}/fastcgi_temp;`,
    `  uwsgi_temp_path ${d}/uwsgi_temp;`,
    `  scgi_temp_path ${d}/scgi_temp;`,
    ...site
      .trimEnd()
      .split('\n')
      .map((l) => `  ${l}`),
    '}',
    '',
  ].join('\n');
}
