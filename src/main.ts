/**
 * main.ts — wiring only: configuration → logger → metrics → rules → listeners → metrics
 * endpoint → reload and shutdown signals.
 */
import fs from 'node:fs';
import cluster from 'node:cluster';
import net from 'node:net';
import os from 'node:os';
import { AggregatorRegistry } from 'prom-client';
import tls from 'node:tls';
import type { Logger } from 'pino';
import { BackendConnection, type BackendOptions } from './backend/connection.js';
import { BackendPool, parseBackendSpec } from './backend/pool.js';
import { loadConfig, type LoadedConfig } from './config/load.js';
import { restartOnlyChanges } from './config/reload.js';
import { closeRuleSet, loadRuleSet, type RuleSet } from './config/rules.js';
import { listenerRefs, parseHostPort } from './config/schema.js';
import { watchFiles, watchRules } from './config/watch.js';
import { DoormanError, formatProblem } from './errors.js';
import { startMetricsServer } from './metrics/http.js';
import { createMetrics, type Metrics } from './metrics/registry.js';
import { removeStaleSockets } from './fronts/listen.js';
import { Proxy } from './listener.js';
import { serveSlots, WorkerSlots } from './slots.js';
import { createLogger } from './log.js';
import type { RuleDeps } from './pipeline/rule.js';
import { RULE_TYPES } from './rules/index.js';
import { createResolver, type DnsResolver } from './net/dns.js';
import { cachingResolver } from './net/dns-cache.js';
import { serveStore, WorkerStore } from './store/primary.js';
import { MemoryStore, type Store } from './store/store.js';
import { parseAddress } from './net/ip.js';
import { VERSION } from './version.js';
import { Recording, recordingResolver, recordingStore } from './record/recorder.js';
import { RecordWriter } from './record/writer.js';

export interface Running {
  proxy: Proxy;
  metrics: Metrics;
  log: Logger;
  /**
   * Reloads the rule files, and the settings that may change while running (limits, the TLS
   * certificate: src/config/reload.ts); false when something was invalid (its last good version stays).
   */
  reload(): boolean;
  /** Drains and stops everything. */
  stop(deadline?: number): Promise<void>;
}

export function backendOptions(loaded: LoadedConfig): BackendOptions {
  const b = loaded.config.backend;
  // host/port are set per attempt from the pool (backend/pool.ts).
  return { ...b, host: '', port: 0, heloName: loaded.hostname };
}

export function createBackendPool(loaded: LoadedConfig, resolver: DnsResolver, metrics: Metrics, log: Logger): BackendPool {
  const spec = parseBackendSpec(loaded.config.backend.address);
  if (!spec) throw new DoormanError('DMN_ERR_CONFIG_INVALID', `backend.address ${loaded.config.backend.address}`);
  const pool = new BackendPool(spec, loaded.config.backend.backoff, resolver, {
    onState: (t, up, reason) => {
      metrics.backendUp.set({ backend: t.name }, up ? 1 : 0);
      if (up) log.info({ backend: t.name }, 'backend up');
      else log.warn({ backend: t.name, reason, backoffMs: loaded.config.backend.backoff }, 'backend down; skipped until the back-off ends');
    },
    onIdle: (n) => metrics.backendPoolIdle.set(n),
    onConnections: (t, n) => metrics.backendConnections.set({ backend: t.name }, n),
    onResolveError: (err) => log.warn({ err: err.message, backend: loaded.config.backend.address }, 'backend MX lookup failed; keeping the last known backends'),
  });
  const b = loaded.config.backend;
  pool.idleOptions = { max: b.poolSize, timeout: b.poolIdleTimeout };
  // The cap holds for the instance: cluster workers share it (each its own pool).
  const workers = cluster.isWorker ? workerCount(loaded) : 1;
  pool.limits = { maxConnections: Math.max(1, Math.floor(b.maxConnections / workers)), spares: b.spares, acquireTimeout: b.acquireTimeout };
  // Spares know no client yet: only without a PROXY header to the backend (it names one client).
  if (b.proxyProtocol === 'off') {
    const opts = backendOptions(loaded);
    pool.opener = (t) => BackendConnection.open({ ...opts, host: t.host, port: t.port }, { address: '0.0.0.0', port: 0, destAddress: '0.0.0.0', destPort: 0, family: 4, destFamily: 4 });
  }

  for (const t of pool.all) {
    metrics.backendUp.set({ backend: t.name }, 1);
    metrics.backendConnections.set({ backend: t.name }, 0);
    for (const kind of ['connect', 'timeout', 'closed', 'protocol', 'refused', 'tls']) metrics.backendFailures.inc({ backend: t.name, kind }, 0);
  }
  return pool;
}

