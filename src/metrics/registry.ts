/**
 * registry.ts — every doorman metric, declared in one place on doorman's own registry.
 *
 * Conventions (Prometheus naming guide): `doorman_` prefix, base units, `_total` counters.
 * No label ever carries an IP address, a sender or a recipient. docs/metrics.md lists every
 * metric; test/unit/metrics-doc.test.ts checks that the two agree.
 *
 * Cluster mode: the primary's /metrics merges the workers' registries, by default summing each
 * series. That is right for counters, histograms and gauges that count things (sessions open, idle
 * backend connections); a gauge that is a state or a setting names its `aggregator` instead: `min`
 * for "up" states (0 when any worker sees it down), `max` for lag and overload, `first` for info.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export interface MetricsOptions {
  version: string;
  /** Collect Node's default process metrics (off in unit tests). */
  defaults?: boolean;
}

const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
const SESSION_BUCKETS = [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900];
const SIZE_BUCKETS = [1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 52428800];

export function createMetrics(opts: MetricsOptions) {
  const registry = new Registry();
  const r = [registry];
  const m = {
    registry,
    buildInfo: new Gauge({ name: 'doorman_build_info', help: 'Build information; value is always 1.', labelNames: ['version', 'node'], aggregator: 'first', registers: r }),
    connections: new Counter({ name: 'doorman_connections_total', help: 'Client connections accepted, by listener.', labelNames: ['listener'], registers: r }),
    connectionsActive: new Gauge({ name: 'doorman_connections_active', help: 'Client sessions open now, by listener.', labelNames: ['listener'], registers: r }),
    connectionsPending: new Gauge({ name: 'doorman_connections_pending', help: 'Connections accepted and not yet a session, by listener and stage (proxy_header, tls_handshake); they count in the connection limits.', labelNames: ['listener', 'stage'], registers: r }),
    connectionsRefused: new Counter({ name: 'doorman_connections_refused_total', help: 'Connections refused before the greeting, by reason.', labelNames: ['listener', 'reason'], registers: r }),
    tlsSessions: new Counter({ name: 'doorman_tls_sessions_total', help: 'Client TLS handshakes, by listener and how (starttls, implicit) and result.', labelNames: ['listener', 'mode', 'result'], registers: r }),
    sessionDuration: new Histogram({ name: 'doorman_session_duration_seconds', help: 'Client session duration.', labelNames: ['listener'], buckets: SESSION_BUCKETS, registers: r }),
    commands: new Counter({ name: 'doorman_commands_total', help: 'Client commands, by verb and reply class.', labelNames: ['verb', 'class'], registers: r }),
    commandDuration: new Histogram({ name: 'doorman_command_duration_seconds', help: 'Time from a client command to its reply being ready (rules and backend included), by verb.', labelNames: ['verb'], buckets: LATENCY_BUCKETS, registers: r }),
    messages: new Counter({ name: 'doorman_messages_total', help: 'Message transactions that reached end of data, by front (smtp, milter) and outcome (accepted, rejected, tempfailed).', labelNames: ['front', 'outcome'], registers: r }),
    messageSize: new Histogram({ name: 'doorman_message_size_bytes', help: 'Size of messages received from clients.', buckets: SIZE_BUCKETS, registers: r }),
    rejections: new Counter({ name: 'doorman_rejections_total', help: 'Refusals made by rules, by front (smtp, policy, milter), rule, stage, code and enhanced code.', labelNames: ['front', 'rule', 'stage', 'code', 'enhanced_code'], registers: r }),
    ruleEvaluations: new Counter({ name: 'doorman_rule_evaluations_total', help: 'Rule evaluations, by rule, stage and outcome (pass, reject, tempfail, accept, tag, dry_run, error).', labelNames: ['rule', 'stage', 'outcome'], registers: r }),
    ruleDuration: new Histogram({ name: 'doorman_rule_duration_seconds', help: 'Rule evaluation time, by rule.', labelNames: ['rule'], buckets: LATENCY_BUCKETS, registers: r }),
    ruleErrors: new Counter({ name: 'doorman_rule_errors_total', help: 'Rules that threw or timed out, by rule and kind (error, timeout).', labelNames: ['rule', 'kind'], registers: r }),
    policyRequests: new Counter({ name: 'doorman_policy_requests_total', help: 'Postfix policy requests answered by the policy front, by listener, protocol_state (CONNECT, EHLO, HELO, MAIL, RCPT, DATA, END-OF-MESSAGE, VRFY, ETRN, other) and action (dunno, reject, defer, prepend).', labelNames: ['listener', 'state', 'action'], registers: r }),
    protocolViolations: new Counter({ name: 'doorman_protocol_violations_total', help: 'Client protocol violations, by kind.', labelNames: ['kind'], registers: r }),
    backendConnectDuration: new Histogram({ name: 'doorman_backend_connect_duration_seconds', help: 'Time from connecting to a backend to its greeting, by backend.', labelNames: ['backend'], buckets: LATENCY_BUCKETS, registers: r }),
    backendPoolIdle: new Gauge({ name: 'doorman_backend_pool_idle', help: 'Idle backend connections kept for the next client sessions.', registers: r }),
    backendConnections: new Gauge({ name: 'doorman_backend_connections', help: 'Connections to a backend held now: busy, idle and being opened (at most backend.maxConnections), by backend.', labelNames: ['backend'], registers: r }),
    backendBusy: new Counter({ name: 'doorman_backend_busy_total', help: 'Client sessions answered 421 4.3.2 because every backend was at backend.maxConnections for backend.acquireTimeout.', registers: r }),
    backendReused: new Counter({ name: 'doorman_backend_reused_total', help: 'Client sessions served by a pooled backend connection (a spare bound with XCLIENT, or an idle one never told a client), by backend.', labelNames: ['backend'], registers: r }),
    backendSessions: new Counter({ name: 'doorman_backend_sessions_total', help: 'Backend connections opened for client sessions, by backend.', labelNames: ['backend'], registers: r }),
    backendUp: new Gauge({ name: 'doorman_backend_up', help: 'Backend state: 1 in use, 0 skipped after a failure (back-off), by backend.', labelNames: ['backend'], aggregator: 'min', registers: r }),
    backendReplies: new Counter({ name: 'doorman_backend_replies_total', help: 'Backend replies, by command and reply class.', labelNames: ['command', 'class'], registers: r }),
    backendReplyDuration: new Histogram({ name: 'doorman_backend_reply_duration_seconds', help: 'Backend round trip: from sending a command to its reply, by command.', labelNames: ['command'], buckets: LATENCY_BUCKETS, registers: r }),
    backendFailures: new Counter({ name: 'doorman_backend_failures_total', help: 'Backend failures, by backend and kind (connect, timeout, closed, protocol, refused, tls).', labelNames: ['backend', 'kind'], registers: r }),
    dnsblQueries: new Counter({ name: 'doorman_dnsbl_queries_total', help: 'DNS list queries, by zone (its display name) and result (listed, clean, timeout, error, disabled).', labelNames: ['zone', 'result'], registers: r }),
    dnsblDuration: new Histogram({ name: 'doorman_dnsbl_query_duration_seconds', help: 'DNS list query time, by zone (cache hits excluded).', labelNames: ['zone'], buckets: LATENCY_BUCKETS, registers: r }),
    dnsblZoneUp: new Gauge({ name: 'doorman_dnsbl_zone_up', help: 'DNS list zone state from its RFC 5782 self-test: 1 in use, 0 disabled.', labelNames: ['zone'], aggregator: 'min', registers: r }),
    dnsCacheHits: new Counter({ name: 'doorman_dns_cache_hits_total', help: 'DNS answers served from the cache or shared with a lookup in flight.', registers: r }),
    fcrdnsChecks: new Counter({ name: 'doorman_fcrdns_checks_total', help: 'Forward-confirmed reverse DNS checks, by result (pass, fail, temperror).', labelNames: ['result'], registers: r }),
    contentScans: new Counter({ name: 'doorman_content_scans_total', help: 'Messages handed to a content scanner, by scanner (the rule name) and result (clean, tag, reject, tempfail, virus, skipped, error).', labelNames: ['scanner', 'result'], registers: r }),
    contentScanDuration: new Histogram({ name: 'doorman_content_scan_duration_seconds', help: 'Time from the end of data to the content scanner\'s answer, by scanner (the rule name).', labelNames: ['scanner'], buckets: LATENCY_BUCKETS, registers: r }),
    redisErrors: new Counter({ name: 'doorman_redis_errors_total', help: 'Redis command failures (timeouts, disconnections), by operation.', labelNames: ['op'], registers: r }),
    redisUp: new Gauge({ name: 'doorman_redis_up', help: 'The shared store is reachable: 1, or 0 during an outage (always 1 for the in-memory store).', aggregator: 'min', registers: r }),
    storeOps: new Counter({ name: 'doorman_store_operations_total', help: 'Shared-store operations, by operation and store (memory, redis).', labelNames: ['op', 'store'], registers: r }),
    failOpen: new Counter({ name: 'doorman_store_fail_open_total', help: 'Checks passed without the store (rule file onError: pass), by rule.', labelNames: ['rule'], registers: r }),
    failClosed: new Counter({ name: 'doorman_store_fail_closed_total', help: 'Checks refused 4xx without the store (rule file onError: tempfail), by rule.', labelNames: ['rule'], registers: r }),
    rateLimited: new Counter({ name: 'doorman_ratelimit_exceeded_total', help: 'Events over a rate or concurrency limit, by rule and limit name.', labelNames: ['rule', 'limit'], registers: r }),
    greylist: new Counter({ name: 'doorman_greylist_total', help: 'Greylisting decisions, by result (greylisted, passed, allowlisted).', labelNames: ['result'], registers: r }),
    eventLoopLag: new Gauge({ name: 'doorman_event_loop_lag_seconds', help: 'Event-loop lag measured by the overload sampler (shedding above limits.maxEventLoopLag).', aggregator: 'max', registers: r }),
    overloaded: new Gauge({ name: 'doorman_overloaded', help: '1 while new connections are shed with 421 4.3.2 because the event loop lags.', aggregator: 'max', registers: r }),
    configReloads: new Counter({ name: 'doorman_config_reloads_total', help: 'Reloads, by what (rules: the rule files; settings: the configuration file and the TLS certificate) and result (success, failure).', labelNames: ['what', 'result'], registers: r }),
    rulesInfo: new Gauge({ name: 'doorman_rules_loaded_info', help: 'The loaded rule set; version is a hash of the rule files.', labelNames: ['version'], aggregator: 'first', registers: r }),
    recordsWritten: new Counter({ name: 'doorman_records_written_total', help: 'Session records written to the record files (record.dir).', registers: r }),
    recordsDropped: new Counter({ name: 'doorman_records_dropped_total', help: 'Session records not written, by reason (lagging: more than record.maxPendingBytes waiting for the disk; write_error: the disk refused).', labelNames: ['reason'], registers: r }),
    rulesLoaded: new Gauge({ name: 'doorman_rules_loaded', help: 'Number of enabled rules loaded.', aggregator: 'min', registers: r }),
  };
  m.buildInfo.set({ version: opts.version, node: process.version }, 1);
  // Known label values start at 0, so dashboards and alerts see a series before the first event.
  for (const kind of ['pregreet', 'line_too_long', 'nul', 'bare_lf', 'non_smtp', 'starttls_injection', 'slow_client', 'auth_flood']) m.protocolViolations.inc({ kind }, 0);
  for (const what of ['rules', 'settings']) for (const result of ['success', 'failure']) m.configReloads.inc({ what, result }, 0);
  for (const outcome of ['accepted', 'rejected', 'tempfailed']) m.messages.inc({ front: 'smtp', outcome }, 0);
  for (const result of ['greylisted', 'passed', 'allowlisted']) m.greylist.inc({ result }, 0);
  for (const reason of ['lagging', 'write_error']) m.recordsDropped.inc({ reason }, 0);
  if (opts.defaults !== false) collectDefaultMetrics({ register: registry });
  return m;
}

export type Metrics = ReturnType<typeof createMetrics>;
