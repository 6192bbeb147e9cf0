#!/usr/bin/env node
// Entry point of the `stagecoach` binary. TypeScript sources run through tsx's ESM loader so
// that `npx stagecoach` works right after `npm ci` with no build step; `npm run build` emits
// dist/ for deployments that prefer plain JavaScript (see README, "Development").
import { register } from 'tsx/esm/api';

register();
await import('./main.ts');