export function ruleDeps(loaded: LoadedConfig, metrics: Metrics, log: RuleDeps['log'], store: Store = new MemoryStore()): RuleDeps {
  const { dns } = loaded.config;
  return {
    ownNames: [loaded.hostname.toLowerCase()],
    ownAddresses: ownAddresses(loaded),
    resolver: cachingResolver(createResolver({ servers: dns.servers, timeout: dns.timeout, tries: dns.tries }), {
      size: dns.cacheSize,
      maxTtl: dns.cacheMaxTtl,
      onHit: () => metrics.dnsCacheHits.inc(),
    }),
    store,
    metrics,
    log,
    now: () => Date.now(),
  };
}

/**
 * The shared store: Redis when configured (a URL, `redis+cluster://h:p,h:p`,
 * `redis+sentinel://h:p,h:p/master`, or the cluster/sentinels keys), else in memory. ioredis is
 * loaded only for Redis: about 10 MB of memory per process that an install without Redis (the
 * default) does not need.
 */
export async function createStore(loaded: LoadedConfig, metrics: Metrics, log: RuleDeps['log']): Promise<Store> {
  const r = loaded.config.redis;
  let { url } = r;
  let clusterNodes = [...r.cluster];
  let sentinels = [...r.sentinels];
  let sentinelName = r.sentinelName;
  const m = url ? /^redis\+(cluster|sentinel):\/\/([^/]+)(?:\/(.+))?$/.exec(url) : null;
  if (m?.[2]) {
    const nodes = m[2].split(',').map((x) => x.trim());
    if (m[1] === 'cluster') clusterNodes = nodes;
    else {
      sentinels = nodes;
      sentinelName = m[3] ?? sentinelName;
    }
    url = undefined;
  }
  if (!url && !clusterNodes.length && !sentinels.length) {
    metrics.redisUp.set(1);
    // In cluster mode the memory lives in the primary, one for the instance (store/primary.ts).
    return cluster.isWorker ? new WorkerStore(r.commandTimeout) : new MemoryStore();
  }
  metrics.redisUp.set(1);
  for (const op of ['rate', 'acquire', 'release', 'greylist', 'inspect', 'reset']) metrics.redisErrors.inc({ op }, 0);
  const { RedisStore } = await import('./store/redis.js');
  return new RedisStore({
    ...(url ? { url } : {}),
    cluster: clusterNodes,
    sentinels,
    sentinelName,
    prefix: r.prefix,
    commandTimeout: r.commandTimeout,
    onError: (op) => metrics.redisErrors.inc({ op }),
    onState: (up, err) => {
      metrics.redisUp.set(up ? 1 : 0);
      // Once per outage, and once when it is over.
      if (up) log.info({}, 'redis reachable again');
      else log.warn({ err: err?.message }, 'redis unreachable; rules use their onError until it is back');
    },
  });
}

/** The listeners' addresses; for a wildcard listener, every local interface address. */
function ownAddresses(loaded: LoadedConfig): string[] {
  const hosts = loaded.config.listen.map((l) => parseHostPort(l.address)?.host ?? '');
  const out = new Set<string>();
  for (const h of hosts) {
    if (h === '0.0.0.0' || h === '::') {
      for (const list of Object.values(os.networkInterfaces())) for (const i of list ?? []) out.add(parseAddress(i.address).text);
    } else if (net.isIP(h)) out.add(parseAddress(h).text);
  }
  return [...out];
}

export function loadSecureContext(loaded: LoadedConfig): tls.SecureContext | null {
  const { cert, key } = loaded.config.tls;
  if (!cert && !key) {
    if (loaded.config.listen.some((l) => l.role === 'smtps')) {
      throw new DoormanError('DMN_ERR_TLS', 'an smtps listener needs tls.cert and tls.key (DOORMAN_TLS_CERT, DOORMAN_TLS_KEY)');
    }
    return null;
  }
  if (!cert || !key) throw new DoormanError('DMN_ERR_TLS', 'set both tls.cert and tls.key');
  try {
    return tls.createSecureContext({ cert: fs.readFileSync(cert), key: fs.readFileSync(key), minVersion: 'TLSv1.2' });
  } catch (e) {
    throw new DoormanError('DMN_ERR_TLS', (e as Error).message);
  }
}

