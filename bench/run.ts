/**
 * bench/run.ts — doorman against the direct path, measured in the same run (`npm run bench`).
 *
 * Load: Postfix smtp-source; backend: smtp-sink (no dumps). Each workload alternates direct and
 * doorman runs, BENCH_REPS times (default 3), and reports medians:
 *   (a) one 4 KB message per connection, 20 parallel sessions
 *   (b) many 4 KB messages per session, 20 parallel sessions
 *   (c) 20 MB messages (MB/s, RSS)
 *   (d) idle concurrent connections (RSS per connection; an idle client holds no backend connection;
 *       BENCH_IDLE, default 9000 — two sockets each under a 20000-file limit; against a Node
 *       backend in its own process, since smtp-sink stops near 1000)
 *   (e) added latency per command round trip (MAIL, RCPT) at half of the saturating load (the
 *       number of smtp-source sessions whose throughput is closest to half of (b)'s)
 * each through doorman without rules and with the default rule set (relay, sender, a DNSBL zone on
 * a local rbldnsd, rate limits on a local Redis) — the tuned rows. Then (a) and (b) once more with
 * doorman as scripts/install.sh starts it: the shipped rule files (rules/*.yaml), the shipped
 * limits (no configuration file), its NODE_OPTIONS, workers `auto`, state in memory — so a default
 * that slows or refuses mail shows in the table. The one difference: DNS goes to a resolver on
 * 127.0.0.1 (dnsmasq, authoritative for the loopback reverse zone) that answers BENCH_DNS_DELAY ms
 * late (default 500: a slow resolver; 0: at once), never to the system's. Results:
 * bench/results/latest.json and bench/results/latest.md (copy the table into docs/performance.md).
 *
 * A third configuration, 'default rules + dmarc' (BENCH_DMARC=0 leaves it out), adds the dmarc rule
 * for (a), (b) and (c): every message held until its DKIM/DMARC verdict, 20 MB ones spooled.
 * BENCH_PIPE=1 adds a raw Node byte pipe (bench/pipe.ts) as a calibration row for (a) and (b).
 * BENCH_HARAKA=1 adds Haraka 3.3.4 as a peer for (a) and (b) (bench/haraka.ts; installed on demand
 * into bench/haraka), BENCH_HARAKA_MESSAGES (1000) its message count. BENCH_ONLY=a,b,c,d,e runs
 * only those workloads (for quick comparisons; the table in docs/performance.md is from a full run);
 * BENCH_SHIPPED=0 leaves out the shipped-defaults rows. BENCH_REDIS=1 adds (a) and (b) with the
 * shipped rule files and rate limits on the bench's Redis (workers `auto`: one per core), and
 * reads Redis's INFO commandstats around each Redis-backed row: commands per message and, solved
 * from (a) and (b) together, per session and per message, by command (the capacity model in
 * docs/operations.md).
 * BENCH_FRONTS=1 (issue 17) adds (a) and (b) through a real Postfix smtpd (test/helpers/postfix.ts,
 * tuned: 100 processes, no chroot, a log file, in_flow_delay 0) relaying to the same smtp-sink:
 * Postfix alone, Postfix + doorman milter (smtpd_milters, milter_default_action = accept), Postfix
 * + doorman policy (check_policy_service in smtpd_recipient_restrictions), the default rules, the
 * three alternating per repetition; each run waits until Postfix has delivered every message to
 * the sink (its log's status=sent; refusals counted). The rows' direct column is Postfix alone, the
 * ratio the front's share of it. BENCH_ONLY=fronts runs these rows alone (both workloads).
 * BENCH_PIN=1 pins Postfix, smtp-source and the sink to CPU 0 and doorman, Redis and rbldnsd to
 * CPU 1 in those rows (doorman with a core of its own; Postfix alone gets the same one core).
 * BENCH_RECORD=1 (issue 18) adds (a) and (b) with the default rules and session records on
 * (`record:`, every session, no header blocks) against the same rules without them, the two
 * alternating per repetition: the rows' direct column is recording off, the ratio on/off.
 * BENCH_ONLY=record runs these rows alone (both workloads).
 * BENCH_COST=1 (issue 19), or BENCH_ONLY=cost for these rows alone: the cost per message against
 * the raw pipe, like with like — doorman with the shipped rule files, limits and NODE_OPTIONS (DNS
 * from dnsmasq at once, TTL 300 s), 1 worker against a 1-process pipe, then N workers against N pipe
 * processes (N = BENCH_WORKERS, default one per core); (a) and (b), the two alternating per
 * repetition; msg/s, CPU ms per message and peak RSS of each (RSS per process in the note); then
 * (e) with the shipped rules and 1 worker.
 * BENCH_OUT puts the results in another folder (the smoke test in test/integration/bench.test.ts).
 *
 * Every loop is bounded in count; everything runs on 127.0.0.1 and is stopped by PID at the end.
 */
