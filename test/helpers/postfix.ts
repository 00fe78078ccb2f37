/**
 * postfix.ts — a real Postfix instance (its own config directory, no chroot, a free port,
 * logging to a file) for tests where the backend's behaviour matters: XCLIENT, AUTH (Cyrus SASL
 * with a sasldb file), PROXY protocol, refusals. Accepted mail is relayed to `relayPort`
 * (an smtp-sink) so its content can be read.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freePort } from './net.js';
import { eventually, trackPid, untrackPid } from './procs.js';

export interface PostfixOptions {
  /** smtp-sink port that accepted mail is relayed to. */
  relayPort: number;
  /** Domains Postfix accepts mail for (relay_domains). */
  domains?: string[];
  /** Users for SASL AUTH (PLAIN, LOGIN) with their passwords. */
  sasl?: Record<string, string>;
  /** smtpd_upstream_proxy_protocol = haproxy. */
  proxyProtocol?: boolean;
  /** XCLIENT allowed from 127.0.0.1, doorman's address (default true); clients on other 127.0.0.x are not. */
  xclient?: boolean;
  /** Relay anything for anyone (to prove that doorman is what refuses). */
  openRelay?: boolean;
  /** Offer STARTTLS with this certificate (PEM files). */
  tls?: { cert: string; key: string };
  /** Extra main.cf lines. */
  main?: string[];
}

export interface Postfix {
  port: number;
  dir: string;
  pid: number;
  log(): string;
  stop(): Promise<void>;
}

const MASTER_CF = `
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
`;

export async function startPostfix(opts: PostfixOptions): Promise<Postfix> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-postfix-'));
  fs.chmodSync(dir, 0o755);
  const port = await freePort();
  fs.mkdirSync(path.join(dir, 'queue'));
  fs.mkdirSync(path.join(dir, 'data'));
  execFileSync('chown', ['postfix', path.join(dir, 'data')]);
  const main = [
    'compatibility_level = 3.6',
    `queue_directory = ${dir}/queue`,
    `data_directory = ${dir}/data`,
    'mail_owner = postfix',
    'setgid_group = postdrop',
    'inet_interfaces = 127.0.0.1',
    'inet_protocols = all',
    'myhostname = backend.test',
    'mydomain = backend.test',
    'mydestination =',
    `relay_domains = ${(opts.domains ?? ['example.com']).join(', ')}`,
    `relayhost = [127.0.0.1]:${opts.relayPort}`,
    'mynetworks = 127.0.0.0/8',
    `maillog_file = ${dir}/maillog`,
    `maillog_file_prefixes = ${dir}`,
    'alias_maps =',
    'alias_database =',
    'biff = no',
    // Postfix refuses a literal open relay; every test client is in mynetworks (XCLIENT 127.0.0.x).
    opts.openRelay ? 'smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination' : 'smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination',
    'smtpd_recipient_restrictions = check_recipient_access inline:{ rejected@example.com=REJECT }',
    // doorman's own address only, as in production: Postfix judges a second XCLIENT on a connection
    // by the client the first one named (127.0.0.x test clients would otherwise pass).
    `smtpd_authorized_xclient_hosts = ${opts.xclient === false ? '' : '127.0.0.1'}`,
    ...(opts.proxyProtocol ? ['smtpd_upstream_proxy_protocol = haproxy'] : []),
    ...(opts.tls ? [`smtpd_tls_cert_file = ${opts.tls.cert}`, `smtpd_tls_key_file = ${opts.tls.key}`, 'smtpd_tls_security_level = may', 'smtpd_tls_loglevel = 1'] : []),
    ...(opts.main ?? []),
  ];
  if (opts.sasl) {
    const saslDir = path.join(dir, 'sasl');
    fs.mkdirSync(saslDir);
    const db = path.join(saslDir, 'sasldb2');
    for (const [user, pass] of Object.entries(opts.sasl)) {
      execFileSync('saslpasswd2', ['-c', '-p', '-f', db, '-u', 'backend.test', user], { input: pass });
    }
    fs.chmodSync(db, 0o644);
    fs.writeFileSync(path.join(saslDir, 'smtpd.conf'), `pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\nsasldb_path: ${db}\n`);
    main.push(
      'smtpd_sasl_auth_enable = yes',
      'smtpd_sasl_type = cyrus',
      `cyrus_sasl_config_path = ${saslDir}`,
      'smtpd_sasl_local_domain = backend.test',
      'smtpd_sasl_security_options = noanonymous',
      'smtpd_tls_auth_only = no',
      'broken_sasl_auth_clients = no',
    );
  }
  fs.writeFileSync(path.join(dir, 'main.cf'), main.join('\n') + '\n');
  fs.writeFileSync(path.join(dir, 'master.cf'), `127.0.0.1:${port} inet n - n - - smtpd\n${MASTER_CF}`);
  try {
    // postfix(1) reports check failures only on a terminal: run it under script(1).
    execFileSync('script', ['-qc', `postfix -c ${dir} start`, '/dev/null'], { stdio: 'pipe' });
  } catch (e) {
    throw new Error(`postfix start failed: ${(e as { stdout?: Buffer }).stdout?.toString() ?? e}`);
  }
  const pidFile = path.join(dir, 'queue', 'pid', 'master.pid');
  await eventually(() => fs.existsSync(pidFile) && fs.readFileSync(pidFile, 'utf8').trim() !== '', 10_000);
  const pid = Number(fs.readFileSync(pidFile, 'utf8').trim());
  trackPid(pid);
  const log = () => (fs.existsSync(path.join(dir, 'maillog')) ? fs.readFileSync(path.join(dir, 'maillog'), 'utf8') : '');
  await eventually(async () => {
    const net = await import('node:net');
    return new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
  }, 10_000);
  return {
    port,
    dir,
    pid,
    log,
    async stop() {
      try {
        process.kill(pid, 'SIGTERM');
      } catch {
        /* gone */
      }
      await eventually(() => {
        try {
          process.kill(pid, 0);
          return false;
        } catch {
          return true;
        }
      }, 5000);
      untrackPid(pid);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
