/**
 * The one error registry. Every failure that crosses a process or HTTP boundary carries a
 * stable `SC_ERR_*` code; callers match on `code`, never on the message. HTTP statuses are
 * chosen here and nowhere else. Every code is documented in README.md ("Error codes"), and a
 * unit test keeps the two in step.
 */

export const ERRORS = {
  SC_ERR_BAD_REQUEST: { status: 400, message: 'Bad request' },
  SC_ERR_BAD_DIGEST: { status: 400, message: 'Malformed digest: expected sha256:<64 lowercase hex>' },
  SC_ERR_BAD_NAME: { status: 400, message: 'Malformed bundle name' },
  SC_ERR_BAD_VERSION: { status: 400, message: 'Malformed bundle version' },
  SC_ERR_BAD_PATH: { status: 400, message: 'Malformed request path' },
  SC_ERR_BAD_RANGE: { status: 416, message: 'Range not satisfiable' },
  SC_ERR_BAD_MANIFEST: { status: 400, message: 'Manifest does not match the schema' },
  SC_ERR_BAD_CONFIG: { status: 400, message: 'Invalid configuration' },
  SC_ERR_USAGE: { status: 400, message: 'Command line not understood (missing or unknown option or argument)' },
  SC_ERR_FILE_ACCESS: { status: 400, message: 'A local file or directory is missing or cannot be created, read or written' },
  SC_ERR_HEADER_TOO_LARGE: { status: 431, message: 'Request header fields too large' },
  SC_ERR_UNAUTHORIZED: { status: 401, message: 'Missing bearer token' },
  SC_ERR_FORBIDDEN: { status: 403, message: 'Wrong token' },
  SC_ERR_NOT_FOUND: { status: 404, message: 'Not found' },
  SC_ERR_BLOB_NOT_FOUND: { status: 404, message: 'Blob not found' },
  SC_ERR_MANIFEST_NOT_FOUND: { status: 404, message: 'Manifest not found' },
  SC_ERR_METHOD_NOT_ALLOWED: { status: 405, message: 'Method not allowed' },
  SC_ERR_VERSION_EXISTS: { status: 409, message: 'This version exists with other content; versions are immutable' },
  SC_ERR_CONFLICT: { status: 409, message: 'Conflicting state' },
  SC_ERR_HOST_CONFLICT: { status: 409, message: 'More than one source (the host, a relay) holds a live registration of this host' },
  SC_ERR_IN_USE_UNKNOWN: { status: 409, message: 'Cannot tell which bundles are in use, so nothing is removed' },
  SC_ERR_TOO_LARGE: { status: 413, message: 'Body too large' },
  SC_ERR_DIGEST_MISMATCH: { status: 422, message: 'Content does not match its sha256 digest' },
  SC_ERR_SIZE_MISMATCH: { status: 422, message: 'Content does not match its declared size' },
  SC_ERR_MISSING_BLOB: { status: 422, message: 'The manifest names a blob the store does not hold' },
  SC_ERR_BAD_SIGNATURE: { status: 422, message: 'Signature verification failed' },
  SC_ERR_UNTRUSTED_KEY: { status: 422, message: 'Signed by a key that is not trusted' },
  SC_ERR_UNSAFE_ARCHIVE: { status: 422, message: 'Archive entry would escape the extraction target' },
  SC_ERR_BAD_ARCHIVE: { status: 422, message: 'Archive is corrupt, truncated or not in the declared format' },
  SC_ERR_UNSUPPORTED_XATTR: { status: 422, message: 'Extended attribute not carried (only security.*, trusted.*, user.* and POSIX ACLs are)' },
  SC_ERR_BUNDLE_TOO_LARGE: { status: 422, message: 'Unpacked bundle exceeds its declared size or the unpack size cap' },
  SC_ERR_NO_SPACE: { status: 507, message: 'No space left on the target file system' },
  SC_ERR_PASSTHROUGH_TOO_LARGE: { status: 507, message: 'Blob is larger than the stage caches and larger than its pass-through cap' },
  SC_ERR_DECRYPT: { status: 422, message: 'Decryption failed' },
  SC_ERR_BAD_KEY: { status: 400, message: 'Malformed key' },
  SC_ERR_FILE_EXISTS: { status: 409, message: 'Refusing to overwrite an existing file' },
  SC_ERR_JOB_REJECTED: { status: 403, message: 'Step job refused' },
  SC_ERR_JOB_REPLAYED: { status: 409, message: 'Step job refused: this host already finished it (replay)' },
  SC_ERR_STEP_FAILED: { status: 500, message: 'Install step failed' },
  SC_ERR_BOOT_FAILED: { status: 500, message: 'Boot did not come up as expected' },
  SC_ERR_ABORTED: { status: 409, message: 'Stopped at a step boundary because the rollout was aborted' },
  SC_ERR_TIMEOUT: { status: 504, message: 'Timed out' },
  SC_ERR_UPSTREAM: { status: 502, message: 'Upstream failed' },
  SC_ERR_TLS: { status: 502, message: 'TLS failed: the peer certificate is not trusted, or not valid for its address' },
  SC_ERR_REPLY_TOO_LARGE: { status: 502, message: 'A reply body is larger than the client accepts (misbehaving relay)' },
  SC_ERR_NO_UPSTREAM: { status: 503, message: 'No healthy upstream' },
  SC_ERR_UNAVAILABLE: { status: 503, message: 'Service unavailable' },
  SC_ERR_REDIS_UNAVAILABLE: { status: 503, message: 'Redis is not reachable and no redis-server could be started' },
  SC_ERR_NO_DEVICE: { status: 404, message: 'No such disk or partition on this machine' },
  SC_ERR_COMMAND_FAILED: { status: 500, message: 'A system command failed' },
  SC_ERR_INTERNAL: { status: 500, message: 'Internal error' },
} as const satisfies Record<string, { status: number; message: string }>;

