/**
 * load.ts — the deployment configuration: a YAML file, then environment variables on top
 * (the container convention), validated together. Errors name the file, line and key, or the
 * environment variable.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parse as parseYaml } from 'yaml';
import { DoormanError, type Problem } from '../errors.js';
import { configSchema, isSocketPath, LISTENER_ROLES, parseHostPort, UNIX_SOCKET_ROLES, type Config } from './schema.js';
import { validateYaml } from './yaml.js';

/** Environment variables and the config keys they set. */
export const ENV_VARS = {
  DOORMAN_CONFIG: 'path of the configuration file (default ./doorman.yaml when it exists)',
  DOORMAN_LISTEN: 'listeners, comma-separated [role[+proxy]://]host:port (role smtp, submission, smtps, policy, milter; policy:///path for a unix socket)',
  DOORMAN_TRUSTED_PROXIES: 'comma-separated addresses/CIDRs allowed to send PROXY headers (for +proxy listeners)',
  DOORMAN_BACKEND: 'host:port of the backend MTA (backend.address)',
  DOORMAN_HOSTNAME: 'name in the greeting (hostname)',
  DOORMAN_RULES: 'folder of rule files (rules.dir)',
  DOORMAN_REDIS_URL: 'Redis URL for shared state (redis.url); unset = in-memory',
  DOORMAN_DNS_SERVERS: 'comma-separated DNS servers (dns.servers); unset = system resolver',
  DOORMAN_METRICS_LISTEN: 'host:port for /metrics, /healthz, /readyz, or "off" (metrics.listen)',
  DOORMAN_TLS_CERT: 'PEM certificate file (tls.cert)',
  DOORMAN_TLS_KEY: 'PEM private key file (tls.key)',
  DOORMAN_LOG_LEVEL: 'log level (log.level)',
  DOORMAN_WORKERS: 'worker processes: a number or auto (one per core) (workers)',
  DOORMAN_TRACE_HEADER: 'a Received: field on each message: auto (when the backend cannot be told the client), always, never (backend.traceHeader)',
} as const;

type Raw = Record<string, unknown>;

export interface LoadOptions {
  file?: string;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

export interface LoadedConfig {
  config: Config;
  /** The file read, if any. */
  file: string | null;
  /** The effective greeting name. */
  hostname: string;
}

export function loadConfig(opts: LoadOptions = {}): LoadedConfig {
  const env = opts.env ?? process.env;
  const cwd = opts.cwd ?? process.cwd();
  let file = opts.file ?? env.DOORMAN_CONFIG ?? null;
  if (!file && fs.existsSync(path.join(cwd, 'doorman.yaml'))) file = 'doorman.yaml';
  let raw: Raw = {};
  let text = '';
  if (file) {
    file = path.resolve(cwd, file);
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch (e) {
      throw new DoormanError('DMN_ERR_CONFIG_READ', `${file}: ${(e as Error).message}`);
    }
    // Validate the file alone first, so its errors carry line numbers.
    const fileCheck = validateYaml(text, file, configSchema);
    if (!fileCheck.ok) throw new DoormanError('DMN_ERR_CONFIG_INVALID', file, fileCheck.problems);
    raw = (parseYaml(text) as Raw | null) ?? {};
  }
  const problems: Problem[] = [];
  applyEnv(raw, env, problems);
  const parsed = configSchema.safeParse(raw);
  if (!parsed.success) {
    for (const i of parsed.error.issues) {
      problems.push({ file: 'environment', line: null, key: i.path.map(String).join('.'), message: i.message });
    }
  }
  if (problems.length || !parsed.success) throw new DoormanError('DMN_ERR_CONFIG_INVALID', 'environment', problems);
  const config = parsed.data;
  config.rules.dir = path.resolve(file ? path.dirname(file) : cwd, config.rules.dir);
  for (const k of ['cert', 'key'] as const) {
    const v = config.tls[k];
    if (v) config.tls[k] = path.resolve(file ? path.dirname(file) : cwd, v);
  }
  return { config, file, hostname: config.hostname ?? os.hostname() };
}

function section(raw: Raw, key: string): Raw {
  const v = raw[key];
  if (v && typeof v === 'object' && !Array.isArray(v)) return v as Raw;
  const s: Raw = {};
  raw[key] = s;
  return s;
}

const csv = (s: string) => s.split(',').map((x) => x.trim()).filter(Boolean);

function applyEnv(raw: Raw, env: NodeJS.ProcessEnv, problems: Problem[]): void {
  const bad = (key: string, message: string) => problems.push({ file: 'environment', line: null, key, message });
  if (env.DOORMAN_LISTEN) {
    const trusted = env.DOORMAN_TRUSTED_PROXIES ? csv(env.DOORMAN_TRUSTED_PROXIES) : [];
    const listeners = csv(env.DOORMAN_LISTEN).map((item) => {
      const m = /^(?:([a-z]+)(\+proxy)?:\/\/)?(.+)$/.exec(item);
      const role = m?.[1] ?? 'smtp';
      const address = m?.[3] ?? item;
      if (!(LISTENER_ROLES as readonly string[]).includes(role)) bad('DOORMAN_LISTEN', `unknown role "${role}" in ${item}`);
      else if ((UNIX_SOCKET_ROLES as readonly string[]).includes(role) && isSocketPath(address)) {
        // policy:///run/doorman/policy.sock: the path after the scheme's "//" is the socket.
      } else if (!parseHostPort(address)) bad('DOORMAN_LISTEN', `expected host:port in ${item}`);
      if (m?.[2] && (UNIX_SOCKET_ROLES as readonly string[]).includes(role)) bad('DOORMAN_LISTEN', `+proxy is for SMTP listeners, not ${role}: ${item}`);
      return { address, role, proxyProtocol: Boolean(m?.[2]), trustedProxies: trusted };
    });
    raw.listen = listeners;
  }
  if (env.DOORMAN_BACKEND) section(raw, 'backend').address = env.DOORMAN_BACKEND;
  if (env.DOORMAN_TRACE_HEADER) section(raw, 'backend').traceHeader = env.DOORMAN_TRACE_HEADER;
  if (env.DOORMAN_HOSTNAME) raw.hostname = env.DOORMAN_HOSTNAME;
  if (env.DOORMAN_RULES) section(raw, 'rules').dir = env.DOORMAN_RULES;
  if (env.DOORMAN_REDIS_URL) section(raw, 'redis').url = env.DOORMAN_REDIS_URL;
  if (env.DOORMAN_DNS_SERVERS) section(raw, 'dns').servers = csv(env.DOORMAN_DNS_SERVERS);
  if (env.DOORMAN_METRICS_LISTEN) section(raw, 'metrics').listen = env.DOORMAN_METRICS_LISTEN;
  if (env.DOORMAN_TLS_CERT) section(raw, 'tls').cert = env.DOORMAN_TLS_CERT;
  if (env.DOORMAN_TLS_KEY) section(raw, 'tls').key = env.DOORMAN_TLS_KEY;
  if (env.DOORMAN_LOG_LEVEL) section(raw, 'log').level = env.DOORMAN_LOG_LEVEL;
  if (env.DOORMAN_WORKERS) raw.workers = env.DOORMAN_WORKERS === 'auto' ? 'auto' : Number(env.DOORMAN_WORKERS);
}
