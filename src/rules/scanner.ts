/**
 * scanner.ts — what the content-scanner rules (clamav, spamassassin, rspamd) share: the body
 * reader that hands one message to one scanner, the size limit, the metrics, the settings for the
 * scanner's address. Each rule brings its protocol as a `Scan` (one message, one connection).
 *
 * One message's life: the runner calls `begin` before its first chunk — a `Scan` is opened there
 * (clamd and rspamd connect at once and stream; spamd holds the bytes), dropping whatever an
 * earlier message of the session left (one refused or cut short never reaches `end`). Each chunk
 * goes to `Scan.write`; a write the scanner does not take within the rule file's `timeout` fails
 * the scan. Past `maxSize` bytes the scan is dropped and the message passes unscanned (counted
 * `skipped`). At data_end, `end` waits for `Scan.finish` — within the rule file's `timeout`, the
 * runner's deadline; its teardown closes the connection. A scan that failed (scanner down, slow,
 * an answer that makes no sense) is counted `error` and thrown: the file's `onError` decides
 * (`pass` by default, `tempfail` on request), like any rule error.
 *
 * Memory: streaming scanners keep at most what the socket buffers (the runner stops reading the
 * client while a reader lags: maxBodyLag); a holding scanner (spamd) keeps at most `maxSize` bytes.
 * Metrics: doorman_content_scans_total{scanner,result}, doorman_content_scan_duration_seconds{scanner}
 * (from the end of data to the scanner's answer); `scanner` is the rule's name.
 */
import net from 'node:net';
import { Observable } from 'rxjs';
import { z } from 'zod';
import type { SessionSnapshot } from '../pipeline/events.js';
import { PASS, type Finding, type Rule, type RuleDeps } from '../pipeline/rule.js';

/** How a scan is counted in doorman_content_scans_total{result}. */
export type ScanResult = 'clean' | 'tag' | 'reject' | 'tempfail' | 'virus' | 'skipped' | 'error';
export const SCAN_RESULTS: readonly ScanResult[] = ['clean', 'tag', 'reject', 'tempfail', 'virus', 'skipped', 'error'];

/** A scanner's answer for a message: the finding, and how it is counted. */
export interface ScanVerdict {
  readonly result: Exclude<ScanResult, 'skipped' | 'error'>;
  readonly finding: Finding;
}

/** One message's scan over a scanner's protocol. Nothing here may throw asynchronously. */
export interface Scan {
  /** Message bytes in order; a Promise while the scanner is not ready for more. Rejects (or throws) on failure. */
  write(chunk: Buffer): void | Promise<void>;
  /** The end of the message: the scanner's verdict. Rejects on failure. */
  finish(): Promise<ScanVerdict>;
  /** Drops the connection (skipped, failed, answered, the session ended). Idempotent. */
  abort(): void;
}

/** Where a scanner listens: a Unix socket path, or host and port. */
export interface ScannerAddress {
  readonly host: string;
  readonly port: number;
  readonly socket: string | null;
}

/** Settings keys for the scanner's address (zod shape), with the scanner's usual port. */
export function addressSettings(defaultPort: number) {
  return {
    /** Scanner host (ignored when `socket` is set). */
    host: z.string().min(1).default('127.0.0.1'),
    port: z.number().int().min(1).max(65535).default(defaultPort),
    /** A Unix socket path instead of host and port. */
    socket: z.string().min(1).nullable().default(null),
  };
}

/** The largest message (bytes) a scanner is sent; larger ones pass unscanned (`skipped`). */
export function maxSizeSetting(defaultBytes: number) {
  return z.number().int().positive().default(defaultBytes);
}

export function connectTo(a: ScannerAddress): net.Socket {
  return a.socket ? net.connect(a.socket) : net.connect(a.port, a.host);
}

/** Resolves once `s` takes writes again; rejects if it closes or fails first. */
export function drained(s: NodeJS.WritableStream & NodeJS.EventEmitter, what: string): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const done = (err?: Error) => {
      s.off('drain', ok);
      s.off('close', closed);
      s.off('error', done);
      if (err) reject(err);
      else resolve();
    };
    const ok = () => done();
    const closed = () => done(new Error(`${what} closed the connection`));
    s.on('drain', ok);
    s.on('close', closed);
    s.on('error', done);
  });
}

