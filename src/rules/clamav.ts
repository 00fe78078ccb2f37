/**
 * clamav — the message scanned by clamd for viruses, over clamd's INSTREAM command.
 *
 * Protocol (clamd(8)): `zINSTREAM\0`, then the message as chunks each prefixed with its length
 * (4 bytes, big-endian), then a zero length; clamd answers `stream: OK\0`,
 * `stream: <signature> FOUND\0` or `<text> ERROR\0`, and closes. The connection is opened at the
 * message's first chunk and each chunk is sent as it arrives (nothing is held); a message larger
 * than `maxSize` is not sent on (keep it below clamd's StreamMaxLength, 25 MB by default, which
 * clamd answers with an ERROR).
 *
 * Findings: a virus → reject with `reply` (`554 5.7.1 … {virus}`, the signature's name); clean →
 * pass; clamd's ERROR, a refused or broken connection, an answer past the rule file's `timeout` →
 * the rule's error: the file's `onError` decides. Not bypassable: an allowlisted client's virus is
 * still a virus. Shared machinery (size limit, metrics, deadlines): scanner.ts.
 */
import { z } from 'zod';
import { defineRuleType, type ReplySpec } from '../pipeline/rule.js';
import { addressSettings, connectTo, drained, maxSizeSetting, printable, scannerRule, type Scan, type ScannerAddress, type ScanVerdict } from './scanner.js';
import { fillReply, replyTemplate } from './shared.js';

/** clamd's answer is one short line; more than this is not clamd. */
const MAX_REPLY = 4096;

const settings = z.strictObject({
  ...addressSettings(3310),
  /** Bytes sent to clamd at most; a larger message passes unscanned. */
  maxSize: maxSizeSetting(20 * 1024 * 1024),
  reply: replyTemplate.default('554 5.7.1 Message rejected: virus found: {virus}'),
});

/** clamd's answer → the verdict (a virus, clean) or an Error (clamd's ERROR, anything else). */
export function clamdVerdict(answer: string, reply: (virus: string) => ReplySpec): ScanVerdict {
  const text = answer.replace(/\0+$/, '').trim();
  const found = /^stream: (.+) FOUND$/.exec(text);
  if (found?.[1]) {
    const virus = printable(found[1], 100);
    return { result: 'virus', finding: { kind: 'reject', reason: `clamav: ${virus}`, reply: reply(virus) } };
  }
  if (text === 'stream: OK') return { result: 'clean', finding: { kind: 'pass' } };
  throw new Error(`clamd: ${printable(text) || 'no answer'}`);
}

/** One INSTREAM: a connection per message. */
class ClamdScan implements Scan {
  private readonly sock;
  private error: Error | null = null;
  private readonly answer: Promise<string>;
  private closed = false;

  constructor(
    addr: ScannerAddress,
    private readonly reply: (virus: string) => ReplySpec,
  ) {
    const sock = connectTo(addr);
    this.sock = sock;
    this.answer = new Promise<string>((resolve, reject) => {
      let got = '';
      sock.setEncoding('latin1');
      sock.on('data', (d: string) => {
        got += d;
        const nul = got.indexOf('\0');
        if (nul >= 0) resolve(got.slice(0, nul));
        else if (got.length > MAX_REPLY) reject(new Error('clamd: answer too long'));
      });
      sock.on('error', (err) => {
        this.error ??= new Error(`clamd: ${err.message}`);
        reject(this.error);
      });
      sock.on('close', () => {
        this.closed = true;
        // An answer without its NUL (older clamd, or a plain INSTREAM) ends with the connection.
        if (got) resolve(got);
        else reject(this.error ?? new Error('clamd closed the connection without an answer'));
      });
    });
    this.answer.catch(() => undefined);
    sock.write('zINSTREAM\0');
  }

  write(chunk: Buffer): void | Promise<void> {
    if (this.error) throw this.error;
    if (this.closed) throw new Error('clamd closed the connection');
    const len = Buffer.alloc(4);
    len.writeUInt32BE(chunk.length);
    this.sock.write(len);
    if (!this.sock.write(chunk)) return drained(this.sock, 'clamd');
  }

  async finish(): Promise<ScanVerdict> {
    if (this.error) throw this.error;
    if (!this.closed) this.sock.write(Buffer.alloc(4));
    return clamdVerdict(await this.answer, this.reply);
  }

  abort(): void {
    this.sock.destroy();
  }
}

export const clamavRule = defineRuleType({
  type: 'clamav',
  description: 'virus scan by clamd (INSTREAM)',
  settings,
  create(name, s, deps) {
    const addr: ScannerAddress = { host: s.host, port: s.port, socket: s.socket };
    const reply = (virus: string) => fillReply(s.reply, { virus });
    return scannerRule({ name, type: 'clamav', bypassable: false, maxSize: s.maxSize, open: () => new ClamdScan(addr, reply) }, deps);
  },
});
