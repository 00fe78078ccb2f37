/**
 * listener.ts — the listening sockets and everything before a session starts.
 *
 * For each configured listener: accept, read a PROXY header when the peer is a trusted load
 * balancer (with a deadline and a size bound), start TLS for the smtps role (with its own
 * deadline), enforce the concurrency limits (in total and per client, 421 4.7.0) from accept to
 * close, then hand the socket to a Session. `update()` applies a reload to new connections.
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
import { listenerName, parseHostPort, type Limits, type ListenerConfig } from './config/schema.js';
import { startFrontListener, type FrontListener } from './fronts/listen.js';
import type { Metrics } from './metrics/registry.js';
import type { Recording } from './record/recorder.js';
import { clientKey, inAnyCidr, parseAddress, parseCidr, type Cidr } from './net/ip.js';
import { R, type Reply } from './protocol/reply.js';
import { endWith } from './smtp/reply-writer.js';
import { Session, type ListenerRuntime, type SessionDeps } from './smtp/session.js';
import { LocalSlots, type Refusal, type Slots } from './slots.js';

export interface ProxyDeps {
  hostname: string;
  /** The limits at start; `update` replaces them (reload). */
  limits: Limits;
  backend: BackendOptions;
  /** The backends, in MX order, with their health. */
  pool: BackendPool;
  listeners: readonly ListenerConfig[];
  /** The certificate at start; `update` replaces it (reload). */
  secureContext: tls.SecureContext | null;
  metrics: Metrics;
  log: Logger;
  /** The current rule set; each session keeps the one it started with. */
  rules: () => RuleSet;
  /** Called when a rule set no longer in use by any session may release its resources. */
  onRuleSetUnused?: (set: RuleSet) => void;
  /** Where connections are counted against the limits; default: in this process. */
  slots?: Slots;
  /** Session records (record.dir), for every front; null: off. */
  recording?: Recording | null;
}

/** What a reload may change for new connections; open sessions keep what they started with. */
export interface ProxySettings {
  limits: Limits;
  secureContext: tls.SecureContext | null;
}

interface Bound {
  server: net.Server;
  runtime: ListenerRuntime;
  config: ListenerConfig;
  trusted: Cidr[];
  /** The local address when the listener is bound to one address (no getsockname per connection). */
  local: Endpoint | null;
  /** The session dependencies for this listener, rule set and settings (built once per change). */
  deps: { rules: RuleSet; deps: SessionDeps } | null;
}

/**
 * One accepted connection's hold on the connection limits. Released once, when the connection
 * closes, whichever way it ends (refused, PROXY timeout, TLS failure or timeout, session end).
 */
class Hold {
  private total = false;
  private key: string | null = null;
  closed = false;

  constructor(private readonly slots: Slots) {}

  /** Records slots taken; false (and gives them back) when the connection closed meanwhile. */
  add(total: boolean, key: string | null): boolean {
    if (this.closed) {
      this.slots.release(total, key);
      return false;
    }
    this.total ||= total;
    if (key !== null) this.key = key;
    return true;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.slots.release(this.total, this.key);
  }
}

/** A stage before the session: counted in doorman_connections_pending while it lasts. */
type PendingStage = 'proxy_header' | 'tls_handshake';

/** ms between the event-loop lag samples (limits.maxEventLoopLag). */
const LAG_SAMPLE_MS = 250;

export class Proxy {
  private readonly bound: Bound[] = [];
  /** Listeners of the fronts an MTA calls (policy; milter): fronts/listen.ts. */
  private readonly fronts: FrontListener[] = [];
  private readonly sessions = new Set<Session>();
  private readonly slots: Slots;
  private readonly setUsers = new Map<RuleSet, number>();
  private limits: Limits;
  private secureContext: tls.SecureContext | null;
  private draining = false;
  private overloaded = false;
  /** When the lag sampler last ran (performance.now()). */
  private lastSample = 0;
  private sampler: NodeJS.Timeout | null = null;

  constructor(private readonly deps: ProxyDeps) {
    this.slots = deps.slots ?? new LocalSlots();
    this.limits = deps.limits;
    this.secureContext = deps.secureContext;
  }

