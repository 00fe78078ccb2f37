/**
 * The `doorman` command: --help, --version, `check` with good and bad rule files (errors name
 * file, line and key), bad environment and configuration files; and listeners on IPv4 and IPv6.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT, startDoorman } from '../helpers/doorman.js';
import { startFakeBackend } from '../helpers/fake-backend.js';
import { SmtpClient } from '../helpers/smtp.js';
import { eventually, useCleanup } from '../helpers/procs.js';

useCleanup();
const BIN = path.join(ROOT, 'bin', 'doorman.js');

function run(args: string[], env: Record<string, string> = {}): Promise<{ code: number; out: string; err: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args], { env: { PATH: process.env.PATH ?? '', ...env }, cwd: os.tmpdir() }, (e, stdout, stderr) => {
      resolve({ code: e ? (typeof e.code === 'number' ? e.code : 1) : 0, out: stdout, err: stderr });
    });
  });
}

function tmpdir(files: Record<string, string>): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-cli-'));
  for (const [n, t] of Object.entries(files)) fs.writeFileSync(path.join(dir, n), t);
  return dir;
}

test('doorman --help lists the commands and every environment variable', async () => {
  const r = await run(['--help']);
  assert.equal(r.code, 0);
  for (const word of ['doorman check', 'DOORMAN_LISTEN', 'DOORMAN_BACKEND', 'DOORMAN_HOSTNAME', 'DOORMAN_RULES', 'DOORMAN_REDIS_URL', 'DOORMAN_DNS_SERVERS', 'DOORMAN_METRICS_LISTEN', 'DOORMAN_TLS_CERT', 'DOORMAN_TLS_KEY']) {
    assert.ok(r.out.includes(word), word);
  }
  const v = await run(['--version']);
  assert.match(v.out.trim(), /^\d+\.\d+\.\d+$/);
});

test('doorman check accepts the shipped rules/ folder', async () => {
  const r = await run(['check', '--rules', path.join(ROOT, 'rules')]);
  assert.equal(r.code, 0, r.err);
  assert.equal(r.err, '', 'the shipped files use nothing that warns');
  assert.match(r.out, /^ok: .*access \(access, enforce\).*helo \(helo, dry-run\)/);
});

test('doorman check names file, line and key for every problem, and exits 1', async () => {
  const dir = tmpdir({
    'a.yaml': 'rule: access\nsettings:\n  clients:\n    - deny: 300.1.1.1\n  sendrs: []\n',
    'b.yaml': 'rule: nosuchrule\n',
    'c.yaml': 'rule: helo\naction: maybe\n',
    'd.yaml': 'rule: helo\nsettings: [unclosed\n',
  });
  const r = await run(['check', '--rules', dir]);
  assert.equal(r.code, 1);
  assert.match(r.err, /DMN_ERR_RULES_INVALID/);
  assert.match(r.err, /a\.yaml:4: settings\.clients\.0\.deny: not an address or CIDR: 300\.1\.1\.1/);
  assert.match(r.err, /a\.yaml:5: settings\.sendrs: unknown key/);
  assert.match(r.err, /b\.yaml:1: rule: .*expected one of "access"\|"helo"/);
  assert.match(r.err, /c\.yaml:2: action: /);
  assert.match(r.err, /d\.yaml:\d+: /);
  fs.rmSync(dir, { recursive: true });
});

test('doorman check warns (exit 0) about rule lists that contradict site.yaml and old keys, with file:line and where to move them', async () => {
  const dir = tmpdir({
    'site.yaml': 'localDomains: [example.com]\n',
    'relay.yaml': 'rule: relay\nsettings:\n  localDomains: [example.com, example.net]\n',
    'spf.yaml': 'rule: spf\nsettings:\n  skipNetworks: [10.0.0.0/8]\n',
    'greylist.yaml': 'rule: greylist\nsettings:\n  failMode: closed\n',
    'helo.yaml': 'rule: helo\nscope:\n  recipientDomains: [example.com]\n',
  });
  const r = await run(['check', '--rules', dir]);
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /^ok: /);
  assert.match(r.err, /warning: .*relay\.yaml:3: settings\.localDomains: example\.net not in localDomains of .*site\.yaml: add it there/);
  assert.match(r.err, /warning: .*spf\.yaml:3: settings\.skipNetworks: deprecated \(still used\): write scope: \{ clients: \["!relayNetworks"/);
  assert.match(r.err, /warning: .*greylist\.yaml:3: settings\.failMode: failMode is replaced by the rule file's onError: remove it and write onError: tempfail/);
  assert.match(r.err, /warning: .*helo\.yaml:3: scope\.recipientDomains: .*never applies/);
  fs.rmSync(dir, { recursive: true });
});

test('doorman check refuses a scope naming a listener that is not configured, and names the ones that are', async () => {
  const dir = tmpdir({ 'dnsbl.yaml': 'rule: dnsbl\nscope:\n  listeners: [mx25]\nsettings:\n  zones: [{ zone: bl.test }]\n' });
  const r = await run(['check', '--rules', dir], { DOORMAN_LISTEN: 'smtp://127.0.0.1:25,submission://127.0.0.1:587' });
  assert.equal(r.code, 1);
  assert.match(r.err, /dnsbl\.yaml:3: scope\.listeners\.0: no listener role or name "mx25": roles are smtp, submission, smtps, milter, policy; the listeners configured are smtp@127\.0\.0\.1:25 \(smtp\), submission@127\.0\.0\.1:587 \(submission\)/);
  fs.rmSync(dir, { recursive: true });
});

test('bad environment and configuration files are named', async () => {
  const env = await run(['check'], { DOORMAN_LISTEN: 'nowhere', DOORMAN_RULES: path.join(ROOT, 'rules') });
  assert.equal(env.code, 1);
  assert.match(env.err, /environment: DOORMAN_LISTEN: expected host:port in nowhere/);
  const dir = tmpdir({ 'doorman.yaml': 'backend:\n  address: 127.0.0.1:25\n  timeuot: 5\nlimits:\n  maxRecipients: 0\n' });
  const cfg = await run(['check', '--config', path.join(dir, 'doorman.yaml')]);
  assert.equal(cfg.code, 1);
  assert.match(cfg.err, /doorman\.yaml:3: backend\.timeuot: unknown key/);
  assert.match(cfg.err, /doorman\.yaml:5: limits\.maxRecipients: /);
  fs.rmSync(dir, { recursive: true });
  const usage = await run(['frobnicate']);
  assert.equal(usage.code, 2);
});

test('listeners on IPv4 and IPv6 at once; IPv6 clients keep their address', async () => {
  const fb = await startFakeBackend('none');
  const d = await startDoorman({ backendPort: fb.port, listen: 'smtp://127.0.0.1:{PORT},smtp://[::1]:{PORT}' });
  try {
    for (const host of ['127.0.0.1', '::1']) {
      const c = await SmtpClient.open(d.ports[host === '::1' ? 1 : 0]!, { host });
      assert.equal((await c.cmd('QUIT')).code, 221);
    }
    const s = await eventually(() => d.sessions().find((x) => x.client === '::1'));
    assert.ok(s, 'IPv6 client logged with its address');
  } finally {
    await d.stop();
    await fb.close();
  }
});
