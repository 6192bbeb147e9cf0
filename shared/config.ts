/**
 * Config loading: an optional YAML file, then environment variables, then flags (each
 * overriding the last), validated once against a strict zod schema (unknown keys are
 * rejected) and deep-frozen. No other module reads process.env.
 */
import { readFileSync } from 'node:fs';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { scError } from './errors.js';

export interface ConfigSources {
  /** Values from command-line flags; undefined entries are ignored. */
  flags?: Record<string, unknown>;
  /** The environment to read; defaults to process.env. */
  env?: NodeJS.ProcessEnv;
  /** Env prefix; `listen` is read from `${prefix}LISTEN`. */
  envPrefix?: string;
  /** Optional YAML file path. */
  file?: string;
  /**
   * The command-line flag of a setting, where it is not `--` + the key in kebab case (`upstreams`
   * is `--upstream`); used to name a missing setting.
   */
  flagNames?: Record<string, string>;
}

/** Deep-freezes an object graph. */
export function deepFreeze<T>(o: T): Readonly<T> {
  if (o && typeof o === 'object' && !Object.isFrozen(o)) {
    Object.freeze(o);
    for (const v of Object.values(o)) deepFreeze(v);
  }
  return o;
}

function camelToEnv(k: string): string {
  return k.replace(/([a-z0-9])([A-Z])/g, '$1_$2').toUpperCase();
}

function camelToKebab(k: string): string {
  return k.replace(/([a-z0-9])([A-Z])/g, '$1-$2').toLowerCase();
}

/**
 * Says where a missing setting can be given: `'data' (--data or STAGECOACH_ORIGIN_DATA)`, so a
 * person learns which setting and how to set it. In-process configs (no env prefix) get the key.
 */
function missingSetting(key: string, src: ConfigSources): string {
  if (!src.envPrefix) return `'${key}'`;
  const flag = src.flagNames?.[key] ?? `--${camelToKebab(key)}`;
  return `'${key}' (${flag} or ${src.envPrefix}${camelToEnv(key)})`;
}

/**
 * One line for the schema's complaints: settings that are absent are named as such (zod alone
 * says `expected string, received undefined`), the rest keep their path and message.
 */
function configProblems(issues: z.core.$ZodIssue[], merged: Record<string, unknown>, src: ConfigSources): string {
  const missing: string[] = [];
  const other: string[] = [];
  for (const i of issues) {
    const key = i.path.length === 1 ? String(i.path[0]) : undefined;
    if (key !== undefined && i.code === 'invalid_type' && merged[key] === undefined) missing.push(missingSetting(key, src));
    else other.push(`${i.path.join('.') || '(root)'}: ${i.message}`);
  }
  const parts = missing.length ? [`missing setting${missing.length > 1 ? 's' : ''} ${missing.join(', ')}`] : [];
  if (other.length) parts.push(`invalid configuration: ${other.join('; ')}`);
  return parts.join('; ');
}

function defined(o: Record<string, unknown> = {}): Record<string, unknown> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined));
}

/**
 * Loads, validates and freezes a config. Throws SC_ERR_BAD_CONFIG listing every problem.
 * Env values are strings; the schema should coerce where it expects numbers.
 */
export function loadConfig<S extends z.ZodObject>(schema: S, src: ConfigSources = {}): Readonly<z.infer<S>> {
  let fromFile: Record<string, unknown> = {};
  if (src.file) {
    try {
      fromFile = (parseYaml(readFileSync(src.file, 'utf8')) as Record<string, unknown>) ?? {};
    } catch (err) {
      throw scError('SC_ERR_BAD_CONFIG', `cannot read config file ${src.file}: ${(err as Error).message}`);
    }
    if (typeof fromFile !== 'object' || Array.isArray(fromFile)) throw scError('SC_ERR_BAD_CONFIG', `${src.file}: expected a mapping`);
  }
  const fromEnv: Record<string, unknown> = {};
  const env = src.env ?? process.env;
  if (src.envPrefix) {
    for (const key of Object.keys(schema.shape)) {
      const v = env[src.envPrefix + camelToEnv(key)];
      if (v !== undefined && v !== '') fromEnv[key] = v;
    }
  }
  const merged = { ...fromFile, ...fromEnv, ...defined(src.flags) };
  const r = schema.safeParse(merged);
  if (!r.success) {
    throw scError('SC_ERR_BAD_CONFIG', configProblems(r.error.issues, merged, src));
  }
  return deepFreeze(r.data);
}

