/**
 * bench/ratelimit-ops.ts — store operations the shipped rate limits cost per message (issue 14).
 *
 * doorman with the shipped rules/ratelimit.yaml (rcpt-rate: cost recipient; sender-rate: cost
 * message), smtp-sink as backend; one session sends MESSAGES (default 10) messages of one
 * recipient each from one sender; prints doorman_store_operations_total by operation, per message.
 * Run: `npm run build && node --import tsx bench/ratelimit-ops.ts`. Loopback only, bounded.
 */
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, startDoorman } from '../test/helpers/doorman.js';
import { startSink } from '../test/helpers/sink.js';
import { SmtpClient } from '../test/helpers/smtp.js';
import { stopAll } from '../test/helpers/procs.js';

const MESSAGES = Number(process.env.MESSAGES ?? 10);

async function main(): Promise<void> {
  const sink = await startSink();
  const shipped = fs.readFileSync(path.join(ROOT, 'rules', 'ratelimit.yaml'), 'utf8');
  const d = await startDoorman({ backendPort: sink.port, rules: { 'ratelimit.yaml': shipped } });
  try {
    const c = await SmtpClient.connect(d.port);
    await c.reply();
    await c.ehlo('bench.example.org');
    for (let i = 0; i < MESSAGES; i++) {
      await c.cmd('MAIL FROM:<bench@example.org>');
      await c.cmd(`RCPT TO:<r${i}@example.com>`);
      await c.cmd('DATA');
      await c.cmd('Subject: ops\r\n\r\nbody\r\n.');
    }
    await c.cmd('QUIT');
    const ops = ['rate', 'refund', 'acquire'];
    const out: Record<string, number> = {};
    for (const op of ops) out[op] = (await d.metric('doorman_store_operations_total', { op })) / MESSAGES;
    process.stdout.write(`${JSON.stringify({ messages: MESSAGES, perMessage: out })}\n`);
  } finally {
    await d.stop();
    await sink.stop();
    await stopAll();
  }
}

void main();
