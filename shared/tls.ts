/**
 * TLS for every server and client of stagecoach.
 *
 * Servers (origin, stage with its relay, control) listen with TLS when their configuration names
 * a certificate and its key (`tlsCert`, `tlsKey`: PEM files; both or neither). Plain HTTP stays
 * for loopback and tests.
 *
 * Clients trust the system's CA store, plus the private CAs the process was given: `--ca FILE`
 * (the CLI, once per process), a service's `ca` setting, or `STAGECOACH_CA` (files separated by
 * commas). Trust is process-wide, as Node's own NODE_EXTRA_CA_CERTS is, because every client of
 * a process talks to the same fleet; each HTTP client reads it through `caBundle()`.
 */
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer as createHttpServer, type RequestListener, type Server } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { rootCertificates } from 'node:tls';
import { z } from 'zod';
import { isScError, type ScError, scError } from './errors.js';

/** The settings of a server that can listen with TLS. */
export const serverTlsSettings = {
  /** PEM certificate (chain) to serve; with `tlsKey`, the server listens with TLS (https://). */
  tlsCert: z.string().min(1).optional(),
  /** PEM private key of `tlsCert`. */
  tlsKey: z.string().min(1).optional(),
};

/** The setting of a service that is also a client (CA files it trusts besides the system store). */
export const clientTlsSettings = {
  /** PEM CA certificates trusted besides the system store (files). */
  ca: z.union([z.string().min(1), z.array(z.string().min(1))]).optional(),
};

/** A server's certificate and key, read and checked. */
export interface ServerTls {
  cert: Buffer;
  key: Buffer;
}

function readPem(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw scError('SC_ERR_BAD_CONFIG', `cannot read ${what} ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

/**
 * Reads a server's certificate and key (null when neither is set). Both must be set, parse, and
 * belong together; otherwise SC_ERR_BAD_CONFIG names the file.
 */
export function loadServerTls(s: { tlsCert?: string; tlsKey?: string }): ServerTls | null {
  if (!s.tlsCert && !s.tlsKey) return null;
  if (!s.tlsCert || !s.tlsKey) throw scError('SC_ERR_BAD_CONFIG', 'TLS needs both a certificate (--tls-cert) and its key (--tls-key)');
  const cert = readPem(s.tlsCert, 'TLS certificate');
  const key = readPem(s.tlsKey, 'TLS key');
  let x509: X509Certificate;
  try {
    x509 = new X509Certificate(cert);
  } catch {
    throw scError('SC_ERR_BAD_CONFIG', `${s.tlsCert} is not a PEM certificate`);
  }
  let k: ReturnType<typeof createPrivateKey>;
  try {
    k = createPrivateKey(key);
  } catch {
    throw scError('SC_ERR_BAD_CONFIG', `${s.tlsKey} is not a PEM private key`);
  }
  if (!x509.checkPrivateKey(k)) throw scError('SC_ERR_BAD_CONFIG', `${s.tlsKey} is not the key of the certificate ${s.tlsCert}`);
  return { cert, key };
}

/** An HTTP server for `app`, with TLS when `tls` is given (the servers' common options). */
export function createServer(app: RequestListener, tls: ServerTls | null): Server {
  const common = { maxHeaderSize: 16 * 1024 };
  return tls ? createHttpsServer({ ...common, cert: tls.cert, key: tls.key }, app) : createHttpServer(common, app);
}

/** What clients verify servers against (undefined: Node's default store); null until first needed. */
let bundle: string[] | undefined | null = null;

/** The system store plus `extra`, built once per change of trust (every request reads it). */
function withSystemStore(extra: string[]): string[] | undefined {
  return extra.length ? [...rootCertificates, ...extra] : undefined;
}

/** Reads PEM CA files; every certificate in them must parse. Throws SC_ERR_BAD_CONFIG. */
export function readCaFiles(files: readonly string[]): string[] {
  const out: string[] = [];
  for (const f of files) {
    const text = readPem(f, 'CA file').toString('utf8');
    const certs = text.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
    if (certs.length === 0) throw scError('SC_ERR_BAD_CONFIG', `${f} holds no PEM certificate`);
    for (const c of certs) {
      try {
        const x = new X509Certificate(c);
        if (!x.ca) throw new Error('not a CA');
      } catch {
        throw scError('SC_ERR_BAD_CONFIG', `${f}: a certificate in it is not a CA certificate`);
      }
      out.push(c);
    }
  }
  return out;
}

/**
 * Makes this process's clients trust the CAs in `files` (besides the system store), replacing
 * what was trusted before. Throws SC_ERR_BAD_CONFIG for an unreadable or non-CA file.
 */
export function trustCa(files: readonly string[] | string | undefined): void {
  const list = typeof files === 'string' ? [files] : (files ?? []);
  bundle = withSystemStore(readCaFiles(list));
}

/** The CAs clients verify servers against: undefined (Node's default store) unless private CAs were given. */
export function caBundle(): string[] | undefined {
  if (bundle === null) {
    const env = process.env.STAGECOACH_CA;
    bundle = withSystemStore(env ? readCaFiles(env.split(',').map((s) => s.trim()).filter(Boolean)) : []);
  }
  return bundle;
}

/** got's TLS options for this process's trust (empty when only the system store is trusted). */
export function gotTls(): { https?: { certificateAuthority: string[] } } {
  const ca = caBundle();
  return ca ? { https: { certificateAuthority: ca } } : {};
}

/** Node https agent/request options for this process's trust. */
export function nodeTls(): { ca?: string[] } {
  const ca = caBundle();
  return ca ? { ca } : {};
}

const UNTRUSTED = new Set([
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'CERT_UNTRUSTED',
  'CERT_SIGNATURE_FAILURE',
]);
const BAD_CERT = new Set(['ERR_TLS_CERT_ALTNAME_INVALID', 'CERT_HAS_EXPIRED', 'CERT_NOT_YET_VALID', 'HOSTNAME_MISMATCH']);

/**
 * The ScError of a TLS failure (null for any other error): SC_ERR_TLS with the reason and what
 * to do, e.g. `the certificate of https://… is not signed by a trusted CA (SELF_SIGNED_CERT_IN_CHAIN);
 * give its CA with --ca FILE`.
 */
export function tlsError(err: unknown, url: string): ScError | null {
  if (isScError(err)) return null;
  const code = (err as { code?: unknown })?.code;
  if (typeof code !== 'string') return null;
  if (UNTRUSTED.has(code)) return scError('SC_ERR_TLS', `the certificate of ${url} is not signed by a trusted CA (${code}); give its CA with --ca FILE (or STAGECOACH_CA)`, { reason: code });
  if (BAD_CERT.has(code)) return scError('SC_ERR_TLS', `the certificate of ${url} is not valid for it (${code})`, { reason: code });
  if (code === 'EPROTO' || code === 'ERR_SSL_WRONG_VERSION_NUMBER') return scError('SC_ERR_TLS', `TLS with ${url} failed (${code}): is it an http:// server?`, { reason: code });
  return null;
}
