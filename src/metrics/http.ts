/**
 * http.ts — the metrics endpoint: /metrics (Prometheus text), /healthz (the process is alive),
 * /readyz (listeners up and the backend reachable; 503 otherwise), and /limits/ (the in-memory
 * limit state for `doorman limits show|reset`, to clients on this machine only: store/admin.ts).
 */
import http from 'node:http';
import { handleLimitsRequest } from '../store/admin.js';
import type { Store } from '../store/store.js';
/** What /metrics serves: a registry, or the primary's aggregation of its workers' registries. */
export interface MetricsSource {
  metrics(): Promise<string>;
  readonly contentType: string;
}

export interface ReadinessCheck {
  (): Promise<{ ready: boolean; checks: Record<string, string> }>;
}

/**
 * `limits`: the in-memory store /limits/ reads and resets; null when the state is in Redis (the
 * CLI asks Redis itself).
 */
export async function startMetricsServer(
  host: string,
  port: number,
  registry: MetricsSource,
  ready: ReadinessCheck,
  limits: Pick<Store, 'inspect' | 'reset'> | null = null,
): Promise<http.Server> {
  const server = http.createServer((req, res) => {
    const url = (req.url ?? '/').split('?')[0];
    if (handleLimitsRequest(req, res, limits)) return;
    if (url === '/metrics') {
      registry.metrics().then(
        (body) => {
          res.writeHead(200, { 'content-type': registry.contentType });
          res.end(body);
        },
        (e: unknown) => {
          res.writeHead(500);
          res.end(String(e));
        },
      );
      return;
    }
    if (url === '/healthz') {
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end('ok\n');
      return;
    }
    if (url === '/readyz') {
      ready().then(
        (r) => {
          res.writeHead(r.ready ? 200 : 503, { 'content-type': 'application/json' });
          res.end(JSON.stringify(r) + '\n');
        },
        () => {
          res.writeHead(503);
          res.end();
        },
      );
      return;
    }
    res.writeHead(404);
    res.end();
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  return server;
}
