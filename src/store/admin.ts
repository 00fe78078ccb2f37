/**
 * admin.ts — the running instance answers `doorman limits show|reset` for its in-memory store.
 *
 * Without Redis the limit state lives in the running doorman's memory (in the primary when there
 * are workers, store/primary.ts): a separate `doorman limits` process has an empty store of its
 * own. So the instance's HTTP listener for /metrics (`metrics.listen`) also answers
 *
 *   GET  /limits/state?key=KEY   200 {"now": ms, "state": …}   Store.inspect: read only
 *   POST /limits/reset?key=KEY   200 {"existed": true|false}   Store.reset: deletes one key
 *
 * where KEY is what the rule's `admin` computed in the CLI (from the same rule files). The CLI
 * reads the answer with `limitView` (store.ts), as it does a Redis key.
 *
 * Security. Only a client on this machine gets an answer: its address is a loopback one, or the
 * connection's own local address (a connection from this host to one of its own addresses, for a
 * listener bound to one interface); anyone else gets 403, also when `metrics.listen` is 0.0.0.0 for
 * Prometheus. The Host header must be `localhost` or an IP literal (a web page that rebinds its own
 * name to 127.0.0.1 sends its name: refused). A reset needs POST and the header
 * `X-Doorman-Limits: reset`, which a browser never sends cross-origin without a CORS preflight
 * (not answered). Only limit keys (`rl:{…}`, `grey:{…}`, at most LIMITS_MAX_KEY_BYTES) are read or
 * deleted; nothing else of the process is reachable, and nothing here changes a limit's setting.
 */
import http from 'node:http';
import net from 'node:net';
import { z } from 'zod';
import type { RawState, Store } from './store.js';

/** How long `doorman limits` waits for the running instance's answer, ms. */
export const LIMITS_QUERY_TIMEOUT_MS = 5_000;
/** The longest key the instance accepts (a triplet of two 254-byte addresses fits), bytes. */
export const LIMITS_MAX_KEY_BYTES = 1_024;
/** The header a reset must carry (see above). */
export const RESET_HEADER = 'x-doorman-limits';

/** True for a client of this machine: a loopback address, or the connection's own local address. */
export function isLocalClient(remote: string | undefined, local: string | undefined): boolean {
  if (!remote) return false;
  const bare = remote.startsWith('::ffff:') && net.isIPv4(remote.slice(7)) ? remote.slice(7) : remote;
  if (net.isIPv4(bare) && bare.startsWith('127.')) return true;
  if (bare === '::1') return true;
  return local !== undefined && remote === local;
}

/** True for a Host header naming no site: `localhost` or an IP literal, with or without a port. */
export function isLiteralHost(host: string | undefined): boolean {
  if (!host) return false;
  const m = /^(?:\[([0-9a-f:.]+)\]|([^:]+))(?::\d{1,5})?$/i.exec(host.trim());
  const name = m?.[1] ?? m?.[2];
  if (!name) return false;
  return name.toLowerCase() === 'localhost' || net.isIP(name) !== 0;
}

function isLimitKey(key: string | null): key is string {
  return key !== null && Buffer.byteLength(key) <= LIMITS_MAX_KEY_BYTES && (key.startsWith('rl:{') || key.startsWith('grey:{'));
}

/**
 * Answers a /limits/ request from `store` (null: this instance keeps no limit state of its own —
 * Redis is configured). False when the URL is not under /limits/ (the caller answers it).
 */
