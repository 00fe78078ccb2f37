/**
 * listen.ts — the listening socket of a front an MTA calls (roles `policy`, `milter`): TCP
 * `host:port`, or a unix socket given as an absolute path (`policy:///run/doorman/policy.sock`).
 *
 * listener.ts hands each such listener here; the SMTP roles stay there. A stale unix socket file
 * (left by a doorman that died) is replaced; any other file at that path is an error. The socket
 * file is removed when the listener closes.
 */
import cluster from 'node:cluster';
import fs from 'node:fs';
import net from 'node:net';
import { listenerName, parseHostPort, type ListenerConfig } from '../config/schema.js';
import type { RuleSet } from '../config/rules.js';
import { MilterFront, milterProtocol } from './milter/front.js';
import { serveMilter } from './milter/server.js';
import { PolicyServer, type PolicyDeps } from './policy/server.js';

export interface FrontListener {
  readonly name: string;
  readonly server: net.Server;
  /** The unix socket path, or null for TCP. */
  readonly path: string | null;
  /** Shutdown: stop accepting; the front ends its connections and sessions. */
  close(): void;
  /** Connections open now. */
  readonly connections: () => number;
}

export interface FrontDeps extends Omit<PolicyDeps, 'listener'> {
  /** doorman's host name (the milter's Authentication-Results authserv-id). */
  readonly hostname: string;
}

/** A front's connections: handed each accepted socket, closed at shutdown. */
interface Front {
  handle(socket: net.Socket): void;
  close(): void;
  readonly connections: number;
}

export async function startFrontListener(cfg: ListenerConfig, deps: FrontDeps): Promise<FrontListener> {
  const name = listenerName(cfg);
  let front: Front;
  if (cfg.role === 'policy') front = new PolicyServer({ ...deps, listener: { name, role: 'policy' } });
  else if (cfg.role === 'milter') front = milterFront(name, deps);
  else throw new Error(`${name}: not a front role`);
  const server = net.createServer({ noDelay: true, allowHalfOpen: true }, (s) => front.handle(s));
  const hp = parseHostPort(cfg.address);
  const path = hp ? null : cfg.address;
  // In cluster mode the primary binds the socket once for every worker (it removed a stale file
  // before forking, removeStaleSockets): a worker removing it would unlink the live one.
  if (path && !cluster.isWorker) removeStaleSocket(path);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    const done = () => {
      server.off('error', reject);
      resolve();
    };
    if (hp) server.listen({ host: hp.host, port: hp.port, backlog: 1024 }, done);
    else server.listen({ path: path as string, backlog: 1024 }, done);
  });
  server.on('error', (e) => deps.log.error({ err: e.message, listener: name }, 'listener error'));
  deps.metrics.connectionsActive.set({ listener: name }, 0);
  return {
    name,
    server,
    path,
    close() {
      server.close();
      front.close();
    },
    connections: () => front.connections,
  };
}

/**
 * The milter role: each connection served by serveMilter (milter/server.ts, limits MILTER_DEFAULTS)
 * with a MilterFront per SMTP session of the MTA (milter/front.ts).
 */
function milterFront(name: string, deps: FrontDeps): Front {
  const conns = new Set<net.Socket>();
  const listener = { name, role: 'milter' } as const;
  let closing = false;
  return {
    handle(socket) {
      socket.on('error', () => undefined);
      if (closing) {
        deps.metrics.connectionsRefused.inc({ listener: name, reason: 'shutdown' });
        socket.destroy();
        return;
      }
      conns.add(socket);
      deps.metrics.connections.inc({ listener: name });
      deps.metrics.connectionsActive.inc({ listener: name });
      socket.once('close', () => {
        conns.delete(socket);
        deps.metrics.connectionsActive.dec({ listener: name });
      });
      const log = deps.log.child({ listener: name, front: 'milter' });
      // The rule set current at OPTNEG decides the steps asked for (milterProtocol) and serves
      // the connection's sessions, so that no rule waits for a step that was negotiated away.
      let set: RuleSet | null = null;
      const rules = () => set ?? deps.rules();
      serveMilter(socket, () => new MilterFront({ ...deps, listener, rules }), { protocol: () => milterProtocol((set = deps.rules())) }, log);
    },
    close() {
      closing = true;
      // The MTA applies its milter_default_action to the sessions cut here; each handler's close writes its log line.
      for (const s of conns) s.destroy();
    },
    get connections() {
      return conns.size;
    },
  };
}

/** Cluster mode: the primary removes the stale socket files of the front listeners before forking. */
export function removeStaleSockets(listeners: readonly ListenerConfig[]): void {
  for (const l of listeners) if ((l.role === 'policy' || l.role === 'milter') && !parseHostPort(l.address)) removeStaleSocket(l.address);
}

/** A socket file left behind is removed; anything else at the path stays (listen then fails with EADDRINUSE). */
function removeStaleSocket(path: string): void {
  try {
    if (fs.lstatSync(path).isSocket()) fs.unlinkSync(path);
  } catch {
    // Nothing there.
  }
}
