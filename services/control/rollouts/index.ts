/**
 * Owns the rollout engine's public surface: what the rest of control (server, main, client
 * types) may use. Everything else in this folder is internal to the engine.
 */
export { type EngineDeps, RolloutEngine } from './engine.js';
export {
  type ChangeEvent,
  type Counts,
  FINISHED_ROLLOUT,
  type HostOp,
  type HostState,
  type HostStatus,
  type HostWork,
  IN_FLIGHT_HOST,
  type PreheatColo,
  rescueRunId,
  type RolloutSpec,
  type RolloutState,
  type RolloutStatus,
  type RolloutView,
  type StepState,
  TERMINAL_HOST,
} from './model.js';
