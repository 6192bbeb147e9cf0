/** Small helpers every CLI command uses: reading secrets, printing, and exiting with a code. */
import { readTokenFile } from '../../shared/config.js';
import { type ScError, toScError } from '../../shared/errors.js';

export { readTokenFile };

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
 * Wraps a command action: an ScError is printed as `error SC_ERR_…: message` on stderr (or as
 * JSON with --json) and the process exits 1. Anything else is an internal error, exit 1.
 */
export function action<A extends unknown[]>(fn: (...args: A) => Promise<void> | void): (...args: A) => Promise<void> {
  return async (...args: A) => {
    try {
      await fn(...args);
    } catch (err) {
      const e: ScError = toScError(err);
      const wantJson = args.some((a) => a && typeof a === 'object' && (a as { json?: boolean }).json === true);
      if (wantJson) process.stdout.write(`${JSON.stringify(e.toJSON())}\n`);
      process.stderr.write(`error ${e.code}: ${e.message}\n`);
      if (e.code === 'SC_ERR_INTERNAL' && process.env.STAGECOACH_DEBUG) process.stderr.write(`${(err as Error).stack}\n`);
      process.exitCode = 1;
    }
  };
}
