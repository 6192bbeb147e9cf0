/**
 * Manifests over the read API (ARCHITECTURE.md, "HTTP read API"): the first manifest that parses
 * and verifies against the trusted keys. Used through shared/fetch.ts.
 */
import type { KeyObject } from 'node:crypto';
import type { Digest } from './digest.js';
import { type ErrorCode, type ScError, scError, toScError } from './errors.js';
import { abortError, errorFromBody, getSmall, throwIfAborted } from './fetch-http.js';
import { withOrigin } from './fetch-sources.js';
import { type Manifest, manifestDigest, parseManifest, verifyManifest } from './manifest.js';
import { parseName, parseVersion } from './names.js';
import { tlsError } from './tls.js';

/** Options for fetchManifest. */
export interface FetchManifestOptions {
  /** Appended as the last source when not already in the list. */
  origin?: string;
  /** Deadline per source for the whole manifest exchange, in ms (default 10000). */
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** A verified manifest and where it came from. */
export interface FetchedManifest {
  manifest: Manifest;
  /** The source that served it. */
  source: string;
  /** Id of the trusted key whose signature verified. */
  keyId: string;
  /** sha256 of the manifest's canonical JSON. */
  manifestDigest: Digest;
}

/** Order in which per-source failures are reported when every source failed: security first. */
const MANIFEST_ERROR_PRIORITY: ErrorCode[] = ['SC_ERR_BAD_SIGNATURE', 'SC_ERR_UNTRUSTED_KEY', 'SC_ERR_BAD_MANIFEST', 'SC_ERR_TLS', 'SC_ERR_MANIFEST_NOT_FOUND'];

/**
 * Fetches `name@version` from the first source whose answer parses (parseManifest), names the
 * requested bundle, and verifies against `trusted`. A source that fails in any way (including a
 * bad signature: a stage may be corrupt) is passed over for the next one. When all fail, the
 * most serious failure is thrown: SC_ERR_BAD_SIGNATURE, then SC_ERR_UNTRUSTED_KEY, then
 * SC_ERR_BAD_MANIFEST, then SC_ERR_TLS, then SC_ERR_MANIFEST_NOT_FOUND, else SC_ERR_UPSTREAM (details list every
 * source's failure). Throws SC_ERR_BAD_NAME / SC_ERR_BAD_VERSION for malformed input,
 * SC_ERR_BAD_CONFIG without trusted keys, SC_ERR_NO_UPSTREAM without sources.
 */
export async function fetchManifest(
  sources: readonly string[],
  name: string,
  version: string,
  trusted: readonly KeyObject[],
  opts: FetchManifestOptions = {},
): Promise<FetchedManifest> {
  parseName(name);
  parseVersion(version);
  if (trusted.length === 0) throw scError('SC_ERR_BAD_CONFIG', 'no trusted public keys: refusing to accept any manifest');
  const list = withOrigin(sources, opts.origin);
  if (list.length === 0) throw scError('SC_ERR_NO_UPSTREAM', 'no source to fetch the manifest from');
  const failures: { source: string; error: ScError }[] = [];
  for (const source of list) {
    throwIfAborted(opts.signal);
    try {
      const body = await getSmall(`${source}/v1/bundles/${name}/${version}`, opts.timeoutMs ?? 10_000, opts.signal);
      if (body.status === 404) throw scError('SC_ERR_MANIFEST_NOT_FOUND', `${name}@${version} not found at ${source}`);
      if (body.status !== 200) throw errorFromBody(body.status, body.data);
      let json: unknown;
      try {
        json = JSON.parse(body.data.toString('utf8'));
      } catch {
        throw scError('SC_ERR_BAD_MANIFEST', `${source} answered with something that is not JSON`);
      }
      const manifest = parseManifest(json);
      if (manifest.name !== name || manifest.version !== version) {
        throw scError('SC_ERR_BAD_MANIFEST', `${source} answered ${manifest.name}@${manifest.version} for ${name}@${version}`);
      }
      const keyId = verifyManifest(manifest, [...trusted]);
      return { manifest, source, keyId, manifestDigest: manifestDigest(manifest) };
    } catch (err) {
      if (opts.signal?.aborted) throw abortError(opts.signal);
      failures.push({ source, error: tlsError(err, source) ?? toScError(err) });
    }
  }
  const details = { sources: failures.map((f) => ({ source: f.source, code: f.error.code, message: f.error.message })) };
  for (const code of MANIFEST_ERROR_PRIORITY) {
    const f = failures.find((x) => x.error.code === code);
    if (f) throw scError(code, `${f.error.message} (from ${f.source}; ${failures.length} source(s) tried)`, { ...f.error.details, ...details });
  }
  throw scError('SC_ERR_UPSTREAM', `no source served ${name}@${version}: ${failures.map((f) => `${f.source}: ${f.error.message}`).join('; ')}`, details);
}
