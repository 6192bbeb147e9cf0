#!/usr/bin/env node
// Entry point of the `stagecoach` binary. It runs the compiled JavaScript in dist/ (built by
// `npm ci` through the `prepare` script, or `npm run build`) whenever dist/ is newer than every
// source file; otherwise (a checkout being edited, or no build) it runs the TypeScript sources
// through tsx's loader, so a change is never shadowed by a stale build. See README, "Development".
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('../..', import.meta.url));
const compiled = join(root, 'dist/services/cli/main.js');

/** Newest modification time (ms) of the sources under `dir` (.ts, .mjs, .js, .html, .css). */
function newest(dir) {
  let t = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    if (e.name === 'node_modules' || e.name === 'dist') continue;
    const p = join(dir, e.name);
    if (e.isDirectory()) t = Math.max(t, newest(p));
    else if (/\.(ts|mjs|js|html|css)$/.test(e.name)) t = Math.max(t, statSync(p).mtimeMs);
  }
  return t;
}

function built() {
  try {
    const at = statSync(compiled).mtimeMs;
    // The compiled sources are services/ and shared/ (infra/ holds deployed files, no code).
    return at >= newest(join(root, 'services')) && at >= newest(join(root, 'shared'));
  } catch {
    return false;
  }
}

const args = process.argv.slice(2);
if (args.length === 1 && (args[0] === '--version' || args[0] === '-V')) {
  // Answered from package.json alone: no command module, no dependency is loaded.
  process.stdout.write(`${JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).version}\n`);
} else if (process.env.STAGECOACH_FROM_SOURCE !== '1' && built()) {
  await import(compiled);
} else {
  const { register } = await import('tsx/esm/api');
  register();
  await import('./main.ts');
}
