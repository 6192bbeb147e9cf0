#!/usr/bin/env node
// Runs every test file under test/ with node's test runner and tsx. Node 20 does not expand
// globs, and a bare `node --test` finds only .js files, so the list is built here. Tests need
// Redis: REDIS_URL if set, else 127.0.0.1:6379 if it answers, else a private redis-server.
import { spawn, spawnSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { createConnection } from 'node:net';
import { join } from 'node:path';

function find(dir) {
  const out = [];
  for (const e of readdirSync(dir).sort()) {
    const p = join(dir, e);
    if (statSync(p).isDirectory()) out.push(...find(p));
    else if (e.endsWith('.test.ts')) out.push(p);
  }
  return out;
}

function answers(port) {
  return new Promise((resolve) => {
    const s = createConnection({ host: '127.0.0.1', port });
    s.setTimeout(1000);
    s.once('connect', () => {
      s.end();
      resolve(true);
    });
    s.once('error', () => resolve(false));
    s.once('timeout', () => {
      s.destroy();
      resolve(false);
    });
  });
}

const filter = process.argv.slice(2);
let files = find('test');
if (filter.length) files = files.filter((f) => filter.some((x) => f.includes(x)));

const env = { ...process.env };
let redisChild;
if (!env.REDIS_URL) {
  if (await answers(6379)) env.REDIS_URL = 'redis://127.0.0.1:6379';
  else if (spawnSync('redis-server', ['--version'], { stdio: 'ignore' }).status === 0) {
    const port = 6390 + Math.floor(Math.random() * 500);
    redisChild = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
    for (let i = 0; i < 100 && !(await answers(port)); i++) await new Promise((r) => setTimeout(r, 50));
    env.REDIS_URL = `redis://127.0.0.1:${port}`;
  }
}

const concurrency = env.TEST_CONCURRENCY ?? '2';
const child = spawn(process.execPath, ['--import', 'tsx', '--test', `--test-concurrency=${concurrency}`, '--test-timeout=300000', ...files], {
  stdio: 'inherit',
  env,
});
child.on('exit', (code, signal) => {
  redisChild?.kill();
  process.exit(code ?? (signal ? 1 : 0));
});