export function handleLimitsRequest(req: http.IncomingMessage, res: http.ServerResponse, store: Pick<Store, 'inspect' | 'reset'> | null): boolean {
  const url = new URL(req.url ?? '/', 'http://localhost');
  if (!url.pathname.startsWith('/limits/')) return false;
  const send = (code: number, body: unknown) => {
    res.writeHead(code, { 'content-type': 'application/json', 'cache-control': 'no-store' });
    res.end(`${JSON.stringify(body)}\n`);
  };
  if (!isLocalClient(req.socket.remoteAddress, req.socket.localAddress) || !isLiteralHost(req.headers.host)) {
    send(403, { error: 'limits are answered to clients on this machine only' });
    return true;
  }
  if (!store) {
    send(404, { error: 'this instance keeps its limit state in Redis: ask Redis' });
    return true;
  }
  const key = url.searchParams.get('key');
  const show = url.pathname === '/limits/state' && (req.method === 'GET' || req.method === 'HEAD');
  const reset = url.pathname === '/limits/reset' && req.method === 'POST' && req.headers[RESET_HEADER] === 'reset';
  if (!show && !reset) {
    send(url.pathname === '/limits/state' || url.pathname === '/limits/reset' ? 405 : 404, { error: 'GET /limits/state?key=… or POST /limits/reset?key=… with X-Doorman-Limits: reset' });
    return true;
  }
  if (!isLimitKey(key)) {
    send(400, { error: 'key: a limit key (rl:{…} or grey:{…})' });
    return true;
  }
  (show ? store.inspect(key) : store.reset(key).then((existed) => ({ existed }))).then(
    (body) => send(200, body),
    (e: unknown) => send(500, { error: e instanceof Error ? e.message : String(e) }),
  );
  return true;
}

const rawState = z.object({
  now: z.number(),
  state: z
    .discriminatedUnion('type', [
      z.object({ type: z.literal('bucket'), tat: z.number(), ttlMs: z.number() }),
      z.object({ type: z.literal('slots'), tokens: z.array(z.string()), ttlMs: z.number() }),
      z.object({ type: z.literal('greylist'), value: z.string(), ttlMs: z.number() }),
    ])
    .nullable(),
});

/** The address a client on this machine uses for `metrics.listen` (a wildcard → loopback). */
export function instanceAddress(listen: { host: string; port: number }): { host: string; port: number } {
  const host = listen.host === '0.0.0.0' ? '127.0.0.1' : listen.host === '::' ? '::1' : listen.host;
  return { host, port: listen.port };
}

/** Why the running instance gave no answer; the CLI prints the message. */
export class NoInstanceError extends Error {}

function request(at: { host: string; port: number }, method: 'GET' | 'POST', path: string, timeoutMs: number): Promise<unknown> {
  const where = `http://${net.isIPv6(at.host) ? `[${at.host}]` : at.host}:${at.port}`;
  return new Promise((resolve, reject) => {
    const req = http.request({ host: at.host, port: at.port, method, path, headers: method === 'POST' ? { [RESET_HEADER]: 'reset' } : {}, timeout: timeoutMs }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => {
        if (body.length < 1_000_000) body += c;
      });
      res.on('end', () => {
        let parsed: unknown = null;
        try {
          parsed = JSON.parse(body);
        } catch {
          // Not doorman (another program on that port): said below.
        }
        const error = (parsed as { error?: unknown } | null)?.error;
        if (res.statusCode === 200 && parsed !== null) resolve(parsed);
        else if (typeof error === 'string') reject(new NoInstanceError(`the doorman at ${where} refused: ${error}`));
        else reject(new NoInstanceError(`${where} (metrics.listen) answered HTTP ${res.statusCode ?? '?'}: not a doorman that serves /limits/ (an older version?)`));
      });
    });
    req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on('error', (e) => reject(new NoInstanceError(`no running doorman answered at ${where} (metrics.listen): ${e.message}`)));
    req.end();
  });
}

/** Store.inspect, asked of the running instance at `metrics.listen`. */
export async function askInstanceState(at: { host: string; port: number }, key: string, timeoutMs = LIMITS_QUERY_TIMEOUT_MS): Promise<RawState> {
  const body = await request(instanceAddress(at), 'GET', `/limits/state?key=${encodeURIComponent(key)}`, timeoutMs);
  const r = rawState.safeParse(body);
  if (!r.success) throw new NoInstanceError(`the running doorman's answer is not a limit state: ${JSON.stringify(body).slice(0, 200)}`);
  return r.data;
}

/** Store.reset, asked of the running instance at `metrics.listen`. */
export async function askInstanceReset(at: { host: string; port: number }, key: string, timeoutMs = LIMITS_QUERY_TIMEOUT_MS): Promise<boolean> {
  const body = await request(instanceAddress(at), 'POST', `/limits/reset?key=${encodeURIComponent(key)}`, timeoutMs);
  const existed = (body as { existed?: unknown }).existed;
  if (typeof existed !== 'boolean') throw new NoInstanceError(`the running doorman's answer is not a reset: ${JSON.stringify(body).slice(0, 200)}`);
  return existed;
}
