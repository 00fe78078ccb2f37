/**
 * rspamd — the message checked by rspamd over its HTTP protocol (rspamd.com/doc/developers/protocol.html).
 *
 * `POST /checkv2` with the envelope as request headers — `IP` (the real client), `Helo`, `From`,
 * one `Rcpt` per recipient, `User` (the AUTH login), `Queue-Id` (doorman's session id), `MTA-Name`
 * (doorman's host name) — and the message as the body, sent with chunked transfer encoding as it
 * arrives (rspamd accepts chunked requests): the request opens at the message's first chunk and
 * nothing is held. A message larger than `maxSize` is not sent on (the request is dropped; keep
 * it below rspamd's `max_message`, 50 MB by default). rspamd answers JSON: `action`, `score`,
 * `required_score`, `symbols`, and `messages.smtp_message` for its own reply text.
 *
 * Actions: `reject` → reject (`reply`, {message}: rspamd's smtp_message or "Spam message
 * rejected"); `soft reject` → tempfail (`tempfailReply`); `greylist` → tempfail (`greylistReply`);
 * `add header`, `rewrite subject` → tag; `no action` → pass. The reason carries the action, score
 * and the top symbols by weight. rspamd down, an HTTP error, an unreadable answer, no answer within
 * the rule file's `timeout` → the rule's error (`onError`). Bypassable. Shared machinery: scanner.ts.
 */
import http from 'node:http';
import { z } from 'zod';
import type { SessionSnapshot } from '../pipeline/events.js';
import { defineRuleType, type ReplySpec } from '../pipeline/rule.js';
import { addressSettings, drained, maxSizeSetting, printable, scannerRule, type ScannerAddress, type ScanVerdict } from './scanner.js';
import { fillReply, replyTemplate } from './shared.js';

/** rspamd's JSON answer for one message (symbols, messages): a few KB; more than this is refused. */
const MAX_ANSWER = 1024 * 1024;
/** Symbols named in the finding's reason. */
const TOP_SYMBOLS = 10;

const settings = z.strictObject({
  ...addressSettings(11333),
  /** Bytes sent to rspamd at most; a larger message passes unscanned. */
  maxSize: maxSizeSetting(20 * 1024 * 1024),
  reply: replyTemplate.default('550 5.7.1 {message}'),
  tempfailReply: replyTemplate.default('451 4.7.1 {message}'),
  greylistReply: replyTemplate.default('451 4.7.1 Greylisted, try again later'),
});
type Settings = z.output<typeof settings>;

interface RspamdAnswer {
  action?: unknown;
  score?: unknown;
  required_score?: unknown;
  symbols?: unknown;
  messages?: unknown;
}

/** The top symbols by weight, `NAME(score)`. */
function topSymbols(symbols: unknown): string {
  if (!symbols || typeof symbols !== 'object') return '';
  const list = Object.entries(symbols as Record<string, unknown>).map(([name, v]) => {
    const score = v && typeof v === 'object' && typeof (v as { score?: unknown }).score === 'number' ? (v as { score: number }).score : 0;
    return { name: printable(name, 64), score };
  });
  list.sort((a, b) => Math.abs(b.score) - Math.abs(a.score) || a.name.localeCompare(b.name));
  return list
    .slice(0, TOP_SYMBOLS)
    .map((s) => `${s.name}(${s.score.toFixed(2)})`)
    .join(',');
}