import { execFile, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { shippedRules, startDoorman, type Doorman } from '../test/helpers/doorman.js';
import { startPostfix, type Postfix } from '../test/helpers/postfix.js';
import { startHaraka } from './haraka.js';
import { procStat } from './proc-stat.js';
import { freePort } from '../test/helpers/net.js';
import { sleep, spawnProc, stopAll, type Proc } from '../test/helpers/procs.js';
import { startRbldnsd } from '../test/helpers/rbldnsd.js';
import { loopbackNames, startDnsmasq, startSlowDns } from '../test/helpers/dns.js';
import { startRedis } from '../test/helpers/redis.js';
import { SmtpClient } from '../test/helpers/smtp.js';

const run = promisify(execFile);
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const REPS = Number(process.env.BENCH_REPS ?? 3);
const MSGS = Number(process.env.BENCH_MESSAGES ?? 4000);
/** (e): MAIL+RCPT round trips timed per path (a p99 needs many samples to be more than its worst few). */
const LATENCY_ROUNDS = 1000;
// Each idle session holds two sockets in doorman (client and backend): with this machine's limit of
// 20000 open files per process, 9000 is the most that fits.
const IDLE = Number(process.env.BENCH_IDLE ?? 9000);

/** The rows with the default rules and dmarc (BENCH_DMARC=0 leaves them out). */
const DMARC_RULES = 'default rules + dmarc';
/** doorman's environment as scripts/install.sh and the Dockerfile start it. */
const SHIPPED_ENV: Record<string, string> = { NODE_OPTIONS: process.env.BENCH_SHIPPED_NODE_OPTIONS ?? '--max-semi-space-size=32', DOORMAN_WORKERS: 'auto', DOORMAN_LOG_LEVEL: 'info' };
/** ms the shipped-defaults rows' resolver holds each answer. */
const DNS_DELAY = Number(process.env.BENCH_DNS_DELAY ?? 500);
const SHIPPED = 'shipped defaults (install.sh)';
const SHIPPED_REDIS = 'shipped rules, Redis';

/** Calls per command from Redis's INFO commandstats (the bench's own INFO left out). */
async function commandStats(port: number): Promise<Map<string, number>> {
  const { stdout } = await run('redis-cli', ['-p', String(port), 'INFO', 'commandstats'], { timeout: 5000 });
  const calls = new Map<string, number>();
  for (const m of stdout.matchAll(/^cmdstat_([^:]+):calls=(\d+)/gm)) if (m[1] !== 'info') calls.set(m[1]!, Number(m[2]));
  return calls;
}

/** Redis commands during one Redis-backed row, with doorman's own count of its sessions and messages. */
interface RedisUse {
  workload: string;
  config: string;
  sessions: number;
  messages: number;
  calls: Record<string, number>;
}

const ONLY = new Set((process.env.BENCH_ONLY ?? 'a,b,c,d,e').split(',').map((x) => x.trim()));
const only = (w: string) => ONLY.has(w);

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? (s[Math.floor((s.length - 1) / 2)]! + s[Math.ceil((s.length - 1) / 2)]!) / 2 : NaN;
};
const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? NaN;
};

/**
 * BENCH_PIN=1 (the fronts' rows): Postfix, smtp-source and the sink on CPU 0; doorman, Redis and
 * rbldnsd on CPU 1 — doorman with a core of its own, as a filter host would give it, so that what
 * is left of Postfix's msg/s is the cost of the front's round trips, not of doorman's CPU taken
 * from Postfix.
 */
const PIN = process.env.BENCH_PIN === '1';
const MTA_CPU = '0';
const FILTER_CPU = '1';

/** A process and its descendants pinned to `cpu` (later children inherit it). */
function pinTree(pid: number, cpu: string): void {
  const all = [pid];
  for (let i = 0; i < all.length; i++) {
    for (const d of fs.readdirSync('/proc')) {
      if (!/^\d+$/.test(d)) continue;
      try {
        const ppid = Number(fs.readFileSync(`/proc/${d}/stat`, 'utf8').replace(/^.*\) /s, '').split(' ')[1]);
        if (ppid === all[i]) all.push(Number(d));
      } catch {
        // Gone meanwhile.
      }
    }
  }
  for (const p of all) {
    try {
      execFileSync('taskset', ['-a', '-p', '-c', cpu, String(p)], { stdio: 'ignore' });
    } catch {
      // Gone meanwhile.
    }
  }
}

/** Processes whose command line contains `needle` (a server started on a known port). */
function pidsWith(needle: string): number[] {
  const out: number[] = [];
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d) || Number(d) === process.pid) continue;
    try {
      if (fs.readFileSync(`/proc/${d}/cmdline`, 'utf8').split('\0').join(' ').includes(needle)) out.push(Number(d));
    } catch {
      // Gone meanwhile.
    }
  }
  return out;
}

async function smtpSource(port: number, args: string[], timeoutMs = 300_000): Promise<number> {
  const t0 = performance.now();
  const cmd = ['smtp-source', ...args, '-f', 'bench@load.example', '-t', 'user@example.com', `127.0.0.1:${port}`];
  if (PIN) cmd.unshift('taskset', '-c', MTA_CPU);
  await run(cmd[0]!, cmd.slice(1), { timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024 });
  return (performance.now() - t0) / 1000;
}

interface Measured {
  msgPerSec: number;
  cpuMsPerMsg: number;
  peakRssMb: number;
}

/** One smtp-source run against `port`, with `pid`'s CPU and RSS sampled when it is doorman. */
async function measure(port: number, pid: number | null, args: string[], messages: number): Promise<Measured> {
  const before = pid ? procStat(pid) : null;
  let peak = before?.rssKb ?? 0;
  const sampler = pid ? setInterval(() => (peak = Math.max(peak, procStat(pid).rssKb)), 100) : null;
  const secs = await smtpSource(port, args);
  if (sampler) clearInterval(sampler);
  const after = pid ? procStat(pid) : null;
  return {
    msgPerSec: messages / secs,
    cpuMsPerMsg: before && after ? (after.cpuMs - before.cpuMs) / messages : NaN,
    peakRssMb: Math.max(peak, after?.rssKb ?? 0) / 1024,
  };
}

/** Where a run goes: a port, and the process whose CPU and RSS are sampled (null: none). */
interface Peer {
  port: number;
  pid: number | null;
}

/** `first` and `second` measured in turn, REPS times each: their measurements in run order. */
async function alternate(first: Peer, second: Peer, args: string[], messages: number): Promise<[Measured[], Measured[]]> {
  const a: Measured[] = [];
  const b: Measured[] = [];
  for (let i = 0; i < REPS; i++) {
    a.push(await measure(first.port, first.pid, args, messages));
    b.push(await measure(second.port, second.pid, args, messages));
  }
  return [a, b];
}

interface Row {
  workload: string;
  config: string;
  direct: number;
  doorman: number;
  ratio: number;
  unit: string;
  cpuMsPerMsg?: number;
  peakRssMb?: number;
  note?: string;
}

/** A proxy under test: doorman, or Haraka as a peer. */
interface Target {
  port: number;
  proc: { pid: number };
}

