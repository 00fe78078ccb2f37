/**
 * scanners.ts — the content scanners as real daemons on free loopback ports, each with a minimal
 * configuration of its own in a temporary folder, run in the foreground as the test's user (no
 * systemd, no network updates) and stopped by PID:
 *
 * - clamd (clamav-daemon) with a signature database the test writes: the EICAR test file as an
 *   .ndb signature, reported `Eicar-Test-Signature.UNOFFICIAL FOUND`;
 * - spamd (spamassassin) with Debian's shipped rules (/usr/share/spamassassin, the .pre files of
 *   /etc/spamassassin), local tests only (-L): GTUBE scores 1000;
 * - rspamd with its shipped configuration, only the normal worker, DNS pointed at nothing: GTUBE
 *   gets the action `reject` with the message "Gtube pattern".
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { freePort } from './net.js';
import { spawnProc, trackCloser, type Proc } from './procs.js';

export const EICAR = 'X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*';
export const GTUBE = 'XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X';
/** The name clamd gives the EICAR signature the test writes. */
export const EICAR_NAME = 'Eicar-Test-Signature.UNOFFICIAL';

export interface Daemon {
  readonly name: string;
  readonly port: number;
  readonly proc: Proc;
  /** SIGTERM (the daemon stops its own children), SIGKILL after a grace period; idempotent. */
  stop(): Promise<void>;
}

const isRoot = process.getuid?.() === 0;

/** One request/answer on a fresh connection: the answer, or '' when nothing answers in time. */
function ask(port: number, request: string | Buffer, timeout = 2000): Promise<string> {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    let got = '';
    const done = () => {
      clearTimeout(t);
      s.destroy();
      resolve(got);
    };
    const t = setTimeout(done, timeout);
    s.on('connect', () => s.write(request));
    s.on('data', (d) => (got += d.toString('latin1')));
    s.on('error', done);
    s.on('close', done);
  });
}

/** Polls `ready` until true (bounded by `timeout` ms); throws with the daemon's output otherwise. */
async function until(proc: Proc, ready: () => Promise<boolean>, timeout: number): Promise<void> {
  const end = Date.now() + timeout;
  while (Date.now() < end) {
    if (await ready()) return;
    if (proc.child.exitCode !== null || proc.child.signalCode !== null) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`${proc.name} not ready after ${timeout} ms: ${proc.output().slice(-3000)}`);
}

function daemon(name: string, port: number, proc: Proc, dir: string): Daemon {
  let stopped: Promise<void> | null = null;
  const stop = () =>
    (stopped ??= proc.stop('SIGTERM', 10_000).then(() => {
      fs.rmSync(dir, { recursive: true, force: true });
    }));
  // Before stopAll's SIGKILL of the main process, which would leave its children behind.
  trackCloser(stop);
  return { name, port, proc, stop };
}

export async function startClamd(): Promise<Daemon> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-clamd-'));
  const db = path.join(dir, 'db');
  fs.mkdirSync(db);
  fs.writeFileSync(path.join(db, 'test.ndb'), `Eicar-Test-Signature:0:*:${Buffer.from(EICAR).toString('hex')}\n`);
  const port = await freePort();
  const conf = path.join(dir, 'clamd.conf');
  fs.writeFileSync(
    conf,
    [
      'Foreground yes',
      `TCPSocket ${port}`,
      'TCPAddr 127.0.0.1',
      `DatabaseDirectory ${db}`,
      `PidFile ${path.join(dir, 'clamd.pid')}`,
      `LogFile ${path.join(dir, 'clamd.log')}`,
      // Larger than any message the tests send: doorman's maxSize decides what is scanned.
      'StreamMaxLength 64M',
      ...(isRoot ? ['User root'] : []),
      '',
    ].join('\n'),
  );
  const proc = spawnProc('clamd', 'clamd', ['-c', conf]);
  await until(proc, async () => (await ask(port, 'zPING\0')).startsWith('PONG'), 60_000);
  return daemon('clamd', port, proc, dir);
}

export async function startSpamd(): Promise<Daemon> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-spamd-'));
  const site = path.join(dir, 'site');
  fs.mkdirSync(site);
  // The plugin loads (.pre) of Debian's site configuration, without its local.cf.
  for (const f of fs.readdirSync('/etc/spamassassin')) if (f.endsWith('.pre')) fs.copyFileSync(path.join('/etc/spamassassin', f), path.join(site, f));
  fs.chmodSync(dir, 0o755);
  const port = await freePort();
  const args = [
    '--listen',
    `127.0.0.1:${port}`,
    '--allowed-ips',
    '127.0.0.1',
    '-L', // local tests only: no DNS, no network checks
    '-x', // no per-user configuration
    '--syslog',
    'stderr',
    '--siteconfigpath',
    site,
    '-C',
    '/usr/share/spamassassin',
    '--min-children',
    '1',
    '--max-children',
    '2',
    ...(isRoot ? ['-u', 'nobody'] : []),
  ];
  const proc = spawnProc('spamd', 'spamd', args);
  await until(proc, async () => /PONG/.test(await ask(port, 'PING SPAMC/1.5\r\n\r\n')), 90_000);
  return daemon('spamd', port, proc, dir);
}

export async function startRspamd(): Promise<Daemon> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-rspamd-'));
  for (const d of ['db', 'run', 'local']) fs.mkdirSync(path.join(dir, d));
  fs.writeFileSync(path.join(dir, 'tld.dat'), 'com\nnet\norg\nexample\ntest\n');
  const port = await freePort();
  const conf = path.join(dir, 'rspamd.conf');
  // Options of our own over the shipped ones (a higher priority, as rspamd.conf's override.d).
  fs.writeFileSync(
    path.join(dir, 'options.inc'),
    `# Nothing to ask: lookups fail at once instead of waiting for the network.
dns { nameserver = ["127.0.0.1:1"]; timeout = 0.2s; retransmits = 1; }
# No Hyperscan: compiling its databases takes longer than the tests (regexps run without it).
disable_hyperscan = true;
# A few suffixes instead of the Public Suffix List: compiling all of it takes half a minute.
url_tld = "${path.join(dir, 'tld.dat')}";
`,
  );
  fs.writeFileSync(
    conf,
    `.include "$CONFDIR/common.conf"
options {
  pidfile = "$RUNDIR/rspamd.pid";
  .include "$CONFDIR/options.inc"
  .include(priority=10) "${path.join(dir, 'options.inc')}"
}
logging { type = "console"; level = "error"; }
worker "normal" {
  bind_socket = "127.0.0.1:${port}";
  .include "$CONFDIR/worker-normal.inc"
  count = 1;
}
`,
  );
  const vars = ['CONFDIR=/etc/rspamd', `LOCAL_CONFDIR=${path.join(dir, 'local')}`, `DBDIR=${path.join(dir, 'db')}`, `RUNDIR=${path.join(dir, 'run')}`, `LOGDIR=${path.join(dir, 'run')}`];
  const user = os.userInfo().username;
  const group = isRoot ? 'root' : user;
  const args = ['-f', '-c', conf, ...vars.flatMap((v) => ['--var', v]), ...(isRoot ? ['-u', user, '-g', group] : [])];
  const proc = spawnProc('rspamd', 'rspamd', args);
  await until(proc, async () => /pong/.test(await ask(port, 'GET /ping HTTP/1.0\r\n\r\n')), 90_000);
  return daemon('rspamd', port, proc, dir);
}
