/**
 * http.ts — the metrics endpoint: /metrics (Prometheus text), /healthz (the process is alive),
 * /readyz (listeners up and the backend reachable; 503 otherwise).
 */
import http from 'node:http';
/** What /metrics serves: a registry, or the primary's aggregation of its workers' registries. */
export interface MetricsSource {
  metrics(): Promise<string>;
  readonly contentType: string;
}

export interface ReadinessCheck {
  (): Promise<{ ready: boolean; checks: Record<string, string> }>;
}

export async function startMetricsServer(host: string, port: number, registry: MetricsSource, ready: ReadinessCheck): Promise<http.Server> {
  const server = http.createServer((req, res) => {
    const url = (req.url ?? '/').split('?')[0];
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