async function throughput(name: string, cfg: string, d: Target, sinkPort: number, args: string[], messages: number): Promise<Row> {
  const [direct, through] = await alternate({ port: sinkPort, pid: null }, { port: d.port, pid: d.proc.pid }, args, messages);
  const dm = median(through.map((m) => m.msgPerSec));
  const dr = median(direct.map((m) => m.msgPerSec));
  return {
    workload: name, config: cfg, direct: dr, doorman: dm, ratio: dm / dr, unit: 'msg/s',
    cpuMsPerMsg: median(through.map((m) => m.cpuMsPerMsg)), peakRssMb: Math.max(...through.map((m) => m.peakRssMb)),
  };
}

async function bigMessages(cfg: string, d: Doorman, sinkPort: number): Promise<Row> {
  const size = 20 * 1024 * 1024;
  const args = ['-l', String(size), '-m', '3', '-s', '1'];
  const direct: number[] = [];
  const through: Measured[] = [];
  for (let i = 0; i < REPS; i++) {
    direct.push((await measure(sinkPort, null, args, 3)).msgPerSec * 20);
    const m = await measure(d.port, d.proc.pid, args, 3);
    through.push({ ...m, msgPerSec: m.msgPerSec * 20 });
  }
  const dm = median(through.map((m) => m.msgPerSec));
  const dr = median(direct);
  return { workload: '(c) 20 MB messages', config: cfg, direct: dr, doorman: dm, ratio: dm / dr, unit: 'MB/s', peakRssMb: Math.max(...through.map((m) => m.peakRssMb)) };
}

async function idle(cfg: string, d: Doorman): Promise<Row> {
  const base = procStat(d.proc.pid).rssKb;
  const sockets: net.Socket[] = [];
  let greeted = 0;
  for (let i = 0; i < IDLE; i++) {
    const s = net.connect(d.port, '127.0.0.1');
    s.on('error', () => undefined);
    s.once('data', () => greeted++);
    sockets.push(s);
    if (i % 500 === 499) await sleep(50);
  }
  for (let i = 0; i < 200 && greeted < IDLE; i++) await sleep(100);
  await sleep(500);
  const rss = procStat(d.proc.pid).rssKb;
  for (const s of sockets) s.destroy();
  const perConn = (rss - base) / Math.max(1, greeted);
  await sleep(1000);
  return { workload: '(d) idle connections', config: cfg, direct: NaN, doorman: perConn, ratio: NaN, unit: 'KB RSS/conn', note: `${greeted} of ${IDLE} greeted` };
}

/**
 * (e) Added latency per command round trip at half of the saturating load. The load is
 * smtp-source with many messages per session; "half" is the number of sessions whose throughput
 * through doorman is closest to half of what 20 sessions reach (workload (b)), found by trying
 * 1, 2, … (session counts are whole numbers; the load reached is reported).
 * The same background load runs on the direct path for the comparison.
 */
async function latency(cfg: string, d: Doorman, sinkPort: number, saturating: number | null): Promise<Row> {
  // MAIL and RCPT round trips together, and RCPT's alone: doorman answers MAIL itself in an ESMTP
  // session (backend.deferMail) and sends it with the RCPT, so RCPT carries the backend's latency.
  const rtt = async (port: number) => {
    const times: number[] = [];
    const rcpts: number[] = [];
    let c = await SmtpClient.connect(port);
    await c.reply();
    await c.ehlo('lat.example.org');
    for (let i = 0; i < LATENCY_ROUNDS; i++) {
      if (i > 0 && i % 50 === 0) {
        // A new session every 50 rounds: RSETs without a delivered message are junk commands
        // (limits.maxJunkCommands, 100 by default, as Postfix's smtpd_junk_command_limit).
        await c.cmd('QUIT');
        c.close();
        c = await SmtpClient.connect(port);
        await c.reply();
        await c.ehlo('lat.example.org');
      }
      let t = performance.now();
      await c.cmd('MAIL FROM:<lat@load.example>');
      times.push(performance.now() - t);
      t = performance.now();
      await c.cmd('RCPT TO:<user@example.com>');
      times.push(performance.now() - t);
      rcpts.push(performance.now() - t);
      await c.cmd('RSET');
    }
    c.close();
    return { times, rcpts };
  };
  const bgArgs = (sessions: number, messages: number) => ['-l', '4096', '-m', String(messages), '-s', String(sessions), '-d'];
  const full = saturating ?? (await measure(d.port, null, bgArgs(20, MSGS), MSGS)).msgPerSec;
  // The session count whose throughput is closest to half: the first to reach it, or the one before.
  let sessions = 1;
  let rate = 0;
  let below: { sessions: number; rate: number } | null = null;
  for (; sessions < 20; sessions++) {
    rate = (await measure(d.port, null, bgArgs(sessions, MSGS / 2), MSGS / 2)).msgPerSec;
    if (rate >= full / 2) break;
    below = { sessions, rate };
  }
  if (below && full / 2 - below.rate < rate - full / 2) ({ sessions, rate } = below);
  // Long enough to outlast the measured round trips; bounded by its message count.
  const bg = (port: number) => smtpSource(port, bgArgs(sessions, MSGS * 3)).catch(() => 0);
  const directBg = bg(sinkPort);
  await sleep(200);
  const direct = await rtt(sinkPort);
  await directBg;
  const doormanBg = bg(d.port);
  await sleep(200);
  const through = await rtt(d.port);
  await doormanBg;
  const p50 = pct(through.times, 50) - pct(direct.times, 50);
  const p99 = pct(through.times, 99) - pct(direct.times, 99);
  const rcptP50 = pct(through.rcpts, 50) - pct(direct.rcpts, 50);
  const rcptP99 = pct(through.rcpts, 99) - pct(direct.rcpts, 99);
  return {
    workload: '(e) added latency per command',
    config: cfg,
    direct: pct(direct.times, 50),
    doorman: pct(through.times, 50),
    ratio: NaN,
    unit: 'ms',
    note: `added p50 ${p50.toFixed(2)} ms, p99 ${p99.toFixed(2)} ms (RCPT alone: p50 ${rcptP50.toFixed(2)}, p99 ${rcptP99.toFixed(2)} ms); load ${sessions} sessions, ${Math.round(rate)} msg/s = ${Math.round((100 * rate) / full)} % of ${Math.round(full)}`,
  };
}

/**
 * Notes on the shipped-defaults rows: their throughput as a multiple of the tuned default rules',
 * and what the shipped limits and rules refused over the runs (a default must not refuse this load).
 */
