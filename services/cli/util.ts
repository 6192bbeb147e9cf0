/** Small helpers every CLI command uses: reading secrets, printing, and exiting with a code. */
import type { KeyObject } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { readTokenFile } from '../../shared/config.js';
import { describeErrno, makeDir } from '../../shared/files.js';
import { isScError, ScError, scError, toScError } from '../../shared/errors.js';
import { loadPrivateKey } from '../../shared/manifest.js';

export { readTokenFile };
export { describeErrno, makeDir };

/** Prints a value as one JSON document on stdout. */
export function printJson(v: unknown): void {
  process.stdout.write(`${JSON.stringify(v, null, 2)}\n`);
}

/** Splits a comma-separated flag value, dropping empty parts. */
export function splitList(s: string | undefined): string[] {
  return (s ?? '')
    .split(',')
    .map((x) => x.trim())
    .filter(Boolean);
}

/** Collects a repeatable flag into an array (commander `argParser`). */
export function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}


/**
 * Turns anything a command threw into the ScError a person reads. Libraries' errors that reach
 * this far are translated here, once, so their wording never is the whole message: a Node file
 * system error becomes SC_ERR_FILE_ACCESS naming its path, a Redis client that gave up becomes
 * SC_ERR_REDIS_UNAVAILABLE. An ScError's `details.issues` (validation reasons) join its message,
 * so text mode says as much as --json.
 */
export function cliError(err: unknown): ScError {
  const sys = err as NodeJS.ErrnoException;
  if (!(err instanceof ScError)) {
    if (typeof sys?.code === 'string' && /^E[A-Z]+$/.test(sys.code) && typeof sys.path === 'string') {
      return scError('SC_ERR_FILE_ACCESS', `cannot ${sys.syscall ?? 'use'} ${sys.path}: ${describeErrno(err)}`, { path: sys.path });
    }
    if (sys?.name === 'MaxRetriesPerRequestError') return scError('SC_ERR_REDIS_UNAVAILABLE', 'Redis does not answer');
  }
  const e = toScError(err);
  const issues = e.details?.issues;
  if (Array.isArray(issues) && issues.length && !e.message.includes(String(issues[0]))) {
    const withIssues = scError(e.code, `${e.message}: ${issues.join('; ')}`, e.details);
    if (e.hint) withIssues.hint = e.hint;
    return withIssues;
  }
  return e;
}

/** Prints `error CODE: message` and, when there is one, `hint: …` on stderr: the two lines of every failure. */
export function printError(e: ScError): void {
  process.stderr.write(`error ${e.code}: ${e.message.replace(/\s*\n\s*/g, ' ')}\n`);
  if (e.hint) process.stderr.write(`hint: ${e.hint}\n`);
}

/**
 * Wraps a command action: a failure is printed by printError (and as JSON on stdout with
 * --json) and the process exits 1. SC_ERR_INTERNAL prints its stack with STAGECOACH_DEBUG set.
 */
export function action<A extends unknown[]>(fn: (...args: A) => Promise<void> | void): (...args: A) => Promise<void> {
  return async (...args: A) => {
    try {
      await fn(...args);
    } catch (err) {
      const e = cliError(err);
      const wantJson = args.some((a) => a && typeof a === 'object' && (a as { json?: boolean }).json === true);
      if (wantJson) process.stdout.write(`${JSON.stringify(e.toJSON())}\n`);
      printError(e);
      if (e.code === 'SC_ERR_INTERNAL' && process.env.STAGECOACH_DEBUG) process.stderr.write(`${(err as Error).stack}\n`);
      process.exitCode = 1;
    }
  };
}


/**
 * Checks that the directory a file is to be written into exists, before any work that would
 * fail only at the end. Throws SC_ERR_FILE_ACCESS naming the directory and the flag.
 */
export function requireParentDir(file: string, flag: string): void {
  const dir = dirname(resolve(file));
  if (!statSync(dir, { throwIfNoEntry: false })?.isDirectory()) throw scError('SC_ERR_FILE_ACCESS', `cannot write ${flag} ${file}: directory ${dir} does not exist`, { path: dir });
}

/**
 * Loads the ed25519 private key a --signing-key flag names. The usual mistake, a `.pub` file
 * where the `.key` belongs, gets its own message and hint instead of OpenSSL's decoder error.
 * Throws SC_ERR_BAD_CONFIG when the file cannot be read, SC_ERR_BAD_KEY when it is not a key.
 */
export function loadSigningKey(path: string, flag = '--signing-key'): KeyObject {
  let pem: string;
  try {
    pem = readFileSync(path, 'utf8');
  } catch (err) {
    throw scError('SC_ERR_BAD_CONFIG', `cannot read ${flag} ${path}: ${describeErrno(err)}`, { path });
  }
  if (/-----BEGIN PUBLIC KEY-----/.test(pem)) {
    throw scError('SC_ERR_BAD_KEY', `${flag} ${path} holds a public key`, { path }).withHint(
      `this looks like a public key; ${flag} wants the private key from 'stagecoach keys gen' (release.key or control.key)`,
    );
  }
  try {
    return loadPrivateKey(pem);
  } catch (err) {
    if (!isScError(err, 'SC_ERR_BAD_KEY')) throw err;
    throw scError('SC_ERR_BAD_KEY', `${flag} ${path} is not an ed25519 private key in PEM`, { path }).withHint(
      `${flag} wants a private key written by 'stagecoach keys gen' (release.key or control.key)`,
    );
  }
}
