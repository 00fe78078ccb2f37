/**
 * schema.ts — the deployment configuration file (doorman.yaml), validated with zod.
 * Unknown keys are errors (a typo must not silently fall back to a default).
 * docs/configuration.md documents every key.
 */
import { z } from 'zod';
import { parseBackendSpec } from '../backend/pool.js';
import { BACKEND_DEFAULTS, DNS_DEFAULTS, RECORD_DEFAULTS, REDIS_DEFAULTS, DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN, DEFAULT_RULES_DIR, LIMIT_DEFAULTS } from './defaults.js';

const ms = z.number().int().nonnegative();
const positive = z.number().int().positive();

export const hostPort = z.string().refine((s) => parseHostPort(s) !== null, { message: 'expected host:port ([v6]:port for IPv6)' });

/**
 * Listener roles: smtp (port 25 role: STARTTLS), submission (587 role), smtps (465 role: implicit
 * TLS) are SMTP fronts; policy (Postfix SMTP access policy delegation, fronts/policy/) and milter
 * (fronts/milter/) serve an MTA that keeps its own SMTP.
 */
export const LISTENER_ROLES = ['smtp', 'submission', 'smtps', 'milter', 'policy'] as const;
export type ListenerRole = (typeof LISTENER_ROLES)[number];
/** Roles whose listener may be a unix socket (an absolute path instead of host:port). */
export const UNIX_SOCKET_ROLES: readonly ListenerRole[] = ['milter', 'policy'];

export const listenerSchema = z
  .strictObject({
  /** host:port to listen on; for the milter and policy roles also a unix socket's absolute path. */
  address: z.string().min(1),
  role: z.enum(LISTENER_ROLES).default('smtp'),
  /** Name in logs and metrics; default: role@address. */
  name: z.string().min(1).optional(),
  /** Expect a PROXY protocol v1/v2 header from the trusted proxies. */
  proxyProtocol: z.boolean().default(false),
  /** Addresses or CIDRs allowed to send a PROXY header. */
  trustedProxies: z.array(z.string()).default([]),
  /** Offer AUTH without TLS (default only under TLS). */
  authPlaintext: z.boolean().default(false),
})
  .superRefine((l, ctx) => {
    if (parseHostPort(l.address)) return;
    if (UNIX_SOCKET_ROLES.includes(l.role) && isSocketPath(l.address)) return;
    const unix = UNIX_SOCKET_ROLES.includes(l.role) ? ' or an absolute unix socket path' : '';
    ctx.addIssue({ code: 'custom', path: ['address'], message: `expected host:port ([v6]:port for IPv6)${unix}` });
  });

/** A unix socket path as a listener address: absolute, no NUL. */
export function isSocketPath(s: string): boolean {
  return s.startsWith('/') && !s.includes('\0') && s.length < 108;
}

