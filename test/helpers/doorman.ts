/**
 * doorman.ts — run the built doorman (`bin/doorman.js`, from `npm run build`) as a real process
 * on free loopback ports, with its own rule folder, and read its JSON log lines.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort } from './net.js';
import { eventually, spawnProc, type Proc } from './procs.js';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The rule files of `rules/` as shipped (name → YAML text), for `rules`. */
export function shippedRules(): Record<string, string> {
  const dir = path.join(ROOT, 'rules');
  return Object.fromEntries(
    fs
      .readdirSync(dir)
      .filter((f) => f.endsWith('.yaml'))
      .map((f) => [f, fs.readFileSync(path.join(dir, f), 'utf8')]),
  );
}

export interface DoormanOptions {
  backendPort: number;
  /** Rule files: name → YAML text. Default: none (no rules). */
  rules?: Record<string, string>;
  /** Extra environment (DOORMAN_*). */
  env?: Record<string, string>;
  /** Configuration file text (YAML); written to a temporary file and passed with --config. */
  config?: string;
  /** Listeners; default one smtp listener on a free port. Use {PORT} for a free port. */
  listen?: string;
}

export interface LogLine {
  level: number;
  msg: string;
  [k: string]: unknown;
}

export interface Doorman {
  proc: Proc;
  port: number;
  /** All listener ports, in DOORMAN_LISTEN order. */
  ports: number[];
  metricsPort: number;
  rulesDir: string;
  logs(): LogLine[];
  sessions(): LogLine[];
  /** Waits for n session log lines in total. */
  waitSessions(n: number, timeout?: number): Promise<LogLine[]>;
  metrics(): Promise<string>;
  /** Value of one sample, e.g. metric('doorman_rejections_total', { rule: 'access' }); 0 if absent. */
  metric(name: string, labels?: Record<string, string>): Promise<number>;
  stop(signal?: NodeJS.Signals): Promise<number | string>;
}

export async function startDoorman(opts: DoormanOptions): Promise<Doorman> {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-run-'));
  const rulesDir = path.join(work, 'rules');
  fs.mkdirSync(rulesDir);
  for (const [name, text] of Object.entries(opts.rules ?? {})) fs.writeFileSync(path.join(rulesDir, name), text);
  const args = [path.join(ROOT, 'bin', 'doorman.js')];
  if (opts.config !== undefined) {
    const cfg = path.join(work, 'doorman.yaml');
    fs.writeFileSync(cfg, opts.config);
    args.push('--config', cfg);
  }
  // A free port can be taken by another process's outgoing connection (both come from the
  // ephemeral range) before doorman binds it: then doorman exits with EADDRINUSE, and it is started
  // again on new ports (bounded).
  for (let attempt = 1; ; attempt++) {
    const metricsPort = await freePort();
    let listen = opts.listen ?? 'smtp://127.0.0.1:{PORT}';
    const ports: number[] = [];
    while (listen.includes('{PORT}')) {
      const p = await freePort();
      ports.push(p);
      listen = listen.replace('{PORT}', String(p));
    }
    const env: Record<string, string> = {
      PATH: process.env.PATH ?? '/usr/bin:/bin',
      DOORMAN_LISTEN: listen,
      DOORMAN_BACKEND: `127.0.0.1:${opts.backendPort}`,
      DOORMAN_HOSTNAME: 'mx.doorman.test',
      DOORMAN_RULES: rulesDir,
      DOORMAN_METRICS_LISTEN: `127.0.0.1:${metricsPort}`,
      DOORMAN_LOG_LEVEL: 'info',
      // One process unless a test asks for workers (cluster.test.ts): logs and PIDs stay simple.
      DOORMAN_WORKERS: '1',
      // No Received: field unless a test asks (trace.test.ts): tests compare the bytes at
      // backends that cannot be told the client (smtp-sink, the fake backend).
      DOORMAN_TRACE_HEADER: 'never',
      // V8's young generation pinned to 16 MB semi-spaces, Node 22's default: Node 24 grows it to
      // 64 MB by itself, and its uncollected garbage would hide what the RSS bounds of the memory
      // tests (relay, session-limits, adversarial) are there to catch, such as a held 20 MB message.
      NODE_OPTIONS: '--max-semi-space-size=16',
      ...opts.env,
    };
    const proc = spawnProc('doorman', process.execPath, args, { env, cwd: work });
    try {
      await proc.waitFor(/"msg":"doorman started"/, 15_000);
      return handle(proc, ports, metricsPort, work, rulesDir);
    } catch (err) {
      if (attempt >= 3 || !proc.output().includes('EADDRINUSE')) throw err;
      await proc.stop('SIGKILL', 2000);
    }
  }
}

function handle(proc: Proc, ports: number[], metricsPort: number, work: string, rulesDir: string): Doorman {
  const logs = (): LogLine[] =>
    proc
      .output()
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as LogLine);
  const sessions = () => logs().filter((l) => l.msg === 'session');
  const metrics = async () => {
    const res = await fetch(`http://127.0.0.1:${metricsPort}/metrics`);
    return res.text();
  };
  return {
    proc,
    port: ports[0] ?? 0,
    ports,
    metricsPort,
    rulesDir,
    logs,
    sessions,
    async waitSessions(n, timeout = 10_000) {
      await eventually(() => sessions().length >= n, timeout);
      const s = sessions();
      if (s.length < n) throw new Error(`expected ${n} session log lines, got ${s.length}: ${proc.output().slice(-3000)}`);
      return s;
    },
    metrics,
    async metric(name, labels = {}) {
      const text = await metrics();
      let sum = 0;
      for (const line of text.split('\n')) {
        if (!line.startsWith(name + '{') && !line.startsWith(name + ' ')) continue;
        const m = /^([^{ ]+)(?:\{(.*)\})? (\S+)$/.exec(line);
        if (!m || m[1] !== name) continue;
        const have = Object.fromEntries([...(m[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((x) => [x[1], x[2]]));
        if (Object.entries(labels).every(([k, v]) => have[k] === v)) sum += Number(m[3]);
      }
      return sum;
    },
    async stop(signal = 'SIGTERM') {
      const r = await proc.stop(signal, 10_000);
      fs.rmSync(work, { recursive: true, force: true });
      return r;
    },
  };
}