  /**
   * Reload: new connections get these limits and this certificate; open sessions (and
   * connections in their handshake) keep the ones they started with.
   */
  update(settings: ProxySettings): void {
    this.limits = settings.limits;
    this.secureContext = settings.secureContext;
    for (const b of this.bound) {
      b.runtime = { ...b.runtime, secureContext: settings.secureContext };
      b.deps = null;
    }
  }

  /**
   * Overload shedding (Haraka toobusy): a timer measures how late it fires; while the lag is over
   * limits.maxEventLoopLag, new connections get 421 4.3.2 rather than everyone getting slow.
   */
  private startSampler(): void {
    this.lastSample = performance.now();
    this.sampler = setInterval(() => {
      const limit = this.limits.maxEventLoopLag;
      const now = performance.now();
      const lag = Math.max(0, now - this.lastSample - LAG_SAMPLE_MS);
      this.lastSample = now;
      this.deps.metrics.eventLoopLag.set(lag / 1000);
      const over = limit > 0 && lag > limit;
      if (over !== this.overloaded) {
        this.overloaded = over;
        this.deps.metrics.overloaded.set(over ? 1 : 0);
        this.deps.log.warn({ lagMs: Math.round(lag), limitMs: limit }, over ? 'overloaded: shedding new connections' : 'load back to normal');
      }
    }, LAG_SAMPLE_MS);
    this.sampler.unref();
  }

  /**
   * Overloaded now: the sampler found the lag over the limit, or its own tick is overdue by more
   * than the limit — a connection accepted in the same turn as the loop's return from a stall is
   * shed too, not admitted because the sampler's timer runs after the accept.
   */
  private lagging(): boolean {
    if (this.overloaded) return true;
    const limit = this.limits.maxEventLoopLag;
    return limit > 0 && this.sampler !== null && performance.now() - this.lastSample - LAG_SAMPLE_MS > limit;
  }

