/**
 * Host-side fetching over the read API (ARCHITECTURE.md, "HTTP read API"), used by the CLI
 * (`stagecoach get`) and by the agent's fetch step:
 *
 * - `probeSources`, `selectSources` (shared/fetch-sources.ts, re-exported): which stages answer
 *   /healthz and the candidate order (healthy stages by RTT, then degraded, then unhealthy, then origin);
 * - `fetchManifest`: the first manifest that parses and verifies against the trusted keys;
 * - `fetchBlob`: a resumable, multi-source, digest-verified download into a file.
 *
 * A source is a base URL (`http://stage-a:7071`, or with a path prefix). Origin and stages are
 * indistinguishable here: they serve the same read API.
 */

export {
  type FetchBlobOptions,
  type FetchBlobResult,
  type FetchProgress,
  fetchBlob,
} from './fetch-blob.js';
export { type FetchedManifest, type FetchManifestOptions, fetchManifest } from './fetch-manifest.js';
export {
  checkSource,
  normalizeSource,
  type ProbeOptions,
  type ProbeResult,
  probeSources,
  type SelectedSources,
  type SelectOptions,
  selectSources,
} from './fetch-sources.js';