/** rspamd's JSON answer → the verdict; an Error for anything that is not an rspamd answer. */
export function rspamdVerdict(body: string, s: Pick<Settings, 'reply' | 'tempfailReply' | 'greylistReply'>): ScanVerdict {
  let a: RspamdAnswer;
  try {
    a = JSON.parse(body) as RspamdAnswer;
  } catch {
    throw new Error('rspamd: the answer is not JSON');
  }
  if (!a || typeof a !== 'object' || typeof a.action !== 'string') throw new Error('rspamd: no action in the answer');
  const score = typeof a.score === 'number' ? a.score.toFixed(2) : '?';
  const required = typeof a.required_score === 'number' ? a.required_score.toFixed(2) : '?';
  const reason = `rspamd: ${printable(a.action, 32)}, score ${score}/${required}; ${topSymbols(a.symbols) || 'no symbols'}`;
  const msgs = a.messages && typeof a.messages === 'object' ? (a.messages as Record<string, unknown>) : {};
  const own = typeof msgs.smtp_message === 'string' && msgs.smtp_message.trim() ? printable(msgs.smtp_message.trim()) : null;
  const spec = (template: string, fallback: string): ReplySpec => fillReply(template, { message: own ?? fallback });
  switch (a.action) {
    case 'reject':
      return { result: 'reject', finding: { kind: 'reject', reason, reply: spec(s.reply, 'Spam message rejected') } };
    case 'soft reject':
      return { result: 'tempfail', finding: { kind: 'tempfail', reason, reply: spec(s.tempfailReply, 'Try again later') } };
    case 'greylist':
      return { result: 'tempfail', finding: { kind: 'tempfail', reason, reply: spec(s.greylistReply, 'Greylisted, try again later') } };
    case 'add header':
    case 'rewrite subject':
      return { result: 'tag', finding: { kind: 'tag', reason } };
    case 'no action':
      return { result: 'clean', finding: { kind: 'pass' } };
    default:
      throw new Error(`rspamd: unknown action ${JSON.stringify(printable(a.action, 32))}`);
  }
}

/** Request headers for the message: the envelope as rspamd's protocol names it. */
export function rspamdHeaders(snapshot: SessionSnapshot, mtaName: string): http.OutgoingHttpHeaders {
  const h: http.OutgoingHttpHeaders = {
    IP: snapshot.client.text,
    'Queue-Id': printable(snapshot.id, 64),
    'MTA-Name': printable(mtaName, 255),
  };
  if (snapshot.helo) h.Helo = printable(snapshot.helo, 255);
  if (snapshot.sender) h.From = snapshot.sender.isNull ? '<>' : printable(snapshot.sender.raw, 320);
  if (snapshot.recipients.length) h.Rcpt = snapshot.recipients.map((r) => printable(r.raw, 320));
  if (snapshot.auth?.login) h.User = printable(snapshot.auth.login, 255);
  return h;
}

/** One POST /checkv2, the body streamed with chunked encoding. */
class RspamdScan {
  private readonly req: http.ClientRequest;
  private error: Error | null = null;
  private readonly answer: Promise<string>;

  constructor(addr: ScannerAddress, headers: http.OutgoingHttpHeaders) {
    const req = http.request({
      ...(addr.socket ? { socketPath: addr.socket } : { host: addr.host, port: addr.port }),
      method: 'POST',
      path: '/checkv2',
      headers,
      agent: false,
    });
    this.req = req;
    this.answer = new Promise<string>((resolve, reject) => {
      req.on('error', (err) => {
        this.error ??= new Error(`rspamd: ${err.message}`);
        reject(this.error);
      });
      req.on('response', (res) => {
        let got = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => {
          got += d;
          if (got.length > MAX_ANSWER) req.destroy(new Error('answer too long'));
        });
        res.on('end', () => {
          if (res.statusCode === 200) resolve(got);
          else {
            this.error ??= new Error(`rspamd: HTTP ${res.statusCode ?? '?'} ${printable(got, 120)}`);
            reject(this.error);
          }
        });
        res.on('error', (err) => reject(new Error(`rspamd: ${err.message}`)));
      });
    });
    this.answer.catch(() => undefined);
  }

  write(chunk: Buffer): void | Promise<void> {
    if (this.error) throw this.error;
    if (!this.req.write(chunk)) return drained(this.req, 'rspamd');
  }

  finish(): Promise<string> {
    if (this.error) return Promise.reject(this.error);
    this.req.end();
    return this.answer;
  }

  abort(): void {
    this.req.destroy();
  }
}

export const rspamdRule = defineRuleType({
  type: 'rspamd',
  description: 'spam check by rspamd (HTTP /checkv2)',
  settings,
  create(name, s, deps) {
    const addr: ScannerAddress = { host: s.host, port: s.port, socket: s.socket };
    const mtaName = deps.ownNames[0] ?? 'doorman';
    return scannerRule(
      {
        name,
        type: 'rspamd',
        bypassable: true,
        maxSize: s.maxSize,
        open: (snapshot) => {
          const scan = new RspamdScan(addr, rspamdHeaders(snapshot, mtaName));
          return {
            write: (c) => scan.write(c),
            finish: async () => rspamdVerdict(await scan.finish(), s),
            abort: () => scan.abort(),
          };
        },
      },
      deps,
    );
  },
});
