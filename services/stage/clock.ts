/**
 * Injectable time for the stage: idle timeouts, backoff, negative-cache expiry and upstream
 * "down" marks all read it. It lives in shared/clock.ts (the ranged blob request of
 * shared/fetch-range.ts uses it too); re-exported here for the stage's modules and tests.
 */
export { type Clock, realClock, sleep } from '../../shared/clock.js';
