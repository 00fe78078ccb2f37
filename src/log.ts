/**
 * log.ts — pino JSON logs on stdout; human-readable (pino-pretty) when stdout is a terminal.
 */
import { pino, type Logger } from 'pino';

export function createLogger(level: string, pretty = process.stdout.isTTY === true): Logger {
  if (pretty) {
    return pino({ level, base: { app: 'doorman' }, transport: { target: 'pino-pretty', options: { colorize: true } } });
  }
  return pino({ level, base: { app: 'doorman' }, timestamp: pino.stdTimeFunctions.isoTime });
}
