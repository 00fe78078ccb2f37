/**
 * protocol.ts — the Postfix SMTP access policy delegation protocol, as bytes
 * (http://www.postfix.org/SMTPD_POLICY_README.html, "Protocol description").
 *
 * A request is a block of `name=value` lines, each ended by LF, the block ended by an empty line;
 * a connection carries many requests one after the other. The answer is the same format with one
 * attribute: `action=<access(5) action>` then an empty line. This file only cuts and formats:
 * `PolicyReader` turns chunks into requests within named bounds (line length, attributes per
 * request) and reports the first malformed input (the server then closes the connection);
 * `formatAnswer` writes one answer; `policyAction` turns a stage verdict's reply or tag into the
 * action Postfix understands. Nothing here knows the pipeline or a socket.
 *
 * Answers (access(5)):
 *   5xx refusal   `<code> <enhanced> <text>`           Postfix replies exactly that
 *   4xx refusal   `DEFER_IF_PERMIT <enhanced> <text>`  450 (access_map_defer_code) with that
 *                                                      enhanced code, unless a later restriction
 *                                                      rejects anyway
 *   tag           `PREPEND X-Doorman-Tag: <value>`     the header added to the message
 *   nothing       `DUNNO`                              the next restriction decides
 */
import type { Reply } from '../../protocol/reply.js';

/** One request: its attributes in the order received (a repeated name keeps its last value). */
export type PolicyRequest = ReadonlyMap<string, string>;

export interface PolicyBounds {
  /** Longest `name=value` line, octets without the LF (limits.policyMaxLine). */
  readonly maxLine: number;
  /** Attributes in one request (limits.policyMaxAttributes). */
  readonly maxAttributes: number;
}

/** Attribute names as Postfix writes them: lower case, digits, `_` (ccert_subject, protocol_state…). */
const NAME = /^[a-z0-9_]{1,64}$/;

export type ReadResult = { readonly requests: PolicyRequest[]; readonly error: string | null };

/**
 * Cuts a connection's bytes into requests. After an error it reads nothing more (the caller
 * closes). A trailing CR before the LF is dropped (a person testing with telnet or nc -C).
 */
export class PolicyReader {
  private buf: Buffer = Buffer.alloc(0);
  private attrs = new Map<string, string>();
  private count = 0;
  private failed: string | null = null;

  constructor(private readonly bounds: PolicyBounds) {}

  /** Bytes of the request in progress (for the caller's checks; always bounded by maxLine). */
  get pending(): number {
    return this.buf.length;
  }

  push(chunk: Buffer): ReadResult {
    const requests: PolicyRequest[] = [];
    if (this.failed) return { requests, error: this.failed };
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    let start = 0;
    for (;;) {
      const lf = this.buf.indexOf(0x0a, start);
      if (lf < 0) break;
      let end = lf;
      if (end > start && this.buf[end - 1] === 0x0d) end--;
      if (end - start > this.bounds.maxLine) return this.fail(requests, `line longer than ${this.bounds.maxLine} octets`);
      const line = this.buf.toString('utf8', start, end);
      start = lf + 1;
      if (line === '') {
        if (this.count === 0) return this.fail(requests, 'empty request');
        requests.push(this.attrs);
        this.attrs = new Map();
        this.count = 0;
        continue;
      }
      const eq = line.indexOf('=');
      const name = eq < 0 ? '' : line.slice(0, eq);
      if (!NAME.test(name)) return this.fail(requests, 'not a name=value line');
      if (++this.count > this.bounds.maxAttributes) return this.fail(requests, `more than ${this.bounds.maxAttributes} attributes`);
      this.attrs.set(name, line.slice(eq + 1));
    }
    this.buf = this.buf.subarray(start);
    if (this.buf.length > this.bounds.maxLine + 1) return this.fail(requests, `line longer than ${this.bounds.maxLine} octets`);
    return { requests, error: null };
  }

  private fail(requests: PolicyRequest[], why: string): ReadResult {
    this.failed = why;
    this.buf = Buffer.alloc(0);
    this.attrs = new Map();
    return { requests, error: why };
  }
}

/** One answer on the wire: `action=…\n\n`. CR, LF and NUL in the action become spaces (one line only). */
export function formatAnswer(action: string): Buffer {
  // eslint-disable-next-line no-control-regex
  return Buffer.from(`action=${action.replace(/[\r\n\x00]/g, ' ')}\n\n`, 'utf8');
}

/** The text of a reply on one line (multi-line replies joined with a space). */
function oneLine(r: Reply): string {
  return r.lines.join(' ').trim();
}

/**
 * The action for a refusal: 5xx as `<code> <enhanced> <text>`, 4xx as `DEFER_IF_PERMIT <enhanced> <text>`.
 * A connect-stage 421 or 554 is sent as 450 / 554: Postfix only takes 4NN/5NN and keeps the
 * connection itself.
 */
export function refusalAction(r: Reply): string {
  const text = oneLine(r);
  const enhanced = r.enhanced ? `${r.enhanced} ` : '';
  if (r.code >= 500) return `${r.code} ${enhanced}${text}`.trim();
  return `DEFER_IF_PERMIT ${enhanced}${text}`.trim();
}

/** The action that adds a tag as a header. */
export function tagAction(tag: string): string {
  return `PREPEND X-Doorman-Tag: ${tag}`;
}

export const DUNNO = 'DUNNO';

/** The action's kind, for the metric and the log: dunno, reject, defer, prepend. */
export function actionKind(action: string): 'dunno' | 'reject' | 'defer' | 'prepend' {
  if (action.startsWith('DEFER_IF_PERMIT')) return 'defer';
  if (action.startsWith('PREPEND')) return 'prepend';
  if (/^5\d\d\b/.test(action)) return 'reject';
  return 'dunno';
}
