/**
 * The pino logger. One root per process; components take a child with `component`. On a
 * terminal the lines are made readable by pino-pretty (in pino's transport thread); anywhere else
 * (a pipe, a file, journald) they stay one JSON object per line. STAGECOACH_LOG_FORMAT=json or
 * =pretty chooses either way.
 */
import { type Logger, pino } from 'pino';

export type { Logger };

/** Fields that must never reach a log line. */
const REDACT = ['token', 'authorization', 'req.headers.authorization', '*.token', 'headers.authorization', 'identity'];

/** Whether log lines are made readable for a person: a terminal on stderr, unless told otherwise. */
export function prettyLogs(env: NodeJS.ProcessEnv = process.env, tty = process.stderr.isTTY === true): boolean {
  const f = env.STAGECOACH_LOG_FORMAT;
  if (f === 'json') return false;
  if (f === 'pretty') return true;
  return tty;
}

/**
 * Creates a logger. `level` defaults to `info`; `silent` turns it off (tests). Logs go to
 * stderr so that `--json` output on stdout stays machine-readable.
 */
export function createLogger(opts: { level?: string; name?: string } = {}): Logger {
  const options = { name: opts.name ?? 'stagecoach', level: opts.level ?? 'info', redact: { paths: REDACT, censor: '[redacted]' } };
  if (prettyLogs()) {
    return pino(options, pino.transport({ target: 'pino-pretty', options: { destination: 2, colorize: process.stderr.isTTY === true, translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname' } }));
  }
  return pino(options, pino.destination({ fd: 2, sync: false }));
}

/** A logger that writes nothing. */
export const silentLogger: Logger = pino({ level: 'silent' });