export const configSchema = z.strictObject({
  /** Name in the greeting and EHLO reply. */
  hostname: z.string().regex(/^[A-Za-z0-9.-]+$/, 'a host name').optional(),
  /** Worker processes sharing the listeners: a number, or auto (one per core; without Redis the
   *  workers share the primary's in-memory store, store/primary.ts). */
  workers: z.union([z.literal('auto'), z.number().int().min(1).max(64)]).default('auto'),
  listen: z.array(listenerSchema).min(1).default([{ address: DEFAULT_LISTEN, role: 'smtp', proxyProtocol: false, trustedProxies: [], authPlaintext: false }]),
  backend: z
    .strictObject({
      /** host:port; "10 mx1:25, 20 mx2:25" (MX-style preferences); "mx:example.com[:port]". */
      address: z.string().refine((v) => parseBackendSpec(v) !== null, 'expected host:port, "10 host:port, 20 host:port" or mx:domain[:port]').default(BACKEND_DEFAULTS.address),
      /** How long a failed backend is skipped, ms. */
      backoff: positive.default(BACKEND_DEFAULTS.backoff),
      /** Idle backend connections kept per backend for later client sessions; 0 = no reuse. */
      poolSize: z.number().int().nonnegative().default(BACKEND_DEFAULTS.poolSize),
      /** An idle pooled connection is closed after this long, ms. */
      poolIdleTimeout: positive.default(BACKEND_DEFAULTS.poolIdleTimeout),
      /** Connections per backend (busy + idle + being opened) per instance. */
      maxConnections: positive.default(BACKEND_DEFAULTS.maxConnections),
      /** Prepared idle connections kept per backend; 0 = none. */
      spares: z.number().int().nonnegative().default(BACKEND_DEFAULTS.spares),
      /** Wait for a free backend connection at HELO/EHLO, ms. */
      acquireTimeout: ms.default(BACKEND_DEFAULTS.acquireTimeout),
      connectTimeout: ms.default(BACKEND_DEFAULTS.connectTimeout),
      greetingTimeout: ms.default(BACKEND_DEFAULTS.greetingTimeout),
      commandTimeout: ms.default(BACKEND_DEFAULTS.commandTimeout),
      dataTimeout: ms.default(BACKEND_DEFAULTS.dataTimeout),
      starttls: z.enum(['auto', 'off', 'require']).default(BACKEND_DEFAULTS.starttls),
      tlsVerify: z.boolean().default(BACKEND_DEFAULTS.tlsVerify),
      xclient: z.boolean().default(BACKEND_DEFAULTS.xclient),
      xclientHelo: z.boolean().default(BACKEND_DEFAULTS.xclientHelo),
      chunking: z.boolean().default(BACKEND_DEFAULTS.chunking),
      deferMail: z.boolean().default(BACKEND_DEFAULTS.deferMail),
      proxyProtocol: z.enum(['off', 'v1', 'v2']).default(BACKEND_DEFAULTS.proxyProtocol),
      traceHeader: z.enum(['auto', 'always', 'never']).default(BACKEND_DEFAULTS.traceHeader),
      authResults: z.boolean().default(BACKEND_DEFAULTS.authResults),
      spoolDir: z.string().default(BACKEND_DEFAULTS.spoolDir),
    })
    .prefault({}),
  tls: z
    .strictObject({
      cert: z.string().optional(),
      key: z.string().optional(),
    })
    .prefault({}),
  rules: z
    .strictObject({
      dir: z.string().default(DEFAULT_RULES_DIR),
      /** Reload rule files when they change (SIGHUP always reloads). */
      watch: z.boolean().default(true),
    })
    .prefault({}),
  redis: z
    .strictObject({
      /** redis://… (or rediss://); redis+cluster://h:p,h:p; redis+sentinel://h:p,h:p/master. Unset: in memory. */
      url: z.string().optional(),
      /** Cluster seed nodes host:port (instead of url). */
      cluster: z.array(z.string()).default([]),
      /** Sentinel nodes host:port and master name (instead of url). */
      sentinels: z.array(z.string()).default([]),
      sentinelName: z.string().default('mymaster'),
      /** Key prefix, so several deployments can share a Redis. */
      prefix: z.string().default('doorman:'),
      /** Per-command deadline, ms: a slow Redis fails fast into the rule's onError. */
      commandTimeout: positive.default(REDIS_DEFAULTS.commandTimeout),
    })
    .prefault({}),
  dns: z
    .strictObject({
      /** DNS servers (host or host:port); empty: the system's. */
      servers: z.array(z.string()).default([]),
      /** Per-try timeout, ms: well under the SMTP deadlines. */
      timeout: positive.default(DNS_DEFAULTS.timeout),
      /** Tries per query. */
      tries: z.number().int().min(1).max(5).default(DNS_DEFAULTS.tries),
      /** DNS answers kept for later sessions; 0 = no cache. */
      cacheSize: z.number().int().nonnegative().default(DNS_DEFAULTS.cacheSize),
      /** Longest time a DNS answer is kept, seconds (A/AAAA: their TTL up to this). */
      cacheMaxTtl: z.number().int().nonnegative().max(86_400).default(DNS_DEFAULTS.cacheMaxTtl),
    })
    .prefault({}),
  /** Session records for `doorman replay` (docs/operations.md "Session records"); off without `dir`. */
  record: z
    .strictObject({
      /** Folder of the record files (JSON Lines); unset: no recording. */
      dir: z.string().min(1).optional(),
      sampleRate: z.number().min(0).max(1).default(RECORD_DEFAULTS.sampleRate),
      headers: z.boolean().default(RECORD_DEFAULTS.headers),
      maxFileBytes: z.number().int().min(4096).default(RECORD_DEFAULTS.maxFileBytes),
      maxFileAge: positive.default(RECORD_DEFAULTS.maxFileAge),
      maxTotalBytes: z.number().int().min(4096).default(RECORD_DEFAULTS.maxTotalBytes),
      maxPendingBytes: z.number().int().min(4096).default(RECORD_DEFAULTS.maxPendingBytes),
    })
    .prefault({}),
  metrics: z
    .strictObject({
      /** host:port for /metrics, /healthz, /readyz; "off" disables. */
      listen: z.string().default(DEFAULT_METRICS_LISTEN),
    })
    .prefault({}),
  log: z
    .strictObject({
      level: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
    })
    .prefault({}),
  limits: z
    .strictObject({
      maxClients: positive.default(LIMIT_DEFAULTS.maxClients),
      maxClientsPerIp: positive.default(LIMIT_DEFAULTS.maxClientsPerIp),
      clientIpv6Prefix: z.number().int().min(16).max(128).default(LIMIT_DEFAULTS.clientIpv6Prefix),
      maxCommandLine: z.number().int().min(512).default(LIMIT_DEFAULTS.maxCommandLine),
      extensionAllowance: z.number().int().nonnegative().default(LIMIT_DEFAULTS.extensionAllowance),
      maxAuthLine: z.number().int().min(512).default(LIMIT_DEFAULTS.maxAuthLine),
      maxDataLine: z.number().int().refine((n) => n === 0 || n >= 1000, '0 (no limit) or at least 1000').default(LIMIT_DEFAULTS.maxDataLine),
      maxMessageSize: positive.default(LIMIT_DEFAULTS.maxMessageSize),
      maxRecipients: z.number().int().min(1).default(LIMIT_DEFAULTS.maxRecipients),
      maxErrors: positive.default(LIMIT_DEFAULTS.maxErrors),
      maxUnknownCommands: positive.default(LIMIT_DEFAULTS.maxUnknownCommands),
      maxCommands: positive.default(LIMIT_DEFAULTS.maxCommands),
      maxJunkCommands: positive.default(LIMIT_DEFAULTS.maxJunkCommands),
      writeTimeout: positive.default(LIMIT_DEFAULTS.writeTimeout),
      commandTimeout: positive.default(LIMIT_DEFAULTS.commandTimeout),
      dataTimeout: positive.default(LIMIT_DEFAULTS.dataTimeout),
      drainTimeout: ms.default(LIMIT_DEFAULTS.drainTimeout),
      maxBuffered: z.number().int().min(4096).default(LIMIT_DEFAULTS.maxBuffered),
      proxyHeaderTimeout: positive.default(LIMIT_DEFAULTS.proxyHeaderTimeout),
      tlsHandshakeTimeout: positive.default(LIMIT_DEFAULTS.tlsHandshakeTimeout),
      maxHeaderBytes: z.number().int().min(1024).default(LIMIT_DEFAULTS.maxHeaderBytes),
      holdInMemory: z.number().int().nonnegative().default(LIMIT_DEFAULTS.holdInMemory),
      bareNewline: z.enum(['normalize', 'reject']).default(LIMIT_DEFAULTS.bareNewline),
      greetDelay: ms.max(30_000).default(LIMIT_DEFAULTS.greetDelay),
      pregreetAction: z.enum(['drop', 'ignore']).default(LIMIT_DEFAULTS.pregreetAction),
      minDataRate: z.number().int().nonnegative().default(LIMIT_DEFAULTS.minDataRate),
      maxAuthFailures: positive.default(LIMIT_DEFAULTS.maxAuthFailures),
      maxEventLoopLag: ms.default(LIMIT_DEFAULTS.maxEventLoopLag),
      maxPendingDryRun: z.number().int().nonnegative().default(LIMIT_DEFAULTS.maxPendingDryRun),
      policyIdleTimeout: positive.default(LIMIT_DEFAULTS.policyIdleTimeout),
      policyInstanceTtl: positive.default(LIMIT_DEFAULTS.policyInstanceTtl),
      policyMaxInstances: positive.default(LIMIT_DEFAULTS.policyMaxInstances),
      policyMaxLine: z.number().int().min(512).default(LIMIT_DEFAULTS.policyMaxLine),
      policyMaxAttributes: z.number().int().min(10).default(LIMIT_DEFAULTS.policyMaxAttributes),
      policyMaxConnections: positive.default(LIMIT_DEFAULTS.policyMaxConnections),
    })
    .prefault({}),
});

export type Config = z.output<typeof configSchema>;

/** A listener's name in logs, metrics and rule scopes: `name`, or role@address (as listener.ts names it). */
export function listenerRefs(config: Config): { name: string; role: ListenerConfig['role'] }[] {
  return config.listen.map((l) => ({ name: listenerName(l), role: l.role }));
}
export type ListenerConfig = z.output<typeof listenerSchema>;

/** A listener's name in logs, metrics and rule scopes: its `name`, else role@address. */
export function listenerName(l: Pick<ListenerConfig, 'name' | 'role' | 'address'>): string {
  return l.name ?? `${l.role}@${l.address}`;
}
export type Limits = Config['limits'];
export type RecordConfig = Config['record'];

/** `host:port`, `[v6]:port`. Returns null when malformed. */
export function parseHostPort(s: string): { host: string; port: number } | null {
  const m = /^\[([^\]]+)\]:(\d{1,5})$/.exec(s) ?? /^([^:[\]]+):(\d{1,5})$/.exec(s);
  if (!m || m[1] === undefined || m[2] === undefined) return null;
  const port = Number(m[2]);
  if (port > 65535) return null;
  return { host: m[1], port };
}
