/**
 * dns.ts — DNS servers for tests: dnsmasq on a free loopback port serving the records a test
 * names (authoritative for *.test: unknown names are NXDOMAIN), a black hole that never
 * answers (for timeouts), and a relay that answers late (a slow resolver).
 */
import dgram from 'node:dgram';
import fs from 'node:fs';
import { freePort } from './net.js';
import { spawnProc, trackCloser, type Proc } from './procs.js';

export interface DnsRecords {
  txt?: [string, string][];
  a?: [string, string][];
  aaaa?: [string, string][];
  ptr?: [string, string][];
  mx?: [string, string, number][];
  /** TTL of these answers, s (dnsmasq's --local-ttl; default 0, which no cache keeps). */
  ttl?: number;
}

export interface Dnsmasq {
  port: number;
  server: string;
  proc: Proc;
  stop(): Promise<void>;
}

export async function startDnsmasq(records: DnsRecords): Promise<Dnsmasq> {
  const port = await freePort();
  // Authoritative for *.test and the loopback reverse zone: unknown names are NXDOMAIN.
  const args = ['-k', `--port=${port}`, '--listen-address=127.0.0.1', '--bind-interfaces', '--no-resolv', '--no-hosts', '--conf-file=/dev/null', '--user=root', '--local=/test/', '--local=/127.in-addr.arpa/', '--log-facility=-', '--log-queries'];
  if (records.ttl) args.push(`--local-ttl=${records.ttl}`);
  for (const [name, text] of records.txt ?? []) args.push(`--txt-record=${name},${text}`);
  for (const [name, ip] of records.a ?? []) args.push(`--host-record=${name},${ip}`);
  for (const [name, ip] of records.aaaa ?? []) args.push(`--host-record=${name},${ip}`);
  for (const [name, target] of records.ptr ?? []) args.push(`--ptr-record=${name},${target}`);
  for (const [name, host, pref] of records.mx ?? []) args.push(`--mx-host=${name},${host},${pref}`);
  const proc = spawnProc('dnsmasq', 'dnsmasq', args);
  await proc.waitFor(/started, version/, 5000);
  return { port, server: `127.0.0.1:${port}`, proc, stop: async () => void (await proc.stop()) };
}

/** A UDP port that reads queries and never answers. */
export async function startBlackHole(): Promise<{ server: string; queries: () => number; stop(): Promise<void> }> {
  const sock = dgram.createSocket('udp4');
  let n = 0;
  sock.on('message', () => n++);
  await new Promise<void>((r) => sock.bind(0, '127.0.0.1', () => r()));
  const port = sock.address().port;
  return { server: `127.0.0.1:${port}`, queries: () => n, stop: () => new Promise((r) => sock.close(() => r())) };
}

/**
 * A slow resolver: a UDP relay in front of `upstream` (host:port) that holds every query for
 * `delayMs` before passing it on, then relays the answer back — a resolver that answers, late.
 */
export async function startSlowDns(upstream: string, delayMs: number): Promise<{ server: string; queries: () => number; stop(): Promise<void> }> {
  const [host, port] = [upstream.slice(0, upstream.lastIndexOf(':')), Number(upstream.slice(upstream.lastIndexOf(':') + 1))];
  const sock = dgram.createSocket('udp4');
  const timers = new Set<NodeJS.Timeout>();
  const relays = new Set<dgram.Socket>();
  let n = 0;
  sock.on('message', (msg, from) => {
    n++;
    const t = setTimeout(() => {
      timers.delete(t);
      const relay = dgram.createSocket('udp4');
      relays.add(relay);
      const done = () => {
        if (relays.delete(relay)) relay.close();
      };
      relay.on('message', (answer) => {
        sock.send(answer, from.port, from.address);
        done();
      });
      relay.on('error', done);
      relay.send(msg, port, host);
      setTimeout(done, 5000).unref();
    }, delayMs);
    timers.add(t);
  });
  await new Promise<void>((r) => sock.bind(0, '127.0.0.1', () => r()));
  let closing: Promise<void> | null = null;
  // Once, whoever asks first: the test, or the file's cleanup after a failure.
  const stop = () =>
    (closing ??= new Promise<void>((r) => {
      for (const t of timers) clearTimeout(t);
      for (const x of relays) x.close();
      relays.clear();
      sock.close(() => r());
    }));
  trackCloser(stop);
  return { server: `127.0.0.1:${sock.address().port}`, queries: () => n, stop };
}

/**
 * The names /etc/hosts gives 127.0.0.1: Node's resolver reads that file for reverse lookups, so
 * they are the PTR answer for a client on 127.0.0.1 (serve their A records to confirm it).
 */
export function loopbackNames(): string[] {
  try {
    return fs
      .readFileSync('/etc/hosts', 'utf8')
      .split('\n')
      .map((l) => l.replace(/#.*/, '').trim().split(/\s+/))
      .filter((f) => f[0] === '127.0.0.1')
      .flatMap((f) => f.slice(1));
  } catch {
    return [];
  }
}
