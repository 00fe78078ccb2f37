/**
 * listener.ts — the listening sockets and everything before a session starts.
 *
 * For each configured listener: accept, read a PROXY header when the peer is a trusted load
 * balancer (with a deadline and a size bound), start TLS for the smtps role, enforce the
 * concurrency limits (in total and per client IP, 421 4.7.0), then hand the socket to a Session.
 * `drain()` implements SIGTERM: stop accepting, let sessions finish until the deadline, then
 * send 421 to the rest.
 */
import net from 'node:net';
import tls from 'node:tls';
import type { Logger } from 'pino';
import type { BackendOptions } from './backend/connection.js';
import type { BackendPool } from './backend/pool.js';
import { MAX_PROXY_HEADER, parseProxyHeader, unmap, type ProxiedAddress } from './backend/proxy-protocol.js';
import type { RuleSet } from './config/rules.js';
import { parseHostPort, type Limits, type ListenerConfig } from './config/schema.js';
import type { Metrics } from './metrics/registry.js';
import { inAnyCidr, parseAddress, parseCidr, type Cidr } from './net/ip.js';
import { formatReply, R } from './smtp/reply.js';
import { Session, type ListenerRuntime, type SessionDeps } from './smtp/session.js';

export interface ProxyDeps {
  hostname: string;
  limits: Limits;
  backend: BackendOptions;
  /** The backends, in MX order, with their health. */
  pool: BackendPool;
  listeners: readonly ListenerConfig[];
  secureContext: tls.SecureContext | null;
  metrics: Metrics;
  log: Logger;
  /** The current rule set; each session keeps the one it started with. */
  rules: () => RuleSet;
  /** Called when a rule set no longer in use by any session may release its resources. */
  onRuleSetUnused?: (set: RuleSet) => void;
}

interface Bound {
  server: net.Server;
  runtime: ListenerRuntime;
  config: ListenerConfig;
  trusted: Cidr[];
  /** The local address when the listener is bound to one address (no getsockname per connection). */
  local: Endpoint | null;
  /** The session dependencies for this listener and the current rule set (built once per rule set). */
  deps: { rules: RuleSet; deps: SessionDeps } | null;
}

export class Proxy {
  private readonly bound: Bound[] = [];
  private readonly sessions = new Set<Session>();
  private readonly perIp = new Map<string, number>();
  private readonly setUsers = new Map<RuleSet, number>();
  private draining = false;
  private overloaded = false;
  private sampler: NodeJS.Timeout | null = null;

  constructor(private readonly deps: ProxyDeps) {}

  /**
   * Overload shedding (Haraka toobusy): a timer measures how late it fires; while the lag is over
   * limits.maxEventLoopLag, new connections get 421 4.3.2 rather than everyone getting slow.
   */
  private startSampler(): void {
    const limit = this.deps.limits.maxEventLoopLag;
    if (limit <= 0) return;
    const every = 250;
    let last = performance.now();
    this.sampler = setInterval(() => {
      const now = performance.now();
      const lag = Math.max(0, now - last - every);
      last = now;
      this.deps.metrics.eventLoopLag.set(lag / 1000);
      const over = lag > limit;
      if (over !== this.overloaded) {
        this.overloaded = over;
        this.deps.metrics.overloaded.set(over ? 1 : 0);
        this.deps.log.warn({ lagMs: Math.round(lag), limitMs: limit }, over ? 'overloaded: shedding new connections' : 'load back to normal');
      }
    }, every);
    this.sampler.unref();
  }

