/**
 * Benchmark results: every suite returns a SuiteResult; run.ts prints it as a table and one
 * JSON line, stores it in loadtest/results.json (one entry per suite, last run wins), and
 * regenerates loadtest/RESULTS.md from that file.
 */
import { readFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { fileURLToPath } from 'node:url';

export interface SuiteResult {
  suite: string;
  /** Column headers of the table. */
  headers: string[];
  /** Rows of cells (already formatted). */
  rows: (string | number)[][];
  /** Free-form lines shown under the table (goals, skipped peers, parameters). */
  notes: string[];
  /** Machine-readable numbers for the JSON line. */
  data: Record<string, unknown>;
}

/** One line that identifies the machine a result was measured on. */
export function machineLine(): string {
  const c = cpus();
  return `${c.length} × ${c[0]?.model.trim() ?? 'cpu'}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM, Node ${process.version}, ${process.platform}`;
}

/** A Markdown table. */
export function markdownTable(headers: string[], rows: (string | number)[][]): string {
  // A pipe inside a cell (a shell pipeline) is escaped, or it would split the cell.
  const line = (cells: (string | number)[]) => `| ${cells.map((c) => String(c).replaceAll('|', '\\|')).join(' | ')} |`;
  return [line(headers), line(headers.map(() => '---')), ...rows.map(line)].join('\n');
}

/** A plain-text table for the terminal. */
export function textTable(headers: string[], rows: (string | number)[][]): string {
  const all = [headers, ...rows].map((r) => r.map((c) => String(c)));
  const w = headers.map((_, i) => Math.max(...all.map((r) => (r[i] ?? '').length)));
  return all.map((r) => r.map((c, i) => c.padEnd(w[i])).join('  ')).join('\n');
}

/** Formats bytes per second as MB/s (10^6). */
export function mbps(bytes: number, ms: number): number {
  return Math.round((bytes / 1e6 / (ms / 1000)) * 10) / 10;
}

/** p-th percentile (0–100) of numbers. */
export function percentile(xs: number[], p: number): number {
  if (xs.length === 0) return Number.NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
}

/** The median of numbers (the mean of the two middle ones for an even count); NaN for none. */
export function median(xs: number[]): number {
  if (xs.length === 0) return Number.NaN;
  const s = [...xs].sort((a, b) => a - b);
  const h = s.length >> 1;
  return s.length % 2 ? s[h] : (s[h - 1] + s[h]) / 2;
}

type UnitService = 'agent' | 'stage' | 'control' | 'origin';

/** The text of a deployed service's systemd unit (infra/systemd/stagecoach-<service>.service). */
function readUnit(service: UnitService): string {
  return readFileSync(fileURLToPath(new URL(`../infra/systemd/stagecoach-${service}.service`, import.meta.url)), 'utf8');
}

/** The node flags of a deployed service: those of ExecStart in infra/systemd/stagecoach-<service>.service. */
export function unitNodeFlags(service: UnitService): string[] {
  const unit = readUnit(service);
  const m = /^ExecStart=\S+((?: --[a-z0-9-]+(?:=\S+)?)*) /m.exec(unit);
  return m ? m[1].trim().split(/\s+/).filter(Boolean) : [];
}

/** The environment a deployed service's unit sets (its `Environment=NAME=value` lines), e.g. the stage's allocator settings. */
export function unitEnvironment(service: UnitService): Record<string, string> {
  const unit = readUnit(service);
  const env: Record<string, string> = {};
  for (const m of unit.matchAll(/^Environment=([A-Za-z_][A-Za-z0-9_]*)=(\S*)$/gm)) env[m[1]] = m[2];
  return env;
}

/** Calls per command from Redis `INFO commandstats` (`cmdstat_hset:calls=12,...`). */
export function commandCalls(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const m of text.matchAll(/^cmdstat_([^:]+):calls=(\d+)/gm)) out.set(m[1], Number(m[2]));
  return out;
}
