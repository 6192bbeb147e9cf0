/**
 * Owns admitting work: checking a bundle's manifest at the origin, resolving a rollout's host
 * selection against the inventory, and building a new rollout's spec, status and hosts.
 */
import { refString } from '../../../shared/protocol/index.js';
import type { KeyObject } from 'node:crypto';
import type { BundleRef } from '../../../shared/protocol/index.js';
import { type ErrorCode, ERRORS, isScError, scError } from '../../../shared/errors.js';
import { type Manifest, manifestDigest, verifyManifest } from '../../../shared/manifest.js';
import type { ReadClient } from '../../origin/client.js';
import type { Inventory } from '../inventory.js';
import { type CreateRolloutRequest, planWaves, resolveBudget } from '../plan.js';
import { type ActiveRollout, newRolloutStatus, pendingHost, type RolloutSpec } from './model.js';
import { HostTable } from './host-table.js';

/** Where manifests come from and which keys they must be signed with (none: not checked). */
export interface ManifestSource {
  origin: ReadClient;
  trustKeys: KeyObject[];
}

/**
 * Fetches and checks a manifest: it exists (SC_ERR_MANIFEST_NOT_FOUND), verifies with the trust
 * keys if any (SC_ERR_UNTRUSTED_KEY, SC_ERR_BAD_SIGNATURE), and has `role` (SC_ERR_BAD_REQUEST).
 * `what` names the reference in messages and error details. Origin failures: SC_ERR_UPSTREAM.
 */
export async function checkManifest(src: ManifestSource, ref: BundleRef, role: 'base' | 'target', what: string): Promise<Manifest> {
  const rec = await src.origin.findManifest(ref.name, ref.version).catch((err) => {
    throw isScError(err) && ERRORS[err.code as ErrorCode] ? err : scError('SC_ERR_UPSTREAM', `origin: ${(err as Error).message}`);
  });
  if (!rec) throw scError('SC_ERR_MANIFEST_NOT_FOUND', `${what} ${refString(ref)} is not published at the origin`, { [what]: refString(ref) });
  if (src.trustKeys.length > 0) verifyManifest(rec.manifest, src.trustKeys);
  if (rec.manifest.role !== role) {
    throw scError('SC_ERR_BAD_REQUEST', `${what} ${refString(ref)} has role ${rec.manifest.role}, expected ${role}`, { [what]: refString(ref) });
  }
  return rec.manifest;
}

/** The hosts a request selects, with their colos; SC_ERR_BAD_REQUEST for unknown hosts or colos without hosts. */
export async function selectHosts(inventory: Inventory, req: Pick<CreateRolloutRequest, 'hosts' | 'colos'>): Promise<{ host: string; colo: string }[]> {
  // Fresh, not the 250 ms dashboard cache: a host that registered just now must be selectable.
  const records = await inventory.records({ fresh: true });
  const byId = new Map(records.map((r) => [r.hostId, r]));
  if (req.hosts) {
    const unknown = req.hosts.filter((h) => !byId.has(h));
    if (unknown.length) throw scError('SC_ERR_BAD_REQUEST', `unknown hosts: ${unknown.slice(0, 20).join(', ')}`, { unknownHosts: unknown.slice(0, 100) });
    return req.hosts.map((h) => ({ host: h, colo: byId.get(h)!.colo }));
  }
  const colos = req.colos!;
  const unknown = colos.filter((c) => !records.some((r) => r.colo === c));
  if (unknown.length) throw scError('SC_ERR_BAD_REQUEST', `no registered hosts in colos: ${unknown.join(', ')}`, { unknownColos: unknown });
  return records.filter((r) => colos.includes(r.colo)).map((r) => ({ host: r.hostId, colo: r.colo }));
}

/** What a new rollout is built from. */
export interface NewRollout {
  id: string;
  req: CreateRolloutRequest;
  selected: { host: string; colo: string }[];
  base: { ref: BundleRef; manifest: Manifest };
  target: { ref: BundleRef; manifest: Manifest };
  actor: string;
  now: number;
}

/** A new rollout: waves planned, every host pending, running in the preheat of wave 0. */
export function newRollout(n: NewRollout): ActiveRollout {
  const { req, selected, now } = n;
  const plan = { ...req.plan, maxInFlightPerColo: req.plan.maxInFlightPerColo ?? req.plan.maxInFlight };
  const waves = planWaves(selected, plan);
  const spec: RolloutSpec = {
    id: n.id,
    createdAt: now,
    actor: n.actor,
    base: n.base.ref,
    target: n.target.ref,
    blobs: { base: n.base.manifest.blob.digest, target: n.target.manifest.blob.digest },
    manifests: { base: manifestDigest(n.base.manifest), target: manifestDigest(n.target.manifest) },
    selector: req.hosts ? { hosts: req.hosts } : { colos: req.colos },
    plan,
    waves,
    budget: resolveBudget(plan, selected.length),
    hostCount: selected.length,
  };
  const colo = new Map(selected.map((s) => [s.host, s.colo]));
  const hosts = new HostTable();
  waves.forEach((w, wi) => {
    for (const host of w) hosts.set(host, pendingHost(host, colo.get(host)!, wi));
  });
  const status = newRolloutStatus(now, selected.length);
  return { spec, status, preheat: {}, hosts, lastPreheatPoll: 0, lastReconcile: now, reconciledAt: new Map() };
}
