/**
 * The bundle manifest (contract: ARCHITECTURE.md, "Manifest"): its zod schema, canonical
 * JSON, and ed25519 signatures over the canonical JSON of everything but `signatures`.
 */
import { createHash, createPrivateKey, createPublicKey, type KeyObject, sign, verify } from 'node:crypto';
import canonicalize from 'canonicalize';
import { z } from 'zod';
import { DIGEST_RE, type Digest, sha256Of } from './digest.js';
import { scError } from './errors.js';
import { NAME_RE, VERSION_RE } from './names.js';

export const NET_FORMATS = ['ifupdown', 'netplan', 'networkd', 'windows-unattend'] as const;
export type NetFormat = (typeof NET_FORMATS)[number];
export const COMPRESSIONS = ['zstd', 'gzip', 'none'] as const;
export type Compression = (typeof COMPRESSIONS)[number];

const signature = z.strictObject({
  keyId: z.string().regex(/^[0-9a-f]{16}$/),
  alg: z.literal('ed25519'),
  sig: z.string().regex(/^[A-Za-z0-9+/]+={0,2}$/).max(200),
});

export const manifestSchema = z.strictObject({
  schema: z.literal(1),
  name: z.string().regex(NAME_RE),
  version: z.string().regex(VERSION_RE),
  role: z.enum(['base', 'target']),
  os: z.strictObject({
    id: z.string().regex(/^[a-z0-9][a-z0-9._-]{0,63}$/),
    version: z.string().regex(/^[0-9A-Za-z][0-9A-Za-z._+~-]{0,63}$/),
    family: z.enum(['linux', 'windows']),
    netFormat: z.enum(NET_FORMATS),
  }),
  blob: z.strictObject({
    digest: z.string().regex(DIGEST_RE),
    size: z.number().int().nonnegative(),
    compression: z.enum(COMPRESSIONS),
    encryption: z.enum(['age', 'none']),
    /**
     * Bytes of the plaintext tar (optional: manifests from before it are valid). Signed like
     * every other field; unpacking stops with SC_ERR_BUNDLE_TOO_LARGE past it.
     */
    unpackedSize: z.number().int().nonnegative().optional(),
  }),
  publishedAt: z.iso.datetime(),
  signatures: z.array(signature).max(16),
});

export type Manifest = z.infer<typeof manifestSchema> & { blob: { digest: Digest } };
export type UnsignedManifest = Omit<Manifest, 'signatures'>;

/** Validates untrusted input as a manifest; throws SC_ERR_BAD_MANIFEST with the zod issues. */
export function parseManifest(input: unknown): Manifest {
  const r = manifestSchema.safeParse(input);
  if (!r.success) {
    throw scError('SC_ERR_BAD_MANIFEST', undefined, {
      issues: r.error.issues.slice(0, 10).map((i) => `${i.path.join('.')}: ${i.message}`),
    });
  }
  return r.data as Manifest;
}

/** Canonical JSON (RFC 8785): sorted keys, no whitespace. The bytes that get signed and hashed. */
export function canonicalJson(value: unknown): string {
  const s = canonicalize(value);
  if (s === undefined) throw scError('SC_ERR_INTERNAL', 'value cannot be canonicalized');
  return s;
}

/** The bytes a manifest signature covers. */
export function signingPayload(m: UnsignedManifest | Manifest): Buffer {
  const { signatures: _ignored, ...rest } = m as Manifest;
  return Buffer.from(canonicalJson(rest));
}

/** The digest of a manifest: sha256 of its canonical JSON, signatures included. */
export function manifestDigest(m: Manifest): Digest {
  return sha256Of(canonicalJson(m));
}

/** Loads an ed25519 private key from PEM; throws SC_ERR_BAD_KEY. */
export function loadPrivateKey(pem: string | Buffer): KeyObject {
  try {
    const k = createPrivateKey(pem);
    if (k.asymmetricKeyType !== 'ed25519') throw new Error(`not ed25519: ${k.asymmetricKeyType}`);
    return k;
  } catch (err) {
    throw scError('SC_ERR_BAD_KEY', `not an ed25519 private key: ${(err as Error).message}`);
  }
}

/** Loads an ed25519 public key from PEM; throws SC_ERR_BAD_KEY. */
export function loadPublicKey(pem: string | Buffer): KeyObject {
  try {
    const k = createPublicKey(pem);
    if (k.asymmetricKeyType !== 'ed25519') throw new Error(`not ed25519: ${k.asymmetricKeyType}`);
    return k;
  } catch (err) {
    throw scError('SC_ERR_BAD_KEY', `not an ed25519 public key: ${(err as Error).message}`);
  }
}

/** A key's id: the first 16 hex characters of sha256 over its SPKI DER encoding. */
export function keyId(key: KeyObject): string {
  let id = keyIds.get(key);
  if (id === undefined) {
    const pub = key.type === 'private' ? createPublicKey(key) : key;
    id = createHash('sha256').update(pub.export({ type: 'spki', format: 'der' })).digest('hex').slice(0, 16);
    keyIds.set(key, id);
  }
  return id;
}

/** Key ids of KeyObjects already seen (they are immutable): every job and manifest check needs one. */
const keyIds = new WeakMap<KeyObject, string>();

/** Signs arbitrary bytes with ed25519; returns base64. */
export function signBytes(key: KeyObject, data: Buffer): string {
  return sign(null, data, key).toString('base64');
}

/** Verifies an ed25519 signature; false on any malformed input. */
export function verifyBytes(key: KeyObject, data: Buffer, sigB64: string): boolean {
  try {
    return verify(null, data, key, Buffer.from(sigB64, 'base64'));
  } catch {
    return false;
  }
}

/** Returns the manifest with one more signature by `key` (replacing an older one by the same key). */
export function signManifest(m: UnsignedManifest | Manifest, key: KeyObject): Manifest {
  const id = keyId(key);
  const others = ((m as Manifest).signatures ?? []).filter((s) => s.keyId !== id);
  return { ...(m as Manifest), signatures: [...others, { keyId: id, alg: 'ed25519', sig: signBytes(key, signingPayload(m)) }] };
}

/**
 * Verifies that at least one signature was made by one of `trusted`. Throws
 * SC_ERR_UNTRUSTED_KEY when no signature comes from a trusted key, SC_ERR_BAD_SIGNATURE when
 * a trusted key's signature does not verify. Returns the key id that verified.
 */
export function verifyManifest(m: Manifest, trusted: KeyObject[]): string {
  const payload = signingPayload(m);
  const byId = new Map(trusted.map((k) => [keyId(k), k]));
  let sawTrusted = false;
  for (const s of m.signatures) {
    const k = byId.get(s.keyId);
    if (!k) continue;
    sawTrusted = true;
    if (verifyBytes(k, payload, s.sig)) return s.keyId;
  }
  if (sawTrusted) throw scError('SC_ERR_BAD_SIGNATURE', `manifest ${m.name}@${m.version}: signature does not verify`);
  throw scError('SC_ERR_UNTRUSTED_KEY', `manifest ${m.name}@${m.version} is not signed by a trusted key`, {
    keyIds: m.signatures.map((s) => s.keyId),
  });
}
