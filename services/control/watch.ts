/**
 * Following a rollout from outside control, through its client only: `watchRollout` (used by
 * `stagecoach rollout create --wait`, `rollout watch` and the demo) and the one-line summary
 * they print. Output goes to stderr, so a caller's stdout stays free for its result.
 */
import cliProgress from 'cli-progress';
import { type ControlClient, ROLLOUT_FINISHED, type RolloutDetail, type RolloutView } from './client.js';

/** One line about a rollout: id, state, bundles, wave and host counts. */
export function rolloutSummary(r: RolloutView): string {
  const c = r.status.counts;
  const parts = [
    `${r.spec.id}  ${r.status.state}${r.status.pauseReason ? ` (${r.status.pauseReason})` : ''}`,
    `${r.spec.base.name}@${r.spec.base.version} → ${r.spec.target.name}@${r.spec.target.version}`,
    `wave ${r.status.wave + 1}/${r.spec.waves.length} ${r.status.phase}`,
    `converted ${c.converted}/${r.spec.hostCount}, in flight ${c.inFlight}, failed ${c.failed}, aborted ${c.aborted}, skipped ${c.skipped}`,
  ];
  return parts.join('  ·  ');
}

/**
 * Follows a rollout until it finishes: one progress bar per wave on a terminal (hosts done of
 * the wave, hosts per step, failures printed with their reasons), plain lines otherwise.
 * Resolves with the final view.
 */
export async function watchRollout(client: ControlClient, id: string, opts: { intervalMs?: number; tty?: boolean } = {}): Promise<RolloutDetail> {
  const tty = opts.tty ?? Boolean(process.stderr.isTTY);
  const every = opts.intervalMs ?? 1000;
  const seenFailures = new Set<string>();
  let lastLine = '';
  let bars: cliProgress.MultiBar | null = null;
  const waveBars: cliProgress.SingleBar[] = [];
  try {
    for (;;) {
      const r = await client.rollout(id);
      if (tty && !bars) {
        bars = new cliProgress.MultiBar(
          { format: ' {label} |{bar}| {value}/{total} {steps}', hideCursor: true, clearOnComplete: false, stream: process.stderr },
          cliProgress.Presets.shades_classic,
        );
        r.spec.waves.forEach((w, i) => {
          waveBars.push(bars!.create(w.length, 0, { label: `wave ${String(i + 1).padStart(2)}`, steps: '' }));
        });
      }
      r.spec.waves.forEach((_w, i) => {
        const hs = r.hosts.filter((h) => h.wave === i);
        const done = hs.filter((h) => ['converted', 'failed', 'aborted', 'skipped'].includes(h.status)).length;
        const perStep = new Map<string, number>();
        for (const h of hs) {
          const k = h.status === 'running' ? (h.step ?? 'starting') : h.status;
          perStep.set(k, (perStep.get(k) ?? 0) + 1);
        }
        const steps = [...perStep].map(([k, n]) => `${k}:${n}`).join(' ');
        if (bars) waveBars[i].update(done, { steps });
      });
      for (const h of r.hosts) {
        if (h.error && !seenFailures.has(h.host)) {
          seenFailures.add(h.host);
          const msg = `${h.host} ${h.status} at ${h.error.step}: ${h.error.code} ${h.error.message}`.slice(0, 300);
          if (bars) bars.log(`${msg}\n`);
          else process.stderr.write(`${msg}\n`);
        }
      }
      const line = rolloutSummary(r);
      if (!bars && line !== lastLine) process.stderr.write(`${line}\n`);
      lastLine = line;
      if (ROLLOUT_FINISHED.includes(r.status.state)) {
        bars?.stop();
        bars = null;
        if (tty) process.stderr.write(`${line}\n`);
        return r;
      }
      await new Promise((res) => setTimeout(res, every));
    }
  } finally {
    bars?.stop();
  }
}