  async start(): Promise<void> {
    this.startSampler();
    for (const cfg of this.deps.listeners) {
      const hp = parseHostPort(cfg.address);
      if (!hp) throw new Error(`bad listen address ${cfg.address}`);
      const runtime: ListenerRuntime = {
        name: cfg.name ?? `${cfg.role}@${cfg.address}`,
        role: cfg.role,
        authPlaintext: cfg.authPlaintext,
        secureContext: this.deps.secureContext,
      };
      const trusted = cfg.trustedProxies.map(parseCidr);
      const server = net.createServer({ pauseOnConnect: false, noDelay: true, allowHalfOpen: true }, (s) => this.onConnection(s, b));
      const b: Bound = { server, runtime, config: cfg, trusted, local: null, deps: null };
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen({ host: hp.host, port: hp.port, backlog: 1024 }, () => {
          server.off('error', reject);
          resolve();
        });
      });
      server.on('error', (e) => this.deps.log.error({ err: e.message, listener: runtime.name }, 'listener error'));
      const bound = server.address() as net.AddressInfo;
      if (net.isIP(hp.host) && !['0.0.0.0', '::'].includes(hp.host)) {
        b.local = endpoint(bound.address, bound.port);
      }
      this.bound.push(b);
    }
  }

  /** The addresses actually bound (port 0 resolved). */
  addresses(): { name: string; address: string; port: number }[] {
    return this.bound.map((b) => {
      const a = b.server.address() as net.AddressInfo;
      return { name: b.runtime.name, address: a.address, port: a.port };
    });
  }

  get activeSessions(): number {
    return this.sessions.size;
  }

  private onConnection(socket: net.Socket, b: Bound): void {
    socket.on('error', () => undefined);
    const remote = socket.remoteAddress;
    if (!remote) return void socket.destroy();
    const peer = endpoint(remote, socket.remotePort ?? 0);
    const local = b.local ?? endpoint(socket.localAddress ?? '0.0.0.0', socket.localPort ?? 0);
    const direct: ProxiedAddress = {
      ...peer,
      destAddress: local.address,
      destPort: local.port,
      destFamily: local.family,
    };
    if (b.config.proxyProtocol && inAnyCidr(parseAddress(direct.address), b.trusted)) {
      this.readProxyHeader(socket, b, direct);
      return;
    }
    this.admit(socket, b, direct, undefined);
  }

  private readProxyHeader(socket: net.Socket, b: Bound, direct: ProxiedAddress): void {
    let buf = Buffer.alloc(0);
    const timer = setTimeout(() => {
      this.deps.metrics.connectionsRefused.inc({ listener: b.runtime.name, reason: 'proxy_timeout' });
      socket.destroy();
    }, this.deps.limits.proxyHeaderTimeout);
    const onData = (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      const r = parseProxyHeader(buf.subarray(0, MAX_PROXY_HEADER));
      if (r.state === 'incomplete' && buf.length < MAX_PROXY_HEADER) return;
      clearTimeout(timer);
      socket.off('data', onData);
      if (r.state !== 'done') {
        this.deps.metrics.connectionsRefused.inc({ listener: b.runtime.name, reason: 'proxy_header' });
        this.deps.log.warn({ peer: direct.address, reason: r.state === 'error' ? r.reason : 'too long' }, 'bad PROXY header');
        socket.destroy();
        return;
      }
      socket.pause();
      this.admit(socket, b, r.address ?? direct, buf.subarray(r.consumed));
    };
    socket.on('data', onData);
  }

  private admit(socket: net.Socket, b: Bound, peer: ProxiedAddress, initial: Buffer | undefined): void {
    const name = b.runtime.name;
    const refuse = (reason: string, text: string) => {
      this.deps.metrics.connectionsRefused.inc({ listener: name, reason });
      socket.end(text);
      setTimeout(() => socket.destroy(), 1000).unref();
    };
    const host = this.deps.hostname;
    if (this.draining) return refuse('shutdown', formatReply(R.shuttingDown(host)) as string);
    if (this.overloaded) return refuse('overload', formatReply(R.overloaded(host)) as string);
    if (this.sessions.size >= this.deps.limits.maxClients) return refuse('max_clients', formatReply(R.tooManyConnections(host)) as string);
    const ip = peer.address;
    const n = this.perIp.get(ip) ?? 0;
    if (n >= this.deps.limits.maxClientsPerIp) return refuse('max_clients_per_ip', formatReply(R.tooManyConnections(host)) as string);
    if (b.config.role === 'smtps') {
      if (!this.deps.secureContext) return refuse('no_tls', formatReply(R.unavailable(host)) as string);
      if (initial?.length) socket.unshift(initial);
      const secure = new tls.TLSSocket(socket, { isServer: true, secureContext: this.deps.secureContext });
      const t = setTimeout(() => secure.destroy(), this.deps.limits.commandTimeout);
      secure.once('secure', () => {
        clearTimeout(t);
        this.deps.metrics.tlsSessions.inc({ listener: name, mode: 'implicit', result: 'success' });
        this.startSession(secure, b, peer, undefined, true);
      });
      secure.once('error', () => {
        clearTimeout(t);
        this.deps.metrics.tlsSessions.inc({ listener: name, mode: 'implicit', result: 'failure' });
        secure.destroy();
      });
      socket.resume();
      return;
    }
    this.startSession(socket, b, peer, initial, false);
    socket.resume();
  }

  private startSession(socket: net.Socket, b: Bound, peer: ProxiedAddress, initial: Buffer | undefined, isTls: boolean): void {
    const rules = this.deps.rules();
    if (b.deps?.rules !== rules) b.deps = { rules, deps: { ...this.deps, listener: b.runtime, rules } };
    const session = new Session(socket, peer, b.deps.deps, { tls: isTls, ...(initial ? { initial } : {}) });
    const ip = peer.address;
    this.perIp.set(ip, (this.perIp.get(ip) ?? 0) + 1);
    this.setUsers.set(rules, (this.setUsers.get(rules) ?? 0) + 1);
    this.sessions.add(session);
    const name = b.runtime.name;
    this.deps.metrics.connections.inc({ listener: name });
    this.deps.metrics.connectionsActive.inc({ listener: name });
    void session.done.then(() => {
      this.sessions.delete(session);
      const left = (this.perIp.get(ip) ?? 1) - 1;
      if (left <= 0) this.perIp.delete(ip);
      else this.perIp.set(ip, left);
      const users = (this.setUsers.get(rules) ?? 1) - 1;
      if (users <= 0) {
        this.setUsers.delete(rules);
        if (rules !== this.deps.rules()) this.deps.onRuleSetUnused?.(rules);
      } else this.setUsers.set(rules, users);
      this.deps.metrics.connectionsActive.dec({ listener: name });
      this.deps.metrics.sessionDuration.observe({ listener: name }, (Date.now() - session.started) / 1000);
    });
    session.start().catch((err: unknown) => {
      this.deps.log.error({ err: err instanceof Error ? err.stack : String(err) }, 'session start failed');
      socket.destroy();
    });
  }

  /** True when the rule set is still used by a session. */
  ruleSetInUse(set: RuleSet): boolean {
    return (this.setUsers.get(set) ?? 0) > 0;
  }

  /** SIGTERM: stop accepting; wait for sessions up to `deadline` ms; then 421 the rest. */
  async drain(deadline: number): Promise<void> {
    this.draining = true;
    if (this.sampler) clearInterval(this.sampler);
    for (const b of this.bound) b.server.close(); // stops accepting; open sessions go on
    const all = Promise.all([...this.sessions].map((s) => s.done));
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      all.then(() => false),
      new Promise<boolean>((r) => (timer = setTimeout(() => r(true), deadline))),
    ]);
    if (timer) clearTimeout(timer);
    if (timedOut) {
      this.deps.log.info({ sessions: this.sessions.size }, 'drain deadline reached, closing sessions');
      for (const s of this.sessions) s.shutdown();
      await Promise.race([all, new Promise((r) => setTimeout(r, 3000))]);
    }
  }
}

interface Endpoint {
  address: string;
  port: number;
  family: 4 | 6;
}

/** A socket address without the IPv4-mapped prefix, with its family. */
function endpoint(raw: string, port: number): Endpoint {
  const address = unmap(raw);
  return { address, port, family: net.isIPv4(address) ? 4 : 6 };
}
