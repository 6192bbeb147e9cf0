/** The CLI's command modules: which file registers which command (main.ts loads only the one being run). */
// Each module registers one command (or a group), keyed by the command names it adds. Keep
// this list in the order of `--help`. Only the module of the command being run is loaded, so a
// long-running service (a stage, an agent) does not carry every other command's dependencies.
const FILES: [names: string[], file: string][] = [
  [['keys'], './keys.js'],
  [['origin'], './origin.js'],
  [['publish'], './publish.js'],
  [['bundles'], './bundles.js'],
  [['get'], './get.js'],
  [['stage'], './stage.js'],
  [['machine'], './machine.js'],
  [['agent'], './agent.js'],
  [['control'], './control.js'],
  [['rollout'], './rollout.js'],
  [['hosts', 'host'], './hosts.js'],
  [['acl'], './acl.js'],
  [['tls'], './tls.js'],
  [['demo'], './demo.js'],
  [['vm'], './vm.js'],
  [['completion'], './completion.js'],
];

/** Each command module's names and its URL (to `import()` from anywhere). */
export const COMMAND_MODULES: [names: string[], url: string][] = FILES.map(([names, file]) => [names, new URL(file, import.meta.url).href]);
