/**
 * The command channel's protocol, shared by control (the producer and reader), the agent (the
 * consumer) and the relay (a consumer on hosts' behalf): key layout (keys.ts), steps and
 * sequences (steps.ts), the signed step job (job.ts), host records and reports (records.ts),
 * the producer (producer.ts), the consumer of a step queue and the failure codec of its
 * `failedReason` (consumer.ts), the consumer's view of a job (transport.ts) and the relay wire
 * (relay-wire.ts). No service's internals are imported from here.
 */
export * from './consumer.js';
export * from './job.js';
export * from './keys.js';
export * from './producer.js';
export * from './records.js';
export * from './relay-wire.js';
export * from './steps.js';
export * from './transport.js';