/**
 * Worker processes to run: `workers`, or auto — one per core. Without Redis the workers share the
 * primary's in-memory store (store/primary.ts), so limits and greylisting hold for the instance.
 */
export function workerCount(loaded: LoadedConfig): number {
  const w = loaded.config.workers;
  return w === 'auto' ? os.availableParallelism() : w;
}

/** True when the configuration names a Redis (server, cluster or sentinels). */
function usesRedis(loaded: LoadedConfig): boolean {
  const r = loaded.config.redis;
  return Boolean(r.url || r.cluster.length || r.sentinels.length);
}

export async function start(loaded: LoadedConfig): Promise<Running> {
  const { config } = loaded;
  const worker = cluster.isWorker;
  const log = createLogger(config.log.level).child(worker ? { worker: cluster.worker?.id } : {});
  const metrics = createMetrics({ version: VERSION });
  if (worker) {
    // The primary serves /metrics, aggregating every worker's registry over IPC.
    new AggregatorRegistry();
    AggregatorRegistry.setRegistries([metrics.registry]);
  }
  const store = await createStore(loaded, metrics, log);
  // Give Redis a moment to connect so the first sessions see it; if it is down, rules fail over.
  if (!(await store.ready(2000))) log.warn({}, 'redis not reachable at start; rules use their onError until it is');
  const plainDeps = ruleDeps(loaded, metrics, log, store);
  const pool = createBackendPool(loaded, plainDeps.resolver, metrics, log);
  const recording = createRecording(loaded, metrics, log);
  // While recording, the rules' lookups and store operations are noted on the session that made them.
  const deps: RuleDeps = recording ? { ...plainDeps, resolver: recordingResolver(plainDeps.resolver), store: recordingStore(store) } : plainDeps;
  let rules: RuleSet = loadRuleSet(config.rules.dir, deps, RULE_TYPES, { listeners: listenerRefs(config) });
  const announce = (set: RuleSet) => {
    metrics.rulesInfo.reset();
    metrics.rulesInfo.set({ version: set.version }, 1);
    metrics.rulesLoaded.set(set.rules.length);
    // Old keys and lists that contradict rules/site.yaml: still working, to be fixed.
    for (const w of set.warnings) log.warn({ file: w.file, line: w.line, key: w.key }, formatProblem(w));
    for (const r of set.rules) for (const kind of ['error', 'timeout']) metrics.ruleErrors.inc({ rule: r.rule.name, kind }, 0);
  };
  announce(rules);
  let limits = config.limits;
  const proxy: Proxy = new Proxy({
    hostname: loaded.hostname,
    limits,
    backend: backendOptions(loaded),
    pool,
    listeners: config.listen,
    secureContext: loadSecureContext(loaded),
    metrics,
    log,
    rules: () => rules,
    onRuleSetUnused: (set) => closeRuleSet(set),
    // In cluster mode the primary counts connections for the whole instance (src/slots.ts).
    ...(worker ? { slots: new WorkerSlots() } : {}),
    recording,
  });
  try {
    await proxy.start();
  } catch (e) {
    closeRuleSet(rules);
    throw new DoormanError('DMN_ERR_LISTEN', (e as Error).message);
  }

  const reloadRules = (): boolean => {
    try {
      const next = loadRuleSet(config.rules.dir, deps, RULE_TYPES, { listeners: listenerRefs(config) });
      const old = rules;
      rules = next;
      if (!proxy.ruleSetInUse(old)) closeRuleSet(old);
      announce(next);
      metrics.configReloads.inc({ what: 'rules', result: 'success' });
      log.info({ version: next.version, rules: next.rules.map((r) => r.rule.name) }, 'rules reloaded');
      return true;
    } catch (e) {
      metrics.configReloads.inc({ what: 'rules', result: 'failure' });
      log.error({ err: e instanceof Error ? e.message : String(e), version: rules.version }, 'rule reload failed; keeping the last good rules');
      return false;
    }
  };
  // The configuration file and the certificate: new connections get the new limits and
  // certificate, open sessions keep theirs; an invalid file or certificate keeps the last good.
  const reloadSettings = (): boolean => {
    try {
      const next = loadConfig(loaded.file ? { file: loaded.file } : {});
      next.config.rules.dir = config.rules.dir; // --rules on the command line
      const secureContext = loadSecureContext(next);
      const needRestart = restartOnlyChanges(config, next.config);
      if (needRestart.length) log.warn({ keys: needRestart }, 'changed settings apply only after a restart; the running values stay');
      proxy.update({ limits: next.config.limits, secureContext });
      limits = next.config.limits;
      metrics.configReloads.inc({ what: 'settings', result: 'success' });
      log.info({ file: next.file, tls: next.config.tls.cert ?? null }, 'settings reloaded');
      return true;
    } catch (e) {
      metrics.configReloads.inc({ what: 'settings', result: 'failure' });
      log.error({ err: e instanceof Error ? e.message : String(e) }, 'settings reload failed; keeping the last good settings and certificate');
      return false;
    }
  };
  const reload = (): boolean => {
    const r = reloadRules();
    return reloadSettings() && r;
  };
  const watcher = config.rules.watch ? watchRules(config.rules.dir, reloadRules) : null;
  const settingFiles = [loaded.file, config.tls.cert, config.tls.key].filter((f): f is string => Boolean(f));
  const settingsWatcher = config.rules.watch && settingFiles.length ? watchFiles(settingFiles, reloadSettings) : null;

  let metricsServer: import('node:http').Server | null = null;
  if (config.metrics.listen !== 'off' && !worker) {
    const hp = metricsAddress(config.metrics.listen);
    metricsServer = await startMetricsServer(hp.host, hp.port, metrics.registry, async () => {
      const reachable = await anyBackendReachable(pool);
      const redis = store.kind === 'memory' ? 'not configured' : (await metrics.redisUp.get()).values[0]?.value === 1 ? 'reachable' : 'unreachable';
      return { ready: reachable && redis !== 'unreachable', checks: { listeners: 'up', backend: reachable ? 'reachable' : 'unreachable', redis } };
    }, store.kind === 'memory' ? store : null);
  }
  log.info({ version: VERSION, listeners: proxy.addresses(), backend: config.backend.address, rules: rules.rules.map((r) => r.rule.name), rulesVersion: rules.version }, 'doorman started');

  return {
    proxy,
    metrics,
    log,
    reload,
    async stop(deadline = limits.drainTimeout) {
      watcher?.close();
      settingsWatcher?.close();
      log.info({ sessions: proxy.activeSessions, deadline }, 'draining');
      await proxy.drain(deadline);
      pool.closeIdle();
      metricsServer?.close();
      closeRuleSet(rules);
      await store.close();
      await recording?.close();
      log.info('stopped');
    },
  };
}

