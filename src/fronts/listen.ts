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

/** Error of a listener role whose front is not in this build. */
export const MILTER_NOT_BUILT = 'milter front not built yet';

export async function startFrontListener(cfg: ListenerConfig, deps: Omit<PolicyDeps, 'listener'>): Promise<FrontListener> {
  const name = listenerName(cfg);
  if (cfg.role !== 'policy') throw new Error(cfg.role === 'milter' ? `${name}: ${MILTER_NOT_BUILT}` : `${name}: not a front role`);
  const front = new PolicyServer({ ...deps, listener: { name, role: 'policy' } });
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