async function noteRefusals(rows: Row[], d: Doorman, dnsDelay: number): Promise<void> {
  const refused = await d.metric('doorman_connections_refused_total');
  const rejected = await d.metric('doorman_rejections_total');
  const dry = await d.metric('doorman_rule_evaluations_total', { outcome: 'dry_run' });
  for (const r of rows.filter((x) => x.config === SHIPPED)) {
    const tuned = rows.find((x) => x.workload === r.workload && x.config === 'default rules');
    const vs = tuned ? `${(r.doorman / tuned.doorman).toFixed(2)}× the tuned default rules; ` : '';
    r.note = `${vs}resolver ${dnsDelay} ms late; over all its runs: ${refused} connections refused, ${rejected} rule refusals, ${dry} dry-run findings`;
  }
}

/**
 * Redis commands per message for each Redis-backed row, by command; and for each config with both
 * (a) and (b), the per-session and per-message parts solved from the two rows
 * (calls = perSession × sessions + perMessage × messages). Empty without Redis rows.
 */
function redisTable(use: readonly RedisUse[]): string {
  if (!use.length) return '';
  const f = (n: number) => (Number.isFinite(n) ? n.toFixed(2) : '—');
  const lines = ['| workload | doorman config | sessions | messages | Redis commands per message, by command |', '|---|---|---|---|---|'];
  for (const u of use) {
    const per = Object.entries(u.calls).map(([c, n]) => `${c} ${f(n / Math.max(1, u.messages))}`).join(', ');
    lines.push(`| ${u.workload} | ${u.config} | ${u.sessions} | ${u.messages} | ${per} |`);
  }
  const solved: string[] = [];
  for (const cfg of new Set(use.map((u) => u.config))) {
    const a = use.find((u) => u.config === cfg && u.workload.startsWith('(a)'));
    const b = use.find((u) => u.config === cfg && u.workload.startsWith('(b)'));
    if (!a || !b) continue;
    const det = a.sessions * b.messages - b.sessions * a.messages;
    if (det === 0) continue;
    const parts = [...new Set([...Object.keys(a.calls), ...Object.keys(b.calls)])].map((c) => {
      const ca = a.calls[c] ?? 0;
      const cb = b.calls[c] ?? 0;
      return `${c}: ${f((ca * b.messages - cb * a.messages) / det)} per session + ${f((a.sessions * cb - b.sessions * ca) / det)} per message`;
    });
    solved.push(`- ${cfg}: ${parts.join('; ')}`);
  }
  return `${lines.join('\n')}\n\n${solved.length ? `${solved.join('\n')}\n\n` : ''}`;
}

/** Notes on doorman's (a) and (b) rows: its throughput as a multiple of a peer's in the same run. */
function compareWith(rows: Row[], peerConfig: string, label: string, digits: number): void {
  for (const w of ['(a) one message per connection', '(b) many messages per session']) {
    const peer = rows.find((r) => r.workload === w && r.config === peerConfig);
    if (!peer) continue;
    for (const r of rows.filter((x) => x.workload === w && (x.config === 'no rules' || x.config === 'default rules'))) {
      r.note = `${r.note ? `${r.note}; ` : ''}${(r.doorman / peer.doorman).toFixed(digits)}× ${label}`;
    }
  }
}

/** Postfix's deliveries (`status=sent`) and refusals (its own or a front's) in its log so far. */
function postfixCounts(pf: Postfix): { sent: number; refused: number } {
  const log = pf.log();
  return { sent: log.match(/ status=sent /g)?.length ?? 0, refused: log.match(/: (?:milter-)?reject: /g)?.length ?? 0 };
}

/** Messages in Postfix's queue (incoming, active, deferred): none once it has delivered all. */
function postfixQueued(pf: Postfix): number {
  let n = 0;
  for (const q of ['incoming', 'active', 'deferred', 'hold']) {
    const walk = (d: string): void => {
      if (!fs.existsSync(d)) return;
      for (const e of fs.readdirSync(d, { withFileTypes: true })) {
        if (e.isDirectory()) walk(path.join(d, e.name));
        else n++;
      }
    };
    walk(path.join(pf.dir, 'queue', q));
  }
  return n;
}

/**
 * The cost rows (BENCH_COST=1): doorman with `env` (the shipped rules and settings, `n` workers)
 * against a raw pipe of `n` processes in front of the same sink, the two alternating per
 * repetition; the rows' direct column is the pipe, the ratio doorman's share of it; the note
 * carries the pipe's CPU per message, both peak RSS per process, and the CPU ratio.
 */
async function costRows(sinkPort: number, rules: Record<string, string>, env: Record<string, string>, n: number, workloads: { name: string; args: string[]; messages: number }[]): Promise<Row[]> {
  const cfg = `shipped rules, ${n} worker${n > 1 ? 's' : ''} / pipe, ${n} process${n > 1 ? 'es' : ''}`;
  const d = await startDoorman({ backendPort: sinkPort, rules, env });
  const pipe = spawnProc('pipe', process.execPath, ['--import', 'tsx', path.join(ROOT, 'bench', 'pipe.ts'), String(sinkPort), String(n)], { cwd: ROOT });
  const rows: Row[] = [];
  try {
    const pipePort = Number((await pipe.waitFor(/port (\d+)/))[1]);
    const procs = n > 1 ? n + 1 : 1; // cluster mode: a primary and n workers
    for (const port of [pipePort, d.port]) await smtpSource(port, ['-l', '4096', '-m', String(Math.min(1000, MSGS)), '-s', '20', '-d']);
    for (const w of workloads) {
      process.stdout.write(`${cfg}: ${w.name}…\n`);
      const [piped, through] = await alternate({ port: pipePort, pid: pipe.pid }, { port: d.port, pid: d.proc.pid }, w.args, w.messages);
      const pm = median(piped.map((m) => m.msgPerSec));
      const dm = median(through.map((m) => m.msgPerSec));
      const pCpu = median(piped.map((m) => m.cpuMsPerMsg));
      const dCpu = median(through.map((m) => m.cpuMsPerMsg));
      const dRss = Math.max(...through.map((m) => m.peakRssMb));
      const pRss = Math.max(...piped.map((m) => m.peakRssMb));
      rows.push({
        workload: w.name, config: cfg, direct: pm, doorman: dm, ratio: dm / pm, unit: 'msg/s', cpuMsPerMsg: dCpu, peakRssMb: dRss,
        note: `pipe ${pCpu.toFixed(3)} ms CPU/msg, CPU ×${(dCpu / pCpu).toFixed(2)}; RSS per process: doorman ${(dRss / procs).toFixed(0)} MB, pipe ${(pRss / procs).toFixed(0)} MB`,
      });
    }
    if (n === 1) {
      const b = rows.find((r) => r.workload.startsWith('(b)'));
      process.stdout.write(`${cfg}: (e) latency…\n`);
      const e = await latency(`shipped rules, 1 worker`, d, sinkPort, b ? b.doorman : null);
      rows.push(e);
    }
  } finally {
    await pipe.stop();
    await d.stop();
  }
  return rows;
}