/** Session records (record.dir; docs/operations.md "Session records"), or null when off. */
export function createRecording(loaded: LoadedConfig, metrics: Metrics, log: Logger): Recording | null {
  const r = loaded.config.record;
  if (!r.dir) return null;
  let warned = false;
  const writer = new RecordWriter({
    dir: r.dir,
    maxFileBytes: r.maxFileBytes,
    maxFileAge: r.maxFileAge,
    maxTotalBytes: r.maxTotalBytes,
    maxPendingBytes: r.maxPendingBytes,
    onWritten: (n) => metrics.recordsWritten.inc(n),
    onDropped: (n, reason) => metrics.recordsDropped.inc({ reason }, n),
    onError: (err) => {
      // Once: a full or read-only disk would otherwise log at the traffic's rate.
      if (warned) return;
      warned = true;
      log.error({ err: err.message, dir: r.dir }, 'session records cannot be written; dropping them (doorman_records_dropped_total)');
    },
  });
  log.info({ dir: r.dir, sampleRate: r.sampleRate, headers: r.headers }, 'recording sessions');
  return new Recording(r, writer);
}

export function metricsAddress(listen: string): { host: string; port: number } {
  const hp = parseHostPort(listen);
  if (!hp) throw new DoormanError('DMN_ERR_CONFIG_INVALID', `metrics.listen ${listen}`);
  return hp;
}

