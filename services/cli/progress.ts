/**
 * The CLI's one progress bar style for bytes (publish's phases, get's download and unpack):
 * `label |████░░░░| 42% 123.4/293.0 MiB note`, on stderr, only when stderr is a terminal and the
 * command is not printing --json. Without a known total it counts MiB.
 */
import cliProgress from 'cli-progress';

/** A progress display: bytes so far (and an optional note, e.g. the source), then stop. */
export interface ByteBar {
  update(bytes: number, note?: string): void;
  stop(): void;
}

const QUIET: ByteBar = { update: () => {}, stop: () => {} };
const mib = (n: number) => (n / 2 ** 20).toFixed(1);

/** A byte progress bar labelled `label` (`total` in bytes when known); a no-op when `enabled` is false. */
export function byteBar(enabled: boolean, label: string, total?: number): ByteBar {
  if (!enabled) return QUIET;
  const bar = new cliProgress.SingleBar(
    {
      stream: process.stderr,
      hideCursor: true,
      clearOnComplete: true,
      format: total === undefined ? ` ${label} {done} MiB {note}` : ` ${label} |{bar}| {percentage}% {done}/{all} MiB {note}`,
    },
    cliProgress.Presets.shades_classic,
  );
  bar.start(total ?? 1, 0, { done: mib(0), all: mib(total ?? 0), note: '' });
  return {
    update: (n, note) => bar.update(total === undefined ? 0 : n, { done: mib(n), ...(note === undefined ? {} : { note }) }),
    stop: () => bar.stop(),
  };
}

/** Whether a command shows progress: stderr is a terminal and the output is not --json. */
export function showsProgress(json: boolean | undefined): boolean {
  return !json && process.stderr.isTTY === true;
}