export type ErrorCode = keyof typeof ERRORS;

/** A failure with a stable code. `details` must never contain secrets. */
export class ScError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  readonly details?: Record<string, unknown>;
  /** One line telling a person what to do next (the CLI prints it as `hint: …`). Never secret. */
  hint?: string;

  constructor(code: ErrorCode, message?: string, details?: Record<string, unknown>, options?: { cause?: unknown }) {
    super(message ?? ERRORS[code].message, options);
    this.name = 'ScError';
    this.code = code;
    this.status = ERRORS[code].status;
    this.details = details;
  }

  toJSON(): { error: { code: ErrorCode; message: string; details?: Record<string, unknown>; hint?: string } } {
    return { error: { code: this.code, message: this.message, ...(this.details ? { details: this.details } : {}), ...(this.hint ? { hint: this.hint } : {}) } };
  }

  /** Sets `hint` and returns this error, so that `throw scError(…).withHint(…)` reads as one statement. */
  withHint(hint: string): this {
    this.hint = hint;
    return this;
  }
}

/** Creates an ScError. Shorthand used across services. */
export function scError(code: ErrorCode, message?: string, details?: Record<string, unknown>, cause?: unknown): ScError {
  return new ScError(code, message, details, cause === undefined ? undefined : { cause });
}

/** True when `err` is an ScError, optionally with the given code. */
export function isScError(err: unknown, code?: ErrorCode): err is ScError {
  return err instanceof ScError && (code === undefined || err.code === code);
}

/** Wraps anything thrown into an ScError; unknown failures become SC_ERR_INTERNAL. */
export function toScError(err: unknown): ScError {
  if (err instanceof ScError) return err;
  const code = (err as { code?: unknown })?.code;
  if (typeof code === 'string' && code in ERRORS) {
    return new ScError(code as ErrorCode, (err as Error).message);
  }
  return new ScError('SC_ERR_INTERNAL', err instanceof Error ? err.message : String(err), undefined, { cause: err });
}

/** Rebuilds an ScError from a JSON error body received over HTTP, if it has a known code. */
export function fromErrorBody(status: number, body: unknown): ScError {
  const e = (body as { error?: { code?: string; message?: string; details?: Record<string, unknown> } })?.error;
  if (e && typeof e.code === 'string' && e.code in ERRORS) {
    return new ScError(e.code as ErrorCode, e.message, e.details);
  }
  if (status === 404) return new ScError('SC_ERR_NOT_FOUND');
  return new ScError(status >= 500 ? 'SC_ERR_UPSTREAM' : 'SC_ERR_BAD_REQUEST', `HTTP ${status}`);
}

/** A file system error as an ScError: SC_ERR_NO_SPACE for ENOSPC/EDQUOT, else `fallback`. */
export function fsFailure(err: unknown, what: string, path?: string, fallback: ErrorCode = 'SC_ERR_INTERNAL'): ScError {
  if (isScError(err)) return err;
  const e = err as NodeJS.ErrnoException;
  const errno = typeof e?.code === 'string' && /^E[A-Z0-9]+$/.test(e.code) ? e.code : undefined;
  const code: ErrorCode = errno === 'ENOSPC' || errno === 'EDQUOT' ? 'SC_ERR_NO_SPACE' : fallback;
  return scError(code, `${what}: ${errno ?? ''} ${e?.message ?? String(err)}`.trim(), { ...(errno ? { errno } : {}), ...(path ? { path } : {}) }, err);
}
