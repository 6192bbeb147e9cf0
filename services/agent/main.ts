/**
 * The `stagecoach agent` process: load and check the config once, then either supervise a
 * child agent (--supervise) or run one agent instance until SIGTERM/SIGINT or a reboot.
 */
import { isScError } from '../../shared/errors.js';
import { createLogger } from '../../shared/log.js';
import type { ConfigSources } from '../../shared/config.js';
import { loadAgentConfig, loadAgentKeys } from './config.js';
import { agentFilesOf, runAgentOnce } from './runtime.js';
import { EXIT_MACHINE_BUSY, superviseAgent } from './supervise.js';

/**
 * Runs the agent command. `childArgs` is how to start this same command again without
 * --supervise (script path and arguments). Resolves with the process exit code. Throws
 * SC_ERR_BAD_CONFIG / SC_ERR_BAD_KEY for a bad config.
 */
export async function runAgentCommand(src: ConfigSources, childArgs: string[]): Promise<number> {
  const cfg = loadAgentConfig(src);
  const logger = createLogger({ level: cfg.logLevel, name: 'agent' });
  const keys = await loadAgentKeys(cfg); // fail fast, in the supervisor too
  if (cfg.supervise) return superviseAgent({ cfg, childArgs, logger });
  let run: Awaited<ReturnType<typeof runAgentOnce>>;
  try {
    run = await runAgentOnce(cfg, { logger, keys, agentFiles: agentFilesOf(cfg, src.file) });
  } catch (err) {
    if (isScError(err, 'SC_ERR_CONFLICT')) {
      process.stderr.write(`error ${err.code}: ${err.message}\n`);
      return EXIT_MACHINE_BUSY;
    }
    throw err;
  }
  const onSignal = () => {
    logger.info('stopping');
    void run.stop();
  };
  process.once('SIGTERM', onSignal);
  process.once('SIGINT', onSignal);
  try {
    await run.exit;
  } finally {
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
    logger.flush?.();
  }
  return 0;
}
