/**
 * rbldnsd.ts — a real DNS list server (rbldnsd) on a free loopback port, serving the zones a
 * test writes (ip4set, ip6trie, dnset data files).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freePort } from './net.js';
import { spawnProc, type Proc } from './procs.js';

export interface RblZone {
  name: string;
  type: 'ip4set' | 'ip6trie' | 'dnset' | 'ip4trie';
  lines: string[];
}

export interface Rbldnsd {
  port: number;
  server: string;
  proc: Proc;
  stop(): Promise<void>;
}

export async function startRbldnsd(zones: RblZone[]): Promise<Rbldnsd> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-rbl-'));
  fs.chmodSync(dir, 0o755); // rbldnsd drops root privileges before it reads the zones
  const port = await freePort();
  const specs: string[] = [];
  zones.forEach((z, i) => {
    const file = `z${i}.zone`;
    fs.writeFileSync(path.join(dir, file), z.lines.join('\n') + '\n');
    specs.push(`${z.name}:${z.type}:${file}`);
  });
  // -n: stay in the foreground; -b: address/port; -w: data folder; -t: TTLs (default:min:max).
  const proc = spawnProc('rbldnsd', 'rbldnsd', ['-n', '-b', `127.0.0.1/${port}`, '-w', dir, '-t', '60:1:3600', ...specs]);
  await proc.waitFor(/started/, 5000);
  return {
    port,
    server: `127.0.0.1:${port}`,
    proc,
    async stop() {
      await proc.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
