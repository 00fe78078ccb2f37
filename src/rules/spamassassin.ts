/**
 * spamassassin — the message scored by SpamAssassin's spamd, over the spamd protocol.
 *
 * Protocol (spamd/PROTOCOL): `SYMBOLS SPAMC/1.5`, `Content-length: <bytes>`, `User: <user>`, a
 * blank line, the message; spamd answers `SPAMD/1.1 0 EX_OK`, `Spam: True ; 15.0 / 5.0` (score /
 * its required score), a blank line and the rules that hit, comma-separated, then closes. The
 * length goes first, so the message is held (copied, at most `maxSize` bytes, like spamc's 500 KB
 * default) until its end; a larger one is dropped as soon as it passes the limit and passes
 * unscanned.
 *
 * Findings: score ≥ `rejectScore` → reject with `reply`; score ≥ `tagScore` (default: spamd's
 * required score) → tag; else pass. The reason carries the score and the rules that hit. spamd
 * down, an error code, an answer past the rule file's `timeout` → the rule's error (`onError`).
 * Bypassable. Shared machinery: scanner.ts.
 */
import { z } from 'zod';
import { defineRuleType, parseReplySpec, type ReplySpec } from '../pipeline/rule.js';
import { addressSettings, connectTo, maxSizeSetting, printable, scannerRule, type Scan, type ScannerAddress, type ScanVerdict } from './scanner.js';
import { replyTemplate } from './shared.js';

/** spamd's answer to SYMBOLS is a few headers and one line of rule names. */
const MAX_ANSWER = 64 * 1024;
/** Rules named in the finding's reason. */
const TOP_SYMBOLS = 10;

const settings = z.strictObject({
  ...addressSettings(783),
  /** Bytes held and sent to spamd at most; a larger message passes unscanned (spamc's default: 500 KB). */
  maxSize: maxSizeSetting(512_000),
  /** The user whose preferences spamd applies (`User:`). */
  user: z.string().regex(/^[A-Za-z0-9._@+-]{1,64}$/, 'a user name').default('doorman'),
  /** Score at or above which the message is tagged; null: spamd's own required score. */
  tagScore: z.number().nullable().default(null),
  /** Score at or above which the message is refused; null: never refused (tagged only). */
  rejectScore: z.number().nullable().default(10),
  reply: replyTemplate.default('550 5.7.1 Message rejected as spam'),
});

export interface SpamdAnswer {
  readonly score: number;
  readonly required: number;
  readonly symbols: readonly string[];
}

/** spamd's answer → score, required score and rules; an Error for anything else. */
export function parseSpamd(raw: string): SpamdAnswer {
  const sep = raw.indexOf('\r\n\r\n');
  const head = (sep >= 0 ? raw.slice(0, sep) : raw).split('\r\n');
  const body = sep >= 0 ? raw.slice(sep + 4) : '';
  const status = /^SPAMD\/\d+\.\d+ (\d+) (.*)$/.exec(head[0] ?? '');
  if (!status) throw new Error(`spamd: unexpected answer ${JSON.stringify(printable(head[0] ?? '', 80))}`);
  if (status[1] !== '0') throw new Error(`spamd: error ${status[1]} ${printable(status[2] ?? '')}`);
  for (const line of head.slice(1)) {
    const m = /^Spam:\s*(True|False|Yes|No)\s*;\s*(-?[\d.]+)\s*\/\s*(-?[\d.]+)\s*$/i.exec(line);
    if (!m) continue;
    const symbols = body
      .split(',')
      .map((s) => s.trim())
      .filter((s) => /^[A-Za-z0-9_]+$/.test(s));
    return { score: Number(m[2]), required: Number(m[3]), symbols };
  }
  throw new Error('spamd: no Spam header in the answer');
}

/** The verdict for spamd's answer under the rule's thresholds. */
export function spamdVerdict(a: SpamdAnswer, s: { tagScore: number | null; rejectScore: number | null }, reply: ReplySpec): ScanVerdict {
  const reason = `spamassassin: score ${a.score}/${a.required}; ${a.symbols.slice(0, TOP_SYMBOLS).join(',') || 'no rules hit'}`;
  if (s.rejectScore !== null && a.score >= s.rejectScore) return { result: 'reject', finding: { kind: 'reject', reason, reply } };
  if (a.score >= (s.tagScore ?? a.required)) return { result: 'tag', finding: { kind: 'tag', reason } };
  return { result: 'clean', finding: { kind: 'pass' } };
}

/** One message held (copied, bounded by the rule's maxSize), then one SYMBOLS request. */
class SpamdScan implements Scan {
  private readonly parts: Buffer[] = [];
  private bytes = 0;
  private sock: ReturnType<typeof connectTo> | null = null;
  private aborted = false;

  constructor(
    private readonly addr: ScannerAddress,
    private readonly user: string,
    private readonly verdict: (a: SpamdAnswer) => ScanVerdict,
  ) {}

  write(chunk: Buffer): void {
    // A copy: the chunk may be a view of a larger buffer that holding it would keep alive.
    this.parts.push(Buffer.from(chunk));
    this.bytes += chunk.length;
  }

  finish(): Promise<ScanVerdict> {
    if (this.aborted) return Promise.reject(new Error('spamd: scan aborted'));
    const sock = connectTo(this.addr);
    this.sock = sock;
    return new Promise<ScanVerdict>((resolve, reject) => {
      let got = '';
      sock.setEncoding('latin1');
      sock.on('data', (d: string) => {
        got += d;
        if (got.length > MAX_ANSWER) {
          sock.destroy();
          reject(new Error('spamd: answer too long'));
        }
      });
      sock.on('error', (err) => reject(new Error(`spamd: ${err.message}`)));
      sock.on('close', () => {
        try {
          resolve(this.verdict(parseSpamd(got)));
        } catch (err) {
          reject(err instanceof Error ? err : new Error(String(err)));
        }
      });
      sock.write(`SYMBOLS SPAMC/1.5\r\nContent-length: ${this.bytes}\r\nUser: ${this.user}\r\n\r\n`);
      // The socket keeps references to the held parts until they are sent: no second copy.
      for (const p of this.parts.splice(0)) sock.write(p);
      sock.end();
    });
  }

  abort(): void {
    this.aborted = true;
    this.parts.length = 0;
    this.sock?.destroy();
  }
}

export const spamassassinRule = defineRuleType({
  type: 'spamassassin',
  description: 'spam score by SpamAssassin spamd (SYMBOLS)',
  settings: settings.refine((s) => s.rejectScore === null || s.tagScore === null || s.tagScore <= s.rejectScore, {
    message: 'tagScore must not be above rejectScore',
    path: ['tagScore'],
  }),
  create(name, s, deps) {
    const addr: ScannerAddress = { host: s.host, port: s.port, socket: s.socket };
    const reply = parseReplySpec(s.reply) as ReplySpec;
    const verdict = (a: SpamdAnswer) => spamdVerdict(a, s, reply);
    return scannerRule({ name, type: 'spamassassin', bypassable: true, maxSize: s.maxSize, open: () => new SpamdScan(addr, s.user, verdict) }, deps);
  },
});