  async start(): Promise<void> {
    this.startSampler();
    for (const cfg of this.deps.listeners) {
      if (cfg.role === 'policy' || cfg.role === 'milter') {
        const { metrics, log, rules, hostname, recording } = this.deps;
        this.fronts.push(await startFrontListener(cfg, { rules, limits: () => this.limits, metrics, log, hostname, useRuleSet: (set) => this.useRuleSet(set), recording: recording ?? null }));
        continue;
      }
      const hp = parseHostPort(cfg.address);
      if (!hp) throw new Error(`bad listen address ${cfg.address}`);
      const runtime: ListenerRuntime = {
        name: listenerName(cfg),
        role: cfg.role,
        authPlaintext: cfg.authPlaintext,
        secureContext: this.secureContext,
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
      for (const stage of ['proxy_header', 'tls_handshake']) this.deps.metrics.connectionsPending.set({ listener: runtime.name, stage }, 0);
      this.bound.push(b);
    }
  }

  /** The addresses actually bound (port 0 resolved). */
  addresses(): { name: string; address: string; port: number }[] {
    const smtp = this.bound.map((b) => {
      const a = b.server.address() as net.AddressInfo;
      return { name: b.runtime.name, address: a.address, port: a.port };
    });
    const fronts = this.fronts.map((f) => {
      const a = f.server.address();
      return typeof a === 'object' && a ? { name: f.name, address: a.address, port: a.port } : { name: f.name, address: f.path ?? String(a), port: 0 };
    });
    return [...smtp, ...fronts];
  }

  /** Counts a rule set as in use until the returned function is called (once). */
  private useRuleSet(rules: RuleSet): () => void {
    this.setUsers.set(rules, (this.setUsers.get(rules) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const users = (this.setUsers.get(rules) ?? 1) - 1;
      if (users <= 0) {
        this.setUsers.delete(rules);
        if (rules !== this.deps.rules()) this.deps.onRuleSetUnused?.(rules);
      } else this.setUsers.set(rules, users);
    };
  }

  get activeSessions(): number {
    return this.sessions.size;
  }

  /** The key a client is counted under for maxClientsPerIp (IPv6: its network, limits.clientIpv6Prefix). */
  private clientKey(address: string): string {
    return clientKey(parseAddress(address), this.limits.clientIpv6Prefix);
  }

  /**
   * Every accepted connection is counted from here until it closes: in total at once, and under
   * its client as soon as the client is known (here, or after a trusted PROXY header).
   */
  private onConnection(socket: net.Socket, b: Bound): void {
    socket.on('error', () => undefined);
    const remote = socket.remoteAddress;
    if (!remote) return void socket.destroy();
    this.endsEarly(socket);
    const hold = new Hold(this.slots);
    socket.once('close', () => hold.close());
    const peer = endpoint(remote, socket.remotePort ?? 0);
    const local = b.local ?? endpoint(socket.localAddress ?? '0.0.0.0', socket.localPort ?? 0);
    const direct: ProxiedAddress = {
      ...peer,
      destAddress: local.address,
      destPort: local.port,
      destFamily: local.family,
    };
    const host = this.deps.hostname;
    if (this.draining) return this.refuse(socket, b, 'shutdown', R.shuttingDown(host));
    if (this.lagging()) return this.refuse(socket, b, 'overload', R.overloaded(host));
    const limits = this.limits;
    const secureContext = this.secureContext;
    if (b.config.proxyProtocol && inAnyCidr(parseAddress(direct.address), b.trusted)) {
      // The balancer is not the client: count in total now, under the client once it is named.
      this.claim(socket, b, hold, true, null, limits, () => this.readProxyHeader(socket, b, hold, direct, limits, secureContext));
      return;
    }
    this.claim(socket, b, hold, true, this.clientKey(direct.address), limits, () => this.admit(socket, b, hold, direct, undefined, limits, secureContext));
  }

  /**
   * Before its session starts, a client's FIN ends the connection: the listeners allow half-open
   * sockets for the session's sake (a client that half-closes after QUIT still gets its replies),
   * so a client that leaves during its PROXY header or TLS handshake would otherwise hold its
   * slots until a deadline. The session handles its own 'end' (handOver).
   */
  private readonly earlyEnd = new WeakMap<net.Socket, () => void>();
  private endsEarly(socket: net.Socket): void {
    const end = () => socket.destroy();
    socket.on('end', end);
    this.earlyEnd.set(socket, end);
  }
  private handOver(socket: net.Socket): void {
    const end = this.earlyEnd.get(socket);
    if (end) socket.off('end', end);
    this.earlyEnd.delete(socket);
  }

  /** Takes slots for a connection, then goes on with `next`, or refuses it (421 4.7.0). */
  private claim(socket: net.Socket, b: Bound, hold: Hold, total: boolean, key: string | null, limits: Limits, next: () => void): void {
    const decide = (refusal: Refusal | null) => {
      if (refusal) return this.refuse(socket, b, refusal, R.tooManyConnections(this.deps.hostname));
      if (hold.add(total, key)) next();
    };
    const r = this.slots.take(total, key, limits);
    if (r instanceof Promise) {
      socket.pause();
      void r.then(decide);
    } else decide(r);
  }

  /**
   * Refuses a connection before its session: a plaintext 421 on smtp and submission listeners;
   * on smtps the client expects a TLS handshake and could not read one, so it is closed.
   */
  private refuse(socket: net.Socket, b: Bound, reason: string, r: Reply): void {
    this.deps.metrics.connectionsRefused.inc({ listener: b.runtime.name, reason });
    if (b.config.role === 'smtps') return void socket.destroy();
    endWith(socket, r);
    setTimeout(() => socket.destroy(), 1000).unref();
  }

  /** Counts a stage in doorman_connections_pending; the returned function ends it (once). */
  private pending(b: Bound, stage: PendingStage): () => void {
    const labels = { listener: b.runtime.name, stage };
    this.deps.metrics.connectionsPending.inc(labels);
    let ended = false;
    return () => {
      if (ended) return;
      ended = true;
      this.deps.metrics.connectionsPending.dec(labels);
    };
  }

  private readProxyHeader(socket: net.Socket, b: Bound, hold: Hold, direct: ProxiedAddress, limits: Limits, secureContext: tls.SecureContext | null): void {
    let buf = Buffer.alloc(0);
    const ended = this.pending(b, 'proxy_header');
    const timer = setTimeout(() => {
      this.deps.metrics.connectionsRefused.inc({ listener: b.runtime.name, reason: 'proxy_timeout' });
      socket.destroy();
    }, limits.proxyHeaderTimeout);
    const finish = () => {
      clearTimeout(timer);
      ended();
      socket.off('data', onData);
      socket.off('close', finish);
    };
    const onData = (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      const r = parseProxyHeader(buf.subarray(0, MAX_PROXY_HEADER));
      if (r.state === 'incomplete' && buf.length < MAX_PROXY_HEADER) return;
      finish();
      if (r.state !== 'done') {
        this.deps.metrics.connectionsRefused.inc({ listener: b.runtime.name, reason: 'proxy_header' });
        this.deps.log.warn({ peer: direct.address, reason: r.state === 'error' ? r.reason : 'too long' }, 'bad PROXY header');
        socket.destroy();
        return;
      }
      socket.pause();
      const peer = r.address ?? direct;
      const rest = buf.subarray(r.consumed);
      this.claim(socket, b, hold, false, this.clientKey(peer.address), limits, () => this.admit(socket, b, hold, peer, rest, limits, secureContext));
    };
    socket.on('data', onData);
    socket.on('close', finish);
    socket.resume();
  }

  private admit(socket: net.Socket, b: Bound, hold: Hold, peer: ProxiedAddress, initial: Buffer | undefined, limits: Limits, secureContext: tls.SecureContext | null): void {
    const name = b.runtime.name;
    if (b.config.role === 'smtps') {
      if (!secureContext) return this.refuse(socket, b, 'no_tls', R.unavailable(this.deps.hostname));
      if (initial?.length) socket.unshift(initial);
      const secure = new tls.TLSSocket(socket, { isServer: true, secureContext });
      this.handOver(socket);
      this.endsEarly(secure);
      const ended = this.pending(b, 'tls_handshake');
      let settled = false;
      const settle = (result: 'success' | 'failure' | 'timeout') => {
        if (settled) return false;
        settled = true;
        clearTimeout(deadline);
        ended();
        this.deps.metrics.tlsSessions.inc({ listener: name, mode: 'implicit', result });
        return true;
      };
      // Its own short deadline: a client that connects and never sends a ClientHello holds a slot
      // only this long (limits.tlsHandshakeTimeout, not the command timeout).
      const deadline = setTimeout(() => {
        if (!settle('timeout')) return;
        this.deps.metrics.connectionsRefused.inc({ listener: name, reason: 'tls_timeout' });
        secure.destroy();
      }, limits.tlsHandshakeTimeout);
      secure.once('secure', () => {
        if (!settle('success') || socket.destroyed) return;
        if (this.draining) {
          // The handshake outlived the start of a drain: no new session now.
          this.deps.metrics.connectionsRefused.inc({ listener: name, reason: 'shutdown' });
          return void endWith(secure, R.shuttingDown(this.deps.hostname));
        }
        this.startSession(secure, b, hold, peer, undefined, true);
      });
      secure.once('error', () => {
        settle('failure');
        secure.destroy();
      });
      secure.once('close', () => settle('failure'));
      socket.resume();
      return;
    }
    this.startSession(socket, b, hold, peer, initial, false);
    socket.resume();
  }

  private startSession(socket: net.Socket, b: Bound, hold: Hold, peer: ProxiedAddress, initial: Buffer | undefined, isTls: boolean): void {
    this.handOver(socket);
    const rules = this.deps.rules();
    if (b.deps?.rules !== rules) b.deps = { rules, deps: { ...this.deps, limits: this.limits, listener: b.runtime, rules } };
    const session = new Session(socket, peer, b.deps.deps, { tls: isTls, ...(initial ? { initial } : {}) });
    const release = this.useRuleSet(rules);
    this.sessions.add(session);
    const name = b.runtime.name;
    this.deps.metrics.connections.inc({ listener: name });
    this.deps.metrics.connectionsActive.inc({ listener: name });
    void session.done.then(() => {
      // STARTTLS moves the session to a new socket: its end, not the first socket's, releases.
      hold.close();
      this.sessions.delete(session);
      release();
      this.deps.metrics.connectionsActive.dec({ listener: name });
      this.deps.metrics.sessionDuration.observe({ listener: name }, (Date.now() - session.state.started) / 1000);
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
    // The fronts' MTAs apply their own default action while doorman is away: close at once.
    for (const f of this.fronts) f.close();
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
