/** Step names and the sequences control enqueues (ARCHITECTURE.md, steps 1–11, and host operations). */

/** The conversion sequence, steps 1–11 of ARCHITECTURE.md, in order. */
export const CONVERT_STEPS = [
  'fetch',
  'partition',
  'install-base',
  'capture-config',
  'apply-config-base',
  'boot-base',
  'commit-base',
  'wipe-target-disk',
  'install-target',
  'boot-target',
  'verify',
] as const;

/** Every step name an agent understands. */
export const STEP_NAMES = [...CONVERT_STEPS, 'rescue', 'fetch-other'] as const;
export type StepName = (typeof STEP_NAMES)[number];

/** The step after which the host can no longer fall back to OS A. */
export const POINT_OF_NO_RETURN: StepName = 'commit-base';

/** `name@version` of a bundle, split. */
export interface BundleRef {
  name: string;
  version: string;
}

/** `name@version` of a bundle reference. */
export function refString(r: BundleRef): string {
  return `${r.name}@${r.version}`;
}

/** One step of a sequence before signing. */
export interface SequenceStep {
  step: StepName;
  args?: Record<string, unknown>;
}

/** The conversion A → C through base B, as a sequence. */
export function convertSequence(base: BundleRef, target: BundleRef): SequenceStep[] {
  return CONVERT_STEPS.map((step) => ({ step, args: { base, target } }));
}

/** Boot into the rescue OS B (from C, or from a broken disk 1). */
export function rescueSequence(): SequenceStep[] {
  return [{ step: 'rescue' }];
}

/** From B, reinstall the kept target bundle from disk2p2 and boot it. */
export function reinstallSequence(): SequenceStep[] {
  return [{ step: 'rescue' }, { step: 'wipe-target-disk' }, { step: 'install-target' }, { step: 'boot-target' }, { step: 'verify' }];
}

/** From B, fetch another OS D through the stage and install it on disk 1. */
export function installOtherSequence(other: BundleRef): SequenceStep[] {
  const args = { target: other };
  return [
    { step: 'rescue' },
    { step: 'fetch-other', args },
    { step: 'wipe-target-disk', args },
    { step: 'install-target', args },
    { step: 'boot-target', args },
    { step: 'verify', args },
  ];
}
