/** swaks.ts — run swaks (a real SMTP client) against doorman. */
import { execFile } from 'node:child_process';

export interface SwaksResult {
  status: number;
  out: string;
}

export function swaks(args: string[], timeout = 30_000): Promise<SwaksResult> {
  return new Promise((resolve) => {
    execFile('swaks', ['--hide-informational', ...args], { timeout, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      const status = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
      resolve({ status, out: stdout + stderr });
    });
  });
}
