/**
 * sink.ts — Postfix smtp-sink as a fast backend that keeps every message it accepts.
 *
 * smtp-sink -d writes one file per transaction: X-Client-Addr / X-Client-Proto / X-Helo-Args /
 * X-Mail-Args / X-Rcpt-Args lines, its own Received header, then the message as received after
 * dot-unstuffing, one line per SMTP line with LF endings.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freePort } from './net.js';
import { eventually, spawnProc, type Proc } from './procs.js';

export interface SinkMessage {
  file: string;
  clientAddr: string;
  helo: string;
  mail: string;
  rcpts: string[];
  /** The message as the backend received it, lines joined with LF. */
  body: string;
}

export interface Sink {
  port: number;
  dir: string;
  proc: Proc;
  messages(): SinkMessage[];
  waitForMessages(n: number, timeout?: number): Promise<SinkMessage[]>;
  /** Waits for a message whose envelope sender is `<from>`. */
  bySender(from: string, timeout?: number): Promise<SinkMessage>;
  stop(): Promise<void>;
}

export async function startSink(extra: string[] = [], host = '127.0.0.1', fixedPort?: number): Promise<Sink> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-sink-'));
  fs.chmodSync(dir, 0o777);
  const port = fixedPort ?? (await freePort(host));
  // Options before the address (smtp-sink's own rule); -u: drop root; -d: dump each message.
  const proc = spawnProc('smtp-sink', 'smtp-sink', ['-u', 'nobody', '-d', `${dir}/%Y%m%d%H%M%S.`, ...extra, `${host}:${port}`, '256']);
  await eventually(async () => {
    const net = await import('node:net');
    return new Promise<boolean>((resolve) => {
      const s = net.connect(port, host);
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
  }, 5000);
  // In arrival order (file modification time); tests pick their own by sender or content.
  const messages = () =>
    fs
      .readdirSync(dir)
      .map((f) => ({ f, t: fs.statSync(path.join(dir, f)).mtimeMs }))
      .sort((a, b) => a.t - b.t || a.f.localeCompare(b.f))
      .map(({ f }) => parseDump(path.join(dir, f)));
  return {
    port,
    dir,
    proc,
    messages,
    async waitForMessages(n, timeout = 10_000) {
      await eventually(() => fs.readdirSync(dir).length >= n, timeout);
      // smtp-sink writes the file while receiving; give it a moment to finish the last one.
      await new Promise((r) => setTimeout(r, 100));
      return messages();
    },
    async bySender(from, timeout = 10_000) {
      const find = () => messages().find((m) => m.mail.startsWith(`<${from}>`));
      const m = await eventually(find, timeout);
      if (!m) throw new Error(`no message from <${from}> at the sink`);
      await new Promise((r) => setTimeout(r, 100));
      return parseDump(m.file);
    },
    async stop() {
      await proc.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

export function parseDump(file: string): SinkMessage {
  const text = fs.readFileSync(file, 'latin1');
  const lines = text.split('\n');
  const meta: Record<string, string[]> = {};
  let i = 0;
  for (; i < lines.length; i++) {
    const m = /^(X-Client-Addr|X-Client-Proto|X-Helo-Args|X-Mail-Args|X-Rcpt-Args): (.*)$/.exec(lines[i] ?? '');
    if (!m || m[1] === undefined) break;
    (meta[m[1]] ??= []).push(m[2] ?? '');
  }
  // smtp-sink's own Received header comes first: one line and its continuations.
  if (lines[i]?.startsWith('Received: ')) {
    i++;
    while (lines[i]?.startsWith('\t') || lines[i]?.startsWith(' ')) i++;
  }
  // smtp-sink ends each dump with one extra empty line.
  const body = lines.slice(i).join('\n').replace(/\n$/, '');
  return {
    file,
    clientAddr: meta['X-Client-Addr']?.[0] ?? '',
    helo: meta['X-Helo-Args']?.[0] ?? '',
    mail: meta['X-Mail-Args']?.[0] ?? '',
    rcpts: meta['X-Rcpt-Args'] ?? [],
    body,
  };
}
