/**
 * ssh host keys in OpenSSH's own formats: a new ed25519 key pair written as
 * `openssh-key-v1` (what `ssh-keygen -t ed25519` writes) plus its one-line public key, and
 * fingerprints computed the way `ssh-keygen -lf` does them.
 */
import { createHash, generateKeyPairSync, randomBytes } from 'node:crypto';
import { scError } from '../../../shared/errors.js';

function sshString(b: Buffer | string): Buffer {
  const body = typeof b === 'string' ? Buffer.from(b) : b;
  const len = Buffer.alloc(4);
  len.writeUInt32BE(body.length);
  return Buffer.concat([len, body]);
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

/** A host key pair: the private key as OpenSSH PEM text, and the `ssh-ed25519 AAAA… comment` line. */
export interface SshKeyPair {
  private: string;
  public: string;
}

/** Generates an ed25519 key pair in OpenSSH formats (unencrypted private key, as host keys are). */
export function generateEd25519(comment = ''): SshKeyPair {
  const { publicKey, privateKey } = generateKeyPairSync('ed25519');
  const pub = publicKey.export({ type: 'spki', format: 'der' }).subarray(-32);
  const seed = privateKey.export({ type: 'pkcs8', format: 'der' }).subarray(-32);
  const blob = Buffer.concat([sshString('ssh-ed25519'), sshString(pub)]);
  const check = randomBytes(4).readUInt32BE();
  let priv = Buffer.concat([u32(check), u32(check), sshString('ssh-ed25519'), sshString(pub), sshString(Buffer.concat([seed, pub])), sshString(comment)]);
  const pad: number[] = [];
  for (let n = 1; (priv.length + pad.length) % 8 !== 0; n++) pad.push(n);
  priv = Buffer.concat([priv, Buffer.from(pad)]);
  const body = Buffer.concat([
    Buffer.from('openssh-key-v1\0'),
    sshString('none'),
    sshString('none'),
    sshString(''),
    u32(1),
    sshString(blob),
    sshString(priv),
  ]);
  const b64 = body.toString('base64').replace(/.{70}/g, '$&\n');
  const pem = `-----BEGIN OPENSSH PRIVATE KEY-----\n${b64.endsWith('\n') ? b64 : `${b64}\n`}-----END OPENSSH PRIVATE KEY-----\n`;
  return { private: pem, public: `ssh-ed25519 ${blob.toString('base64')}${comment ? ` ${comment}` : ''}` };
}

/**
 * The SHA256 fingerprint of a public key line, as `ssh-keygen -lf` prints it:
 * `SHA256:` + base64 (no padding) of sha256 over the decoded key blob. Throws SC_ERR_BAD_KEY.
 */
export function fingerprint(publicLine: string): string {
  const t = publicLine.trim().split(/\s+/);
  const k = t.findIndex((w, i) => /^(?:ssh-[a-z0-9-]+|ecdsa-sha2-nistp\d+)$/.test(w) && /^[A-Za-z0-9+/]+={0,3}$/.test(t[i + 1] ?? ''));
  if (k < 0) throw scError('SC_ERR_BAD_KEY', 'not an OpenSSH public key line');
  const m = [publicLine, t[k], t[k + 1]];
  const blob = Buffer.from(m[2], 'base64');
  // The blob starts with the key type as an ssh string; a mismatch means a corrupt line.
  const tlen = blob.length >= 4 ? blob.readUInt32BE(0) : -1;
  if (tlen < 0 || blob.subarray(4, 4 + tlen).toString() !== m[1]) throw scError('SC_ERR_BAD_KEY', 'public key blob does not match its type');
  return `SHA256:${createHash('sha256').update(blob).digest('base64').replace(/=+$/, '')}`;
}