/**
 * BENCH_RECORD=1 (issue 18): (a) and (b) through two doormans with the same rules, one recording
 * every session (record.dir in a temporary folder) and one not, alternating per repetition. The
 * row's direct column is recording off, doorman is recording on, the ratio on/off; the note gives
 * the records written and dropped, and their mean size.
 */
async function recordRows(sinkPort: number, rules: Record<string, string>, env: Record<string, string>, config: string, workloads: { name: string; args: string[]; messages: number }[]): Promise<Row[]> {
  const dir = fs.mkdtempSync(path.join((await import('node:os')).tmpdir(), 'doorman-bench-records-'));
  const off = await startDoorman({ backendPort: sinkPort, rules, env, config });
  const on = await startDoorman({ backendPort: sinkPort, rules, env, config: `${config}record:\n  dir: ${dir}\n` });
  const rows: Row[] = [];
  try {
    for (const d of [off, on]) await smtpSource(d.port, ['-l', '4096', '-m', String(Math.min(1000, MSGS)), '-s', '20', '-d']);
    for (const w of workloads) {
      process.stdout.write(`recording: ${w.name}…\n`);
      const [a, b] = await alternate({ port: off.port, pid: off.proc.pid }, { port: on.port, pid: on.proc.pid }, w.args, w.messages);
      const offRate = median(a.map((m) => m.msgPerSec));
      const onRate = median(b.map((m) => m.msgPerSec));
      rows.push({
        workload: w.name, config: 'default rules + recording', direct: offRate, doorman: onRate, ratio: onRate / offRate, unit: 'msg/s',
        cpuMsPerMsg: median(b.map((m) => m.cpuMsPerMsg)), peakRssMb: Math.max(...b.map((m) => m.peakRssMb)),
        note: `direct = the same rules, recording off (CPU ${median(a.map((m) => m.cpuMsPerMsg)).toFixed(3)} ms/msg); costs ${(100 * (1 - onRate / offRate)).toFixed(1)} % of its msg/s`,
      });
    }
    const written = await on.metric('doorman_records_written_total');
    const dropped = await on.metric('doorman_records_dropped_total');
    const bytes = fs.readdirSync(dir).reduce((n, f) => n + fs.statSync(path.join(dir, f)).size, 0);
    for (const r of rows) r.note = `${r.note}; over all runs ${written} records written (${Math.round(bytes / Math.max(1, written))} bytes each), ${dropped} dropped`;
  } finally {
    await off.stop();
    await on.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return rows;
}

/** The fronts' Postfix set-up: `main` lines with their doorman listener, or none (Postfix alone). */
interface FrontSetup {
  name: string;
  listen: string | null;
  main: (port: number) => string[];
}

/**
 * BENCH_FRONTS=1 (issue 17): (a) and (b) against a real Postfix smtpd relaying to the bench's
 * smtp-sink — Postfix alone, Postfix + doorman milter, Postfix + doorman policy server — the three
 * alternating per repetition. msg/s is smtp-source's (Postfix's acceptance); after each run the
 * queue must drain to the sink (every message `status=sent` in Postfix's log, no refusal) before
 * the next starts, so no run pays for the previous one's deliveries. Postfix is tuned not to be
 * the bottleneck by accident: 100 processes (20 sessions), no chroot, logging to a file,
 * in_flow_delay 0 (no pause per message when arrivals outrun deliveries), no reverse lookup of
 * the client.
 */
async function frontRows(sinkPort: number, rules: Record<string, string>, env: Record<string, string>, workloads: { name: string; args: string[]; messages: number }[]): Promise<Row[]> {
  const tuning = ['default_process_limit = 100', 'in_flow_delay = 0s', 'smtpd_peername_lookup = no', 'smtpd_client_connection_count_limit = 0', 'default_destination_concurrency_limit = 20'];
  const setups: FrontSetup[] = [
    { name: 'Postfix alone', listen: null, main: () => [] },
    { name: 'Postfix + doorman milter', listen: 'milter://127.0.0.1:{PORT}', main: (p) => [`smtpd_milters = inet:127.0.0.1:${p}`, 'milter_default_action = accept', 'milter_command_timeout = 10s'] },
    {
      name: 'Postfix + doorman policy',
      listen: 'policy://127.0.0.1:{PORT}',
      main: (p) => [`smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:${p}, permit_mynetworks, reject_unauth_destination`, 'smtpd_policy_service_default_action = DUNNO', 'smtpd_policy_service_try_limit = 1'],
    },
  ];
  const running: { setup: FrontSetup; pf: Postfix; d: Doorman | null }[] = [];
  if (PIN) {
    for (const p of pidsWith(`127.0.0.1:${sinkPort}`)) pinTree(p, MTA_CPU);
    for (const needle of [env.DOORMAN_REDIS_URL ? `--port ${new URL(env.DOORMAN_REDIS_URL).port}` : '', env.DOORMAN_DNS_SERVERS ? env.DOORMAN_DNS_SERVERS.replace(':', '/') : '']) {
      if (!needle) continue;
      for (const p of pidsWith(needle)) pinTree(p, FILTER_CPU);
    }
  }
  const rows: Row[] = [];
  try {
    for (const setup of setups) {
      const d = setup.listen ? await startDoorman({ backendPort: sinkPort, listen: setup.listen, rules, env }) : null;
      const pf = await startPostfix({ relayPort: sinkPort, openRelay: true, main: [...tuning, ...(d ? setup.main(d.port) : [])] });
      if (PIN) {
        pinTree(pf.pid, MTA_CPU);
        if (d) pinTree(d.proc.pid, FILTER_CPU);
      }
      running.push({ setup, pf, d });
    }
    /** One smtp-source run, then the queue drained to the sink (bounded), delivered and refused counted. */
    const once = async (r: (typeof running)[number], args: string[], messages: number) => {
      const before = postfixCounts(r.pf);
      const m = await measure(r.pf.port, r.d?.proc.pid ?? null, args, messages);
      for (let i = 0; i < 1200 && (postfixQueued(r.pf) > 0 || postfixCounts(r.pf).sent - before.sent < messages); i++) await sleep(100);
      const after = postfixCounts(r.pf);
      return { ...m, sent: after.sent - before.sent, refused: after.refused - before.refused };
    };
    // Warm-up of each (doorman's JIT, Postfix's processes), not measured; drained like the runs.
    for (const r of running) await once(r, ['-l', '4096', '-m', '200', '-s', '20', '-d'], 200);
    for (const w of workloads) {
      process.stdout.write(`fronts: ${w.name}…\n`);
      const runs = running.map(() => [] as Awaited<ReturnType<typeof once>>[]);
      for (let i = 0; i < REPS; i++) for (const [k, r] of running.entries()) runs[k]!.push(await once(r, w.args, w.messages));
      const alone = median(runs[0]!.map((m) => m.msgPerSec));
      for (const [k, r] of running.entries()) {
        const sent = runs[k]!.reduce((n, m) => n + m.sent, 0);
        if (sent !== w.messages * REPS) process.stdout.write(`fronts: ${r.setup.name}: ${sent} of ${w.messages * REPS} delivered\n${r.pf.log().slice(-3000)}\n`);
      }
      const delivered = (k: number) => `delivered ${runs[k]!.reduce((n, m) => n + m.sent, 0)} of ${w.messages * REPS}, ${runs[k]!.reduce((n, m) => n + m.refused, 0)} refused`;
      rows.push({ workload: w.name, config: 'Postfix alone', direct: alone, doorman: NaN, ratio: NaN, unit: 'msg/s', note: `the direct column of the two rows below; ${delivered(0)}` });
      for (let k = 1; k < running.length; k++) {
        const through = median(runs[k]!.map((m) => m.msgPerSec));
        rows.push({
          workload: w.name, config: running[k]!.setup.name, direct: alone, doorman: through, ratio: through / alone, unit: 'msg/s',
          cpuMsPerMsg: median(runs[k]!.map((m) => m.cpuMsPerMsg)), peakRssMb: Math.max(...runs[k]!.map((m) => m.peakRssMb)),
          note: `direct = Postfix alone; costs ${(100 * (1 - through / alone)).toFixed(1)} % of Postfix's msg/s; ${delivered(k)}`,
        });
      }
    }
  } finally {
    for (const r of running) {
      await r.d?.stop();
      await r.pf.stop();
    }
  }
  return rows;
}

async function main(): Promise<void> {
  const sinkPort = await freePort();
  const sink: Proc = spawnProc('smtp-sink', 'smtp-sink', ['-u', 'nobody', '-c', `127.0.0.1:${sinkPort}`, '1024']);
  await sleep(300);
  const rbl = await startRbldnsd([{ name: 'bl.test', type: 'ip4set', lines: [':127.0.0.2:listed', '127.0.0.2'] }]);
  const redis = await startRedis();
  // Production-like: info-level logs (one JSON line per session) are part of the cost.
  // As shipped (Dockerfile, scripts/install.sh): a 32 MB young generation. BENCH_NODE_OPTIONS
  // overrides it ("" for Node's defaults).
  const quiet = { DOORMAN_LOG_LEVEL: 'info', NODE_OPTIONS: process.env.BENCH_NODE_OPTIONS ?? '--max-semi-space-size=32' };
  const defaultRules = {
    'relay.yaml': 'rule: relay\nsettings:\n  localDomains: [example.com]\n',
    'sender.yaml': 'rule: sender\nsettings:\n  localDomains: [example.com]\n',
    'dnsbl.yaml': 'rule: dnsbl\nsettings:\n  zones:\n    - zone: bl.test\n',
    'ratelimit.yaml': 'rule: ratelimit\nsettings:\n  limits:\n    - name: conn\n      count: connections\n      limit: 10000000\n      window: 60000\n    - name: rcpt\n      count: messages\n      cost: recipient\n      limit: 10000000\n      window: 60000\n',
  };
  const config = `limits:\n  maxClients: ${IDLE + 1000}\n  maxClientsPerIp: ${IDLE + 1000}\n  maxEventLoopLag: 0\n`;
  const rows: Row[] = [];
  // Cluster mode as shipped: one worker per core (BENCH_WORKERS to compare with 1).
  const workers = process.env.BENCH_WORKERS ?? String((await import('node:os')).availableParallelism());
  const configs: { name: string; rules: Record<string, string>; env: Record<string, string>; config?: string; workloads: string[] }[] = [
    { name: 'no rules', rules: {}, env: { ...quiet, DOORMAN_WORKERS: workers }, config, workloads: ['a', 'b', 'c', 'e'] },
    { name: 'default rules', rules: defaultRules, env: { ...quiet, DOORMAN_WORKERS: workers, DOORMAN_DNS_SERVERS: rbl.server, DOORMAN_REDIS_URL: redis.url }, config, workloads: ['a', 'b', 'c', 'e'] },
  ];
  // The default rules and dmarc (DKIM/DMARC on every message: each is held until its verdict, then
  // sent; 20 MB messages spool to disk). The load comes from 127.0.0.1: no relay networks here, or
  // dmarc would skip it as our own outgoing mail.
  if (process.env.BENCH_DMARC !== '0') {
    const dmarcRules = { ...defaultRules, 'site.yaml': 'relayNetworks: []\n', 'dmarc.yaml': 'rule: dmarc\ntimeout: 15000\n' };
    configs.push({ name: DMARC_RULES, rules: dmarcRules, env: { ...quiet, DOORMAN_WORKERS: workers, DOORMAN_DNS_SERVERS: rbl.server, DOORMAN_REDIS_URL: redis.url }, config, workloads: ['a', 'b', 'c'] });
  }
  // As scripts/install.sh starts it: shipped rule files and limits (no configuration file), its
  // NODE_OPTIONS, the default worker count; only the resolver is a local one (slow on purpose).
  const dnsmasq = process.env.BENCH_SHIPPED === '0' || !(only('a') || only('b')) ? null : await startDnsmasq({});
  const slowDns = dnsmasq && DNS_DELAY > 0 ? await startSlowDns(dnsmasq.server, DNS_DELAY) : null;
  if (dnsmasq) {
    const shipped = shippedRules();
    const env = { ...SHIPPED_ENV, DOORMAN_DNS_SERVERS: slowDns?.server ?? dnsmasq.server };
    configs.push({ name: SHIPPED, rules: shipped, env, workloads: ['a', 'b'] });
    if (process.env.BENCH_REDIS === '1') configs.push({ name: SHIPPED_REDIS, rules: shipped, env: { ...env, DOORMAN_REDIS_URL: redis.url }, workloads: ['a', 'b'] });
  }
  const redisUse: RedisUse[] = [];
  const redisPort = Number(new URL(redis.url).port);
  for (const { name, rules, env, config: cfgText, workloads } of configs) {
    if (!workloads.some(only)) continue;
    const d = await startDoorman({ backendPort: sinkPort, rules, env, ...(cfgText !== undefined ? { config: cfgText } : {}) });
    const doing = (w: string) => only(w) && workloads.includes(w);
    // Rows on Redis: the commands Redis ran meanwhile, against doorman's sessions and messages.
    const counted = async (measureRow: () => Promise<Row>): Promise<Row> => {
      if (!env.DOORMAN_REDIS_URL) return measureRow();
      const counts = async () => ({ stats: await commandStats(redisPort), sessions: await d.metric('doorman_connections_total'), messages: await d.metric('doorman_messages_total', { outcome: 'accepted' }) });
      const before = await counts();
      const row = await measureRow();
      const after = await counts();
      const calls: Record<string, number> = {};
      for (const [cmd, n] of after.stats) if (n - (before.stats.get(cmd) ?? 0) > 0) calls[cmd] = n - (before.stats.get(cmd) ?? 0);
      redisUse.push({ workload: row.workload, config: name, sessions: after.sessions - before.sessions, messages: after.messages - before.messages, calls });
      return row;
    };
    try {
      // Warm-up (JIT, pooled backend connections, DNS cache), not measured.
      await smtpSource(d.port, ['-l', '4096', '-m', String(Math.min(1000, MSGS)), '-s', '20', '-d']);
      if (doing('a')) {
        process.stdout.write(`${name}: (a) one message per connection…\n`);
        rows.push(await counted(() => throughput('(a) one message per connection', name, d, sinkPort, ['-l', '4096', '-m', String(MSGS), '-s', '20'], MSGS)));
      }
      if (doing('b')) {
        process.stdout.write(`${name}: (b) many messages per session…\n`);
        rows.push(await counted(() => throughput('(b) many messages per session', name, d, sinkPort, ['-l', '4096', '-m', String(MSGS * 2), '-s', '20', '-d'], MSGS * 2)));
      }
      if (doing('c')) {
        process.stdout.write(`${name}: (c) 20 MB messages…\n`);
        rows.push(await bigMessages(name, d, sinkPort));
      }
      if (doing('e')) {
        process.stdout.write(`${name}: (e) latency…\n`);
        const b = rows.find((r) => r.config === name && r.workload.startsWith('(b)'));
        rows.push(await latency(name, d, sinkPort, b ? b.doorman : null));
      }
      if (name === SHIPPED) await noteRefusals(rows, d, DNS_DELAY);
    } finally {
      await d.stop();
    }
  }
  await slowDns?.stop();
  await dnsmasq?.stop();
  // The fronts (issue 17): BENCH_FRONTS=1 with (a)/(b), or BENCH_ONLY=fronts for these rows alone.
  if (process.env.BENCH_FRONTS === '1' || only('fronts')) {
    const env = { ...quiet, DOORMAN_WORKERS: workers, DOORMAN_DNS_SERVERS: rbl.server, DOORMAN_REDIS_URL: redis.url };
    const fw = [
      ...(only('a') || only('fronts') ? [{ name: '(a) one message per connection', args: ['-l', '4096', '-m', String(MSGS), '-s', '20'], messages: MSGS }] : []),
      ...(only('b') || only('fronts') ? [{ name: '(b) many messages per session', args: ['-l', '4096', '-m', String(MSGS * 2), '-s', '20', '-d'], messages: MSGS * 2 }] : []),
    ];
    rows.push(...(await frontRows(sinkPort, defaultRules, env, fw)));
  }
  // Session records (issue 18): BENCH_RECORD=1 with (a)/(b), or BENCH_ONLY=record for these rows alone.
  if (process.env.BENCH_RECORD === '1' || only('record')) {
    const env = { ...quiet, DOORMAN_WORKERS: workers, DOORMAN_DNS_SERVERS: rbl.server, DOORMAN_REDIS_URL: redis.url };
    const rw = [
      ...(only('a') || only('record') ? [{ name: '(a) one message per connection', args: ['-l', '4096', '-m', String(MSGS), '-s', '20'], messages: MSGS }] : []),
      ...(only('b') || only('record') ? [{ name: '(b) many messages per session', args: ['-l', '4096', '-m', String(MSGS * 2), '-s', '20', '-d'], messages: MSGS * 2 }] : []),
    ];
    rows.push(...(await recordRows(sinkPort, defaultRules, env, config, rw)));
  }
  if (process.env.BENCH_HARAKA === '1' && (only('a') || only('b'))) {
    // Haraka as a peer, same sink, same Redis, same load, alternating with the direct path.
    const hm = Number(process.env.BENCH_HARAKA_MESSAGES ?? 1000);
    const cfg = 'Haraka 3.3.4 (dns-list, limit, smtp_forward; 2 processes)';
    const h = await startHaraka({ root: ROOT, sinkPort, redisPort: Number(new URL(redis.url).port), zone: 'bl.test', nodes: Number(workers) });
    try {
      await smtpSource(h.port, ['-l', '4096', '-m', String(Math.min(200, MSGS)), '-s', '20', '-d']);
      if (only('a')) {
        process.stdout.write(`haraka: (a) one message per connection…\n`);
        rows.push(await throughput('(a) one message per connection', cfg, h, sinkPort, ['-l', '4096', '-m', String(hm), '-s', '20'], hm));
      }
      if (only('b')) {
        process.stdout.write(`haraka: (b) many messages per session…\n`);
        rows.push(await throughput('(b) many messages per session', cfg, h, sinkPort, ['-l', '4096', '-m', String(hm * 2), '-s', '20', '-d'], hm * 2));
      }
    } finally {
      await h.stop();
    }
    compareWith(rows, cfg, 'Haraka', 1);
  }
  // Cost per message (issue 19): like with like against the raw pipe.
  if (process.env.BENCH_COST === '1' || only('cost')) {
    // Answers with a 5-minute TTL, as real records have (dnsmasq's own default is 0). The load's
    // client is 127.0.0.1, whose PTR names Node's resolver reads from /etc/hosts: their A records
    // are served too, so fcrdns confirms the client as it would a real one.
    const dns = await startDnsmasq({ ttl: 300, a: loopbackNames().map((n): [string, string] => [n, '127.0.0.1']) });
    try {
      const shipped = shippedRules();
      const cw = [
        { name: '(a) one message per connection', args: ['-l', '4096', '-m', String(MSGS), '-s', '20'], messages: MSGS },
        { name: '(b) many messages per session', args: ['-l', '4096', '-m', String(MSGS * 2), '-s', '20', '-d'], messages: MSGS * 2 },
      ];
      for (const n of [...new Set([1, Number(workers)])]) {
        rows.push(...(await costRows(sinkPort, shipped, { ...SHIPPED_ENV, DOORMAN_WORKERS: String(n), DOORMAN_DNS_SERVERS: dns.server }, n, cw)));
      }
    } finally {
      await dns.stop();
    }
  }
  if (process.env.BENCH_PIPE === '1' && (only('a') || only('b'))) {
    // Calibration: a raw Node byte pipe (no SMTP) in front of the same sink, same load.
    const cfg = 'raw Node pipe, 1 process (calibration)';
    const pipe = spawnProc('pipe', process.execPath, ['--import', 'tsx', path.join(ROOT, 'bench', 'pipe.ts'), String(sinkPort)], { cwd: ROOT });
    const port = Number((await pipe.waitFor(/port (\d+)/))[1]);
    try {
      await smtpSource(port, ['-l', '4096', '-m', String(Math.min(1000, MSGS)), '-s', '20', '-d']);
      const t = { port, proc: { pid: pipe.pid } };
      if (only('a')) rows.push(await throughput('(a) one message per connection', cfg, t, sinkPort, ['-l', '4096', '-m', String(MSGS), '-s', '20'], MSGS));
      if (only('b')) rows.push(await throughput('(b) many messages per session', cfg, t, sinkPort, ['-l', '4096', '-m', String(MSGS * 2), '-s', '20', '-d'], MSGS * 2));
    } finally {
      await pipe.stop();
    }
    compareWith(rows, cfg, 'the raw pipe', 2);
  }
  // (d) on a fresh instance, with a Node backend: smtp-sink's event loop stops near 1000 sessions.
  if (only('d')) {
    process.stdout.write(`no rules: (d) ${IDLE} idle connections…\n`);
    // The backend runs in a process of its own: this one holds the idle client sockets.
    const idleBackend = spawnProc('idle-backend', process.execPath, ['--import', 'tsx', path.join(ROOT, 'bench', 'idle-backend.ts')], { cwd: ROOT });
    const backendPort = Number((await idleBackend.waitFor(/port (\d+)/))[1]);
    const idleDoorman = await startDoorman({ backendPort, config, env: { ...quiet, DOORMAN_WORKERS: '1' } });
    try {
      rows.push(await idle('no rules', idleDoorman));
    } finally {
      await idleDoorman.stop();
      await idleBackend.stop();
    }
  }
  await redis.stop();
  await rbl.stop();
  await sink.stop();
  const fmt = (n: number, digits = 0) => (Number.isFinite(n) ? n.toFixed(digits) : '—');
  const md = [
    `| workload | doorman config | direct | doorman | ratio | unit | doorman CPU ms/msg | doorman peak RSS MB | note |`,
    `|---|---|---|---|---|---|---|---|---|`,
    ...rows.map((r) => `| ${r.workload} | ${r.config} | ${fmt(r.direct, r.unit === 'ms' ? 2 : 0)} | ${fmt(r.doorman, r.unit === 'ms' || r.unit.startsWith('KB') ? 2 : 0)} | ${fmt(r.ratio, 2)} | ${r.unit} | ${fmt(r.cpuMsPerMsg ?? NaN, 3)} | ${fmt(r.peakRssMb ?? NaN, 0)} | ${r.note ?? ''} |`),
  ].join('\n');
  const redisMd = redisTable(redisUse);
  const out = process.env.BENCH_OUT ?? path.join(ROOT, 'bench', 'results');
  fs.mkdirSync(out, { recursive: true });
  const meta = { date: new Date().toISOString(), node: process.version, reps: REPS, messages: MSGS, cpus: (await import('node:os')).cpus().length, workers };
  fs.writeFileSync(path.join(out, 'latest.json'), JSON.stringify({ ...meta, rows, redis: redisUse }, null, 2));
  fs.writeFileSync(path.join(out, 'latest.md'), `${md}\n\n${redisMd}${JSON.stringify(meta)}\n`);
  process.stdout.write(`\n${md}\n\n${redisMd}${path.join(out, 'latest.{json,md}')} written\n`);
}

main()
  .catch((e: unknown) => {
    process.stderr.write(`bench failed: ${e instanceof Error ? e.stack : String(e)}\n`);
    process.exitCode = 1;
  })
  .finally(() => void stopAll());