/** Text from a scanner echoed in a reply or a log: printable ASCII, at most `max` characters. */
export function printable(raw: string, max = 200): string {
  return raw.replace(/[^\x20-\x7e]/g, '?').slice(0, max);
}

/** `p`, or a rejection after `ms`. */
function deadline<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(what)), ms);
  });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

/** One message's scan as the rule keeps it. */
interface MessageScan {
  /** Null once skipped or failed (its connection dropped). */
  scan: Scan | null;
  bytes: number;
  skipped: boolean;
  error: Error | null;
}

export interface ScannerState {
  current: MessageScan | null;
}

export interface ScannerRuleOptions {
  readonly name: string;
  readonly type: string;
  /** An allowlisted session (access allow, DNSWL) skips the rule. */
  readonly bypassable: boolean;
  readonly maxSize: number;
  /** Opens one message's scan (a connection, or a buffer), with the session at the start of its data. */
  readonly open: (snapshot: SessionSnapshot) => Scan;
}

/** A content-scanner rule: a body reader around one `Scan` per message. */
export function scannerRule(o: ScannerRuleOptions, deps: RuleDeps): Rule<ScannerState> {
  const scanner = o.name;
  const timeout = deps.timeout ?? 5_000;
  const m = deps.metrics;
  if (!deps.checkOnly) for (const result of SCAN_RESULTS) m.contentScans.inc({ scanner, result }, 0);
  const count = (result: ScanResult) => m.contentScans.inc({ scanner, result });
  const fail = (s: MessageScan, err: unknown) => {
    s.error ??= err instanceof Error ? err : new Error(String(err));
    s.scan?.abort();
    s.scan = null;
  };
  const drop = (state: ScannerState) => {
    state.current?.scan?.abort();
    state.current = null;
  };
  return {
    name: o.name,
    type: o.type,
    bypassable: o.bypassable,
    checks: {},
    session: () => ({ current: null }),
    end: (state) => drop(state),
    body: {
      begin(snapshot, state) {
        drop(state);
        const s: MessageScan = { scan: null, bytes: 0, skipped: false, error: null };
        state.current = s;
        try {
          s.scan = o.open(snapshot);
        } catch (err) {
          fail(s, err);
        }
      },
      chunk(chunk, state) {
        const s = state.current;
        if (!s?.scan) return undefined;
        s.bytes += chunk.length;
        if (s.bytes > o.maxSize) {
          // Larger than the scanner is sent: the message passes unscanned.
          s.skipped = true;
          s.scan.abort();
          s.scan = null;
          return undefined;
        }
        try {
          const w = s.scan.write(chunk);
          if (!w) return undefined;
          return deadline(w, timeout, `${scanner}: the scanner did not take the message within ${timeout} ms`).catch((err: unknown) => fail(s, err));
        } catch (err) {
          fail(s, err);
        }
        return undefined;
      },
      end(_event, state) {
        const s = state.current;
        state.current = null;
        // No byte of the message reached the reader (an empty message): nothing to scan.
        if (!s) return PASS;
        if (s.skipped) {
          count('skipped');
          return PASS;
        }
        const scan = s.scan;
        if (!scan) {
          count('error');
          throw s.error ?? new Error(`${scanner}: scan failed`);
        }
        return new Observable<Finding>((sub) => {
          const started = performance.now();
          let settled = false;
          scan.finish().then(
            (v) => {
              if (settled) return;
              settled = true;
              m.contentScanDuration.observe({ scanner }, (performance.now() - started) / 1000);
              count(v.result);
              sub.next(v.finding);
              sub.complete();
            },
            (err: unknown) => {
              if (settled) return;
              settled = true;
              count('error');
              sub.error(err);
            },
          );
          // Answered, failed, or past the rule's deadline (the runner unsubscribes): the connection goes.
          return () => {
            scan.abort();
            if (!settled) {
              settled = true;
              count('error');
            }
          };
        });
      },
    },
  };
}
