/**
 * log.ts — pino JSON logs on stdout; human-readable (pino-pretty) when stdout is a terminal.
 *
 * Lines are written asynchronously (pino.destination with sync: false): while one write is in
 * flight, the next lines gather in sonic-boom's buffer and leave in one write — under load one
 * write per many sessions instead of one per session line. pino flushes the buffer synchronously
 * when the process exits (also on process.exit after SIGTERM), so no line is lost on a clean stop.
 */
import { pino, type Logger } from 'pino';

export function createLogger(level: string, pretty = process.stdout.isTTY === true): Logger {
  if (pretty) {
    return pino({ level, base: { app: 'doorman' }, transport: { target: 'pino-pretty', options: { colorize: true } } });
  }
  return pino({ level, base: { app: 'doorman' }, timestamp: pino.stdTimeFunctions.isoTime }, pino.destination({ dest: 1, sync: false }));
}
