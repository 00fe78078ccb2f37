/**
 * pipe.ts — the calibration peer (BENCH_PIPE=1): the cheapest possible Node hop, a raw byte pipe
 * with TCP_NODELAY and no SMTP parsing, one process. Usage: pipe.ts <backend port>; prints its port.
 */
import net from 'node:net';

const backendPort = Number(process.argv[2]);
const server = net.createServer({ noDelay: true }, (c) => {
  const b = net.connect({ port: backendPort, host: '127.0.0.1', noDelay: true });
  c.pipe(b);
  b.pipe(c);
  c.on('error', () => b.destroy());
  b.on('error', () => c.destroy());
});
server.listen(0, '127.0.0.1', () => process.stdout.write(`port ${(server.address() as net.AddressInfo).port}\n`));
process.on('SIGTERM', () => process.exit(0));
