import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadConfig } from '../../src/config/load.js';
import { LIMIT_DEFAULTS } from '../../src/config/defaults.js';
import { DoormanError } from '../../src/errors.js';
import { reply, formatReply } from '../../src/protocol/reply.js';
import { xtext } from '../../src/backend/connection.js';

const cwd = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-cfg-'));

test('defaults: listen 127.0.0.1:2525, backend 127.0.0.1:25, rules from rules/', () => {
  const { config } = loadConfig({ env: {}, cwd });
  assert.equal(config.listen[0]?.address, '127.0.0.1:2525');
  assert.equal(config.backend.address, '127.0.0.1:25');
  assert.equal(config.rules.dir, path.join(cwd, 'rules'));
  assert.equal(config.limits.maxCommandLine, LIMIT_DEFAULTS.maxCommandLine);
});

test('environment variables override the file', () => {
  const file = path.join(cwd, 'doorman.yaml');
  fs.writeFileSync(file, 'hostname: from-file.example\nbackend:\n  address: 10.0.0.1:25\n  starttls: off\n');
  const { config, hostname } = loadConfig({
    cwd,
    env: {
      DOORMAN_CONFIG: file,
      DOORMAN_BACKEND: '[::1]:2526',
      DOORMAN_LISTEN: 'smtp://0.0.0.0:25,submission://[::]:587,smtps+proxy://0.0.0.0:465',
      DOORMAN_TRUSTED_PROXIES: '10.0.0.0/8',
      DOORMAN_DNS_SERVERS: '127.0.0.53, 127.0.0.54',
      DOORMAN_HOSTNAME: 'mx.example',
    },
  });
  assert.equal(hostname, 'mx.example');
  assert.equal(config.backend.address, '[::1]:2526');
  assert.equal(config.backend.starttls, 'off', 'file values not overridden stay');
  assert.deepEqual(config.listen.map((l) => [l.role, l.address, l.proxyProtocol]), [['smtp', '0.0.0.0:25', false], ['submission', '[::]:587', false], ['smtps', '0.0.0.0:465', true]]);
  assert.deepEqual(config.listen[2]?.trustedProxies, ['10.0.0.0/8']);
  assert.deepEqual(config.dns.servers, ['127.0.0.53', '127.0.0.54']);
});

test('errors name the environment variable', () => {
  assert.throws(() => loadConfig({ cwd, env: { DOORMAN_LISTEN: 'ftp://x:1' } }), (e: unknown) => e instanceof DoormanError && /unknown role "ftp"/.test(e.message));
  assert.throws(() => loadConfig({ cwd, env: { DOORMAN_BACKEND: 'nope' } }), (e: unknown) => e instanceof DoormanError && /backend\.address/.test(e.message));
});

test('replies: multi-line with enhanced codes; control characters cannot inject lines', () => {
  assert.equal(formatReply(reply(250, '2.0.0', ['a', 'b'])), '250-2.0.0 a\r\n250 2.0.0 b\r\n');
  assert.equal(formatReply(reply(550, '5.7.1', 'x\r\n250 ok')), '550 5.7.1 x  250 ok\r\n');
  assert.throws(() => reply(550, '4.7.1', 'mismatch'));
  assert.equal(reply(421, '4.4.2', 'bye').closes, true);
});

test('xtext (RFC 3461) for XCLIENT values', () => {
  assert.equal(xtext('a b+c=d'), 'a+20b+2Bc+3Dd');
  assert.equal(xtext('[UNAVAILABLE]'), '[UNAVAILABLE]');
  assert.equal(xtext('x\r\nDATA'), 'x+0D+0ADATA');
});

test('DNSBL query names: reversed octets, 32 reversed nibbles (RFC 5782 §2)', async () => {
  const { reversedName } = await import('../../src/net/dns.js');
  assert.equal(reversedName('192.0.2.99'), '99.2.0.192');
  assert.equal(reversedName('::ffff:192.0.2.99'), '99.2.0.192', 'IPv4-mapped IPv6 is queried as IPv4');
  assert.equal(reversedName('2001:db8::1'), '1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2');
});

test('DNSBL answer filters and answer problems (Spamhaus error codes, outside 127/8)', async () => {
  const { parseAnswerFilter, answerProblem } = await import('../../src/rules/dnsbl.js');
  const f = parseAnswerFilter('127.0.0.[2..11]');
  assert.ok(f);
  assert.equal(f('127.0.0.2'), true);
  assert.equal(f('127.0.0.11'), true);
  assert.equal(f('127.0.0.12'), false);
  assert.equal(f('127.0.1.2'), false);
  assert.equal(parseAnswerFilter('127.0.0.0/24')?.('127.0.0.200'), true);
  assert.equal(parseAnswerFilter('127.0.0.[11..2]'), null);
  assert.equal(parseAnswerFilter('bogus'), null);
  assert.match(answerProblem('127.255.255.254') ?? '', /error code/);
  assert.match(answerProblem('10.0.0.2') ?? '', /outside 127/);
  assert.equal(answerProblem('127.0.0.4'), null);
});

test('listener roles policy and milter: TCP, a unix socket path, one process with the SMTP listeners', () => {
  const { config } = loadConfig({ cwd, env: { DOORMAN_LISTEN: 'smtp://0.0.0.0:25,policy://127.0.0.1:10040,milter://127.0.0.1:8890,policy:///run/doorman/policy.sock' } });
  assert.deepEqual(config.listen.map((l) => [l.role, l.address]), [
    ['smtp', '0.0.0.0:25'],
    ['policy', '127.0.0.1:10040'],
    ['milter', '127.0.0.1:8890'],
    ['policy', '/run/doorman/policy.sock'],
  ]);
  // The same in the file.
  const file = path.join(cwd, 'fronts.yaml');
  fs.writeFileSync(file, 'listen:\n  - address: /run/doorman/policy.sock\n    role: policy\n  - address: 127.0.0.1:2525\n');
  assert.deepEqual(loadConfig({ cwd, env: {}, file }).config.listen.map((l) => l.role), ['policy', 'smtp']);
});

test('a unix socket is for the policy and milter roles only; +proxy is for SMTP listeners', () => {
  const bad = (listen: string, why: RegExp) =>
    assert.throws(() => loadConfig({ cwd, env: { DOORMAN_LISTEN: listen } }), (e: unknown) => e instanceof DoormanError && why.test(e.message + JSON.stringify(e.problems)), listen);
  bad('smtp:///run/doorman/smtp.sock', /expected host:port/);
  bad('policy://relative.sock', /expected host:port/);
  bad('policy+proxy://127.0.0.1:10040', /\+proxy is for SMTP listeners/);
  const file = path.join(cwd, 'bad-socket.yaml');
  fs.writeFileSync(file, 'listen:\n  - address: /run/doorman/smtp.sock\n    role: smtp\n');
  assert.throws(() => loadConfig({ cwd, env: {}, file }), (e: unknown) => e instanceof DoormanError && /listen\.0\.address/.test(JSON.stringify(e.problems)));
});
