/**
 * starttls.ts — the STARTTLS command and the client's socket turned into a TLS one in place
 * (RFC 3207).
 *
 * `startTls` handles the command: its checks (a certificate, not already under TLS, no argument),
 * the CVE-2011-0411 discard of plaintext pipelined after it, the 220, the upgrade, the handshake
 * and its metric; after a successful one the input is discarded again and the host forgets what
 * it learnt before TLS (RFC 3207 §4.2), after a failed one it closes. The host owns the socket,
 * the framing and the replies.
 *
 * `upgradeToTls` takes the plaintext socket from its session (every listener the session put on
 * it is removed; its errors are from now on the TLS socket's) and wraps it; the session attaches
 * to the TLS socket before `handshake` waits for it, within its own short deadline
 * (limits.tlsHandshakeTimeout), as on the smtps listener.
 */
import type net from 'node:net';
import tls from 'node:tls';
import type { Metrics } from '../metrics/registry.js';
import { R, type Reply } from '../protocol/reply.js';
import type { Framing } from './framing.js';

/** What the STARTTLS command needs of its session (values as they are when it is read). */
export interface StartTlsHost {
  /** null when no certificate is configured (STARTTLS not offered). */
  readonly secureContext: tls.SecureContext | null;
  /** The session is already under TLS. */
  readonly tls: boolean;
  readonly listener: string;
  readonly metrics: Metrics;
  /** The client's input: what is not yet read is discarded. */
  readonly framing: Framing;
  /** The current (plaintext) client socket. */
  readonly socket: net.Socket;
  /** limits.tlsHandshakeTimeout. */
  readonly handshakeTimeout: number;
  /** Queues the command's reply (a refusal). */
  queue(r: Reply): void;
  /** Writes a reply now (the 220 before the handshake). */
  send(r: Reply): void;
  /** Plaintext was pipelined after STARTTLS (`bytes` discarded): a violation, logged. */
  injected(bytes: number): void;
  /** From now on the session reads and writes `secure`. */
  replaceSocket(secure: tls.TLSSocket): void;
  /** The handshake failed: the session ends. */
  failed(): void;
  /** The handshake succeeded: the session forgets what it learnt before TLS (RFC 3207 §4.2). */
  secured(): void;
}

/** The STARTTLS command (its argument `arg`): a refusal queued, or the upgrade done or failed. */
export async function startTls(host: StartTlsHost, arg: string): Promise<void> {
  const ctx = host.secureContext;
  if (!ctx) return host.queue(R.tlsUnavailable());
  if (host.tls) return host.queue(R.tlsActive());
  if (arg.trim()) return host.queue(R.syntax('STARTTLS'));
  // CVE-2011-0411: plaintext pipelined after STARTTLS must not be executed after the handshake.
  const injected = host.framing.discard();
  if (injected > 0) host.injected(injected);
  host.metrics.commands.inc({ verb: 'STARTTLS', class: '2xx' });
  host.send(R.tlsReady());
  const secure = upgradeToTls(host.socket, ctx);
  host.replaceSocket(secure);
  const ok = await handshake(secure, host.handshakeTimeout);
  host.metrics.tlsSessions.inc({ listener: host.listener, mode: 'starttls', result: ok ? 'success' : 'failure' });
  if (!ok) return host.failed();
  host.secured();
  host.framing.discard();
}

/** The TLS socket over `plain`, server side; `plain` no longer reports to the session. */
export function upgradeToTls(plain: net.Socket, secureContext: tls.SecureContext): tls.TLSSocket {
  plain.removeAllListeners('data');
  plain.removeAllListeners('timeout');
  plain.removeAllListeners('close');
  plain.removeAllListeners('end');
  plain.removeAllListeners('error');
  plain.on('error', () => undefined);
  return new tls.TLSSocket(plain, { isServer: true, secureContext });
}

/**
 * Resolves true when the handshake completed, false when it failed or took longer than `ms`
 * (the socket is then destroyed): a client that says STARTTLS and then nothing must not hold its
 * slot for minutes.
 */
export function handshake(secure: tls.TLSSocket, ms: number): Promise<boolean> {
  return new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => {
      secure.destroy();
      resolve(false);
    }, ms);
    const done = (v: boolean) => {
      clearTimeout(timer);
      resolve(v);
    };
    secure.once('secure', () => done(true));
    secure.once('error', () => done(false));
    secure.once('close', () => done(false));
  });
}
