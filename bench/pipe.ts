/**
 * pipe.ts — the calibration peer (BENCH_PIPE=1, and the cost rows): the cheapest possible Node hop,
 * a raw byte pipe with TCP_NODELAY and no SMTP parsing. Usage: pipe.ts <backend port> [processes];
 * prints its port. With N > 1 processes, N cluster workers accept on one port themselves
 * (SCHED_NONE), as doorman's workers do — N pipe processes against N doorman workers.
 */
import cluster from 'node:cluster';
import net from 'node:net';

const backendPort = Number(process.argv[2]);
const processes = Math.max(1, Number(process.argv[3] ?? 1));

function serve(port: number, ready: (port: number) => void): void {
  const server = net.createServer({ noDelay: true }, (c) => {
    const b = net.connect({ port: backendPort, host: '127.0.0.1', noDelay: true });
    c.pipe(b);
    b.pipe(c);
    c.on('error', () => b.destroy());
    b.on('error', () => c.destroy());
  });
  server.listen(port, '127.0.0.1', () => ready((server.address() as net.AddressInfo).port));
}

if (processes === 1) {
  serve(0, (port) => process.stdout.write(`port ${port}\n`));
  process.on('SIGTERM', () => process.exit(0));
} else if (cluster.isPrimary) {
  cluster.schedulingPolicy = cluster.SCHED_NONE;
  // A free port for all workers: taken here, released, then shared by the workers' listen.
  const probe = net.createServer().listen(0, '127.0.0.1', () => {
    const port = (probe.address() as net.AddressInfo).port;
    probe.close(() => {
      let up = 0;
      for (let i = 0; i < processes; i++) {
        cluster.fork({ PIPE_PORT: String(port) }).on('listening', () => {
          if (++up === processes) process.stdout.write(`port ${port}\n`);
        });
      }
    });
  });
  process.on('SIGTERM', () => {
    for (const w of Object.values(cluster.workers ?? {})) w?.kill();
    process.exit(0);
  });
} else {
  serve(Number(process.env.PIPE_PORT), () => undefined);
}
