/**
 * starttls.ts — the client's socket turned into a TLS one in place (RFC 3207).
 *
 * `upgradeToTls` takes the plaintext socket from its session (every listener the session put on
 * it is removed; its errors are from now on the TLS socket's) and wraps it; the session attaches
 * to the TLS socket before `handshake` waits for it, within its own short deadline
 * (limits.tlsHandshakeTimeout), as on the smtps listener. What the session forgets after the
 * handshake, and the CVE-2011-0411 discard before it, are the session's.
 */
import type net from 'node:net';
import tls from 'node:tls';

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
