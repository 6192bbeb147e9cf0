/** Every step the agent runs, by name (one file each; see step.ts for the contract). */
import type { StepName } from '../../../shared/protocol/index.js';
import { applyConfigBaseStep } from './apply-config-base.js';
import { bootBaseStep } from './boot-base.js';
import { bootTargetStep } from './boot-target.js';
import { captureConfigStep } from './capture-config.js';
import { commitBaseStep } from './commit-base.js';
import { fetchStep } from './fetch.js';
import { fetchOtherStep } from './fetch-other.js';
import { installBaseStep } from './install-base.js';
import { installTargetStep } from './install-target.js';
import { partitionStep } from './partition.js';
import { rescueStep } from './rescue.js';
import type { Step } from './step.js';
import { verifyStep } from './verify.js';
import { wipeTargetDiskStep } from './wipe-target-disk.js';

/** The Step contract (step.ts). */
export type { Step, StepContext, StepProgress, StepResult } from './step.js';

/** The step implementations, keyed by the step names of client.ts. */
export const STEPS: Readonly<Record<StepName, Step>> = Object.freeze({
  fetch: fetchStep,
  partition: partitionStep,
  'install-base': installBaseStep,
  'capture-config': captureConfigStep,
  'apply-config-base': applyConfigBaseStep,
  'boot-base': bootBaseStep,
  'commit-base': commitBaseStep,
  'wipe-target-disk': wipeTargetDiskStep,
  'install-target': installTargetStep,
  'boot-target': bootTargetStep,
  verify: verifyStep,
  rescue: rescueStep,
  'fetch-other': fetchOtherStep,
});