/** Parses `host:port` (or `:port`, or a bare port) into listen options. */
export function parseListen(s: string): { host: string; port: number } {
  const m = /^(?:\[?([^\]]*)\]?:)?(\d{1,5})$/.exec(s.trim());
  if (!m) throw scError('SC_ERR_BAD_CONFIG', `bad listen address ${JSON.stringify(s)}: expected HOST:PORT`);
  const port = Number(m[2]);
  if (port > 65535) throw scError('SC_ERR_BAD_CONFIG', `bad port ${port}`);
  return { host: m[1] || '127.0.0.1', port };
}

/** Parses a byte size such as `20GiB`, `512MiB`, `1e9` or `4096`. */
export function parseBytes(s: string | number): number {
  if (typeof s === 'number') return s;
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$/i.exec(s);
  if (!m) throw scError('SC_ERR_BAD_CONFIG', `bad byte size ${JSON.stringify(s)}`);
  const unit = (m[2] ?? 'B').toUpperCase().replace(/B$/, '');
  const pow = { '': 0, K: 1, KI: 1, M: 2, MI: 2, G: 3, GI: 3, T: 4, TI: 4 }[unit];
  if (pow === undefined) throw scError('SC_ERR_BAD_CONFIG', `bad byte unit in ${s}`);
  const base = unit.endsWith('I') || unit === '' ? 1024 : 1000;
  return Math.floor(Number(m[1]) * base ** pow);
}

/**
 * A byte size in a config schema: a non-negative integer, or a string `parseBytes` accepts
 * (`20GiB`, `512MiB`, `1e9`). Parses to a number of bytes.
 */
export const byteSize = z.union([z.number().int().nonnegative(), z.string()]).transform((v, ctx) => {
  try {
    return parseBytes(v);
  } catch (err) {
    ctx.addIssue({ code: 'custom', message: (err as Error).message });
    return z.NEVER;
  }
});

/** A token with the name it is known by (the audit log's `token`); a bare token is named `admin`. */
export interface NamedToken {
  name: string;
  token: string;
}

/**
 * The one token file format, read by every server and by the CLI: one token per line, either
 * `NAME:TOKEN` (NAME is 1–64 of `[A-Za-z0-9_.-]`) or a bare `TOKEN` (named `admin`); blank lines
 * and `#` comments are skipped. Throws SC_ERR_BAD_CONFIG when no token is left, a name repeats,
 * or a token is not one word of at most 4096 bytes. No token appears in an error.
 */
export function parseTokenLines(text: string, path = 'token file'): NamedToken[] {
  const out: NamedToken[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const m = /^([A-Za-z0-9_.-]{1,64}):(\S+)$/.exec(line);
    const t = m ? { name: m[1], token: m[2] } : { name: 'admin', token: line };
    if (/\s/.test(t.token) || t.token.length > 4096) throw scError('SC_ERR_BAD_CONFIG', `${path}: the token must be one word of at most 4096 bytes`);
    if (out.some((o) => o.name === t.name)) throw scError('SC_ERR_BAD_CONFIG', `${path}: token name ${t.name} appears twice`);
    out.push(t);
  }
  if (out.length === 0) throw scError('SC_ERR_BAD_CONFIG', `${path} holds no token`);
  return out;
}

/**
 * Reads a token file (format: parseTokenLines) and returns its first token, without its name:
 * what a client sends, and the one token origin and stages accept. So the demo's
 * `control.token` (`ops:…`) works as the CLI's --token-file as it is. Throws SC_ERR_BAD_CONFIG
 * when the file cannot be read or holds no token.
 */
export function readTokenFile(path: string): string {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw scError('SC_ERR_BAD_CONFIG', `cannot read token file ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  return parseTokenLines(text, `token file ${path}`)[0].token;
}

/**
 * A list given as an array (flags, YAML) or comma-separated (environment), each item checked by
 * `item`; `what` names the list in the error.
 */
export const commaList = <T extends z.ZodType>(item: T, what = 'a list') =>
  z.preprocess(
    (v) =>
      typeof v === 'string'
        ? v
            .split(',')
            .map((s) => s.trim())
            .filter(Boolean)
        : v,
    z.array(item, { error: `expected ${what}` }),
  );

/** A list of non-empty strings (see commaList). */
export const stringList = commaList(z.string().min(1));
