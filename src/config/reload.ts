/**
 * reload.ts — which settings a reload (SIGHUP, or a changed file) may change in a running doorman.
 *
 * Reloaded: `limits.*` and `tls.cert` / `tls.key`. New connections get them; an open session
 * keeps the limits and certificate it started with, so nothing is dropped.
 * Not reloaded (a changed value is logged and the running one stays until a restart): everything
 * else — listeners, workers, Redis, the backends, DNS servers, the metrics address, the log level,
 * the host name and the rules folder — because each is bound into something built once at start
 * (listening sockets, worker processes, the store and its counters, the backend pool and its open
 * connections, the shared resolver, the logger, the greeting of pooled backend connections).
 * docs/operations.md says the same for operators.
 */
import type { Config } from './schema.js';

/** Top-level sections a reload applies. */
export const RELOADABLE = ['limits', 'tls'] as const;

/** Key paths (`backend.address`, `listen`) whose value differs between the two and needs a restart. */
export function restartOnlyChanges(running: Config, next: Config): string[] {
  const out: string[] = [];
  const skip = new Set<string>(RELOADABLE);
  const walk = (a: unknown, b: unknown, at: string) => {
    if (isRecord(a) && isRecord(b)) {
      for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) {
        if (!at && skip.has(k)) continue;
        walk(a[k], b[k], at ? `${at}.${k}` : k);
      }
      return;
    }
    if (JSON.stringify(a) !== JSON.stringify(b)) out.push(at);
  };
  walk(running, next, '');
  return out;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
