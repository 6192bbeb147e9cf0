/** The pino logger. One root per process; components take a child with `component`. */
import { type Logger, pino } from 'pino';

export type { Logger };

/** Fields that must never reach a log line. */
const REDACT = ['token', 'authorization', 'req.headers.authorization', '*.token', 'headers.authorization', 'identity'];

/**
 * Creates a logger. `level` defaults to `info`; `silent` turns it off (tests). Logs go to
 * stderr so that `--json` output on stdout stays machine-readable.
 */
export function createLogger(opts: { level?: string; name?: string } = {}): Logger {
  return pino(
    { name: opts.name ?? 'stagecoach', level: opts.level ?? 'info', redact: { paths: REDACT, censor: '[redacted]' } },
    pino.destination({ fd: 2, sync: false }),
  );
}

/** A logger that writes nothing. */
export const silentLogger: Logger = pino({ level: 'silent' });