/** /readyz: at least one backend takes a TCP connection. */
async function anyBackendReachable(pool: BackendPool): Promise<boolean> {
  const targets = await pool.candidates();
  return (await Promise.all(targets.map((t) => tcpReachable(t.host, t.port, 1000)))).some(Boolean);
}

function tcpReachable(host: string, port: number, timeout: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host, port });
    const done = (ok: boolean) => {
      s.destroy();
      resolve(ok);
    };
    s.setTimeout(timeout, () => done(false));
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
  });
}

/**
 * Cluster mode: the primary forks `n` workers that share the listening sockets, serves /metrics
 * aggregated over all workers, forwards SIGHUP (reload) and SIGTERM (drain) to them, and replaces
 * a worker that dies unexpectedly, and keeps the connection counts (maxClients, maxClientsPerIp)
 * for all workers, and — without Redis — the in-memory rule state (store/primary.ts).
 */
export async function runPrimary(loaded: LoadedConfig, n: number): Promise<void> {
  const { config } = loaded;
  const log = createLogger(config.log.level).child({ primary: true });
  let stopping = false;
  // Workers accept connections themselves from the shared socket (the kernel picks one) instead of
  // the primary accepting each and passing it over IPC (Node's round-robin default): measured in
  // the benchmark, one message per connection, 20 % more messages/s and 25 % less CPU per message.
  // libuv's UV_TCP_SINGLE_ACCEPT makes a worker take one connection per wake-up and yield, so a
  // burst of connections spreads over the workers instead of going to whichever woke first.
  // NODE_CLUSTER_SCHED_POLICY=rr restores round-robin.
  if (!process.env.NODE_CLUSTER_SCHED_POLICY) cluster.schedulingPolicy = cluster.SCHED_NONE;
  const fork = () => cluster.fork({ UV_TCP_SINGLE_ACCEPT: process.env.UV_TCP_SINGLE_ACCEPT ?? '1' });
  // maxClients and maxClientsPerIp hold for the instance: workers take their slots here.
  serveSlots(cluster);
  // Without Redis, rule state (rate limits, greylisting) lives here, one for every worker; its
  // /limits/ answers `doorman limits show|reset` (store/admin.ts).
  const store = usesRedis(loaded) ? null : serveStore(cluster);
  removeStaleSockets(config.listen);
  for (let i = 0; i < n; i++) fork();
  cluster.on('exit', (w, code, signal) => {
    if (stopping) return;
    log.error({ worker: w.id, code, signal }, 'worker died; starting another');
    setTimeout(fork, 1000).unref();
  });
  const agg = new AggregatorRegistry();
  let metricsServer: import('node:http').Server | null = null;
  if (config.metrics.listen !== 'off') {
    const hp = metricsAddress(config.metrics.listen);
    const quiet = { warn: () => undefined, info: () => undefined };
    const pool = createBackendPool(loaded, createResolver({ servers: config.dns.servers, timeout: config.dns.timeout, tries: config.dns.tries }), createMetrics({ version: VERSION, defaults: false }), quiet as unknown as Logger);
    metricsServer = await startMetricsServer(hp.host, hp.port, { metrics: () => agg.clusterMetrics(), contentType: agg.contentType }, async () => {
      const reachable = await anyBackendReachable(pool);
      const workers = Object.values(cluster.workers ?? {}).filter((w) => w && !w.isDead()).length;
      return { ready: reachable && workers > 0, checks: { listeners: `${workers} worker(s)`, backend: reachable ? 'reachable' : 'unreachable' } };
    }, store);
  }
  log.info({ version: VERSION, workers: n }, 'doorman primary started');
  const all = () => Object.values(cluster.workers ?? {}).filter((w): w is NonNullable<typeof w> => Boolean(w));
  process.on('SIGHUP', () => {
    for (const w of all()) w.process.kill('SIGHUP');
  });
  const stop = (sig: string) => {
    if (stopping) return;
    stopping = true;
    log.info({ signal: sig }, 'shutting down workers');
    const workers = all();
    let left = workers.length;
    const done = () => {
      metricsServer?.close();
      log.info('stopped');
      process.exit(0);
    };
    if (left === 0) done();
    for (const w of workers) {
      w.once('exit', () => {
        if (--left === 0) done();
      });
      w.process.kill('SIGTERM');
    }
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}
