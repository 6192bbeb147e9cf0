#!/usr/bin/env node
// `npm ci` / `npm install` runs this (the `prepare` script): it compiles the project into dist/,
// so that `stagecoach` runs compiled JavaScript (bin.js prefers it while it is up to date). A
// production install without devDependencies (no TypeScript) has nothing to compile with and
// skips the build; it must ship a built dist/.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('../..', import.meta.url));
if (!existsSync(new URL('../../node_modules/typescript/package.json', import.meta.url)) || !existsSync(new URL('../../tsconfig.json', import.meta.url))) {
  process.stderr.write('prepare: no TypeScript in this install: dist/ is not built here\n');
  process.exit(0);
}
const r = spawnSync('npm', ['run', '--silent', 'build'], { cwd: root, stdio: 'inherit' });
process.exit(r.status ?? 1);
