/**
 * The client commands' defaults, so that a release engineer does not retype them: environment
 * variables (STAGECOACH_ORIGIN, STAGECOACH_CONTROL, STAGECOACH_TOKEN_FILE,
 * STAGECOACH_ORIGIN_TOKEN_FILE, STAGECOACH_TRUST_KEY) and a profile file holding the same
 * variables. A flag beats the environment, the environment beats the profile.
 *
 * The profile is STAGECOACH_PROFILE, else `$XDG_CONFIG_HOME/stagecoach/profile` (by default
 * `~/.config/stagecoach/profile`): `NAME=value` lines (dotenv syntax, # comments). Only
 * STAGECOACH_* names are accepted, so a profile cannot change anything but stagecoach.
 */
import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { delimiter, join } from 'node:path';
import { parseEnv } from 'node:util';
import { Option } from 'commander';
import { scError } from '../../shared/errors.js';

/** The variables a profile may set, with what each is for (`stagecoach --help` shows them). */
export const PROFILE_VARS: Record<string, string> = {
  STAGECOACH_ORIGIN: 'origin URL of publish, bundles and get (--origin)',
  STAGECOACH_CONTROL: 'control URL of rollout and hosts (--control)',
  STAGECOACH_TOKEN_FILE: 'token file of rollout and hosts, and of publish unless STAGECOACH_ORIGIN_TOKEN_FILE is set (--token-file)',
  STAGECOACH_ORIGIN_TOKEN_FILE: "origin's write token file for publish (--token-file)",
  STAGECOACH_TRUST_KEY: `trusted release public keys of get, PEM files separated by '${delimiter}' (--trust-key)`,
  STAGECOACH_CA: 'private CA files (PEM) trusted besides the system store (--ca)',
  STAGECOACH_LOG_FORMAT: 'json or pretty (default: pretty on a terminal)',
};

/** Where the profile is read from. */
export function profilePath(env: NodeJS.ProcessEnv = process.env): string {
  if (env.STAGECOACH_PROFILE) return env.STAGECOACH_PROFILE;
  return join(env.XDG_CONFIG_HOME || join(homedir(), '.config'), 'stagecoach', 'profile');
}

/**
 * Sets the profile's variables in `env` where they are not set already. A missing profile is
 * fine unless STAGECOACH_PROFILE names it; a name outside PROFILE_VARS is SC_ERR_BAD_CONFIG.
 */
export function loadProfile(env: NodeJS.ProcessEnv = process.env): void {
  const path = profilePath(env);
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' && !env.STAGECOACH_PROFILE) return;
    throw scError('SC_ERR_BAD_CONFIG', `cannot read the profile ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, { path });
  }
  const vars = parseEnv(text);
  for (const [name, value] of Object.entries(vars)) {
    if (!(name in PROFILE_VARS)) {
      throw scError('SC_ERR_BAD_CONFIG', `the profile ${path} sets ${name}: only ${Object.keys(PROFILE_VARS).join(', ')} are allowed`, { path, name });
    }
    if (env[name] === undefined) env[name] = value;
  }
}

/** An option whose default comes from `envName` (shown in --help as `env: NAME`); `required` makes it mandatory when neither is given. */
export function envOption(flags: string, description: string, envName: string, o: { required?: boolean; fallbackEnv?: string } = {}): Option {
  const opt = new Option(flags, description).env(envName);
  const fallback = o.fallbackEnv ? process.env[o.fallbackEnv] : undefined;
  if (fallback) opt.default(fallback, `$${o.fallbackEnv}`);
  if (o.required) opt.makeOptionMandatory();
  return opt;
}

/** The trusted release keys of `get`: the flags, else STAGECOACH_TRUST_KEY split on the path delimiter. */
export function trustKeysOf(flags: string[] | undefined, env: NodeJS.ProcessEnv = process.env): string[] {
  if (flags?.length) return flags;
  return (env.STAGECOACH_TRUST_KEY ?? '').split(delimiter).filter(Boolean);
}
