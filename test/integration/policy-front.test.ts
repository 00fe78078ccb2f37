/**
 * The policy front end to end: a real Postfix smtpd with
 * `smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:<doorman>, permit_mynetworks,
 * reject_unauth_destination` (and the same service at end of data), relaying to smtp-sink; swaks
 * clients from 127.0.0.x talk to Postfix only. doorman's rules decide through the policy protocol:
 * a relay attempt refused with the relay rule's reply, a DNSBL-listed client with the dnsbl rule's
 * code, a rate limit as DEFER_IF_PERMIT (Postfix: 450), a dry-run finding only logged, a tag as a
 * PREPENDed header at the sink; the session log line and the metrics carry the front. Last,
 * doorman stopped: Postfix applies `smtpd_policy_service_default_action = DUNNO` and mail flows.
 * A raw client checks the unix socket listener, that malformed input closes the connection, the
 * stages run per `instance` (connect once, refusals kept, a repeated recipient answered from
 * memory), the idle timeout and the connection bound; an SMTP listener in the same process applies
 * the same rules and its log line says `front: "smtp"`.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startPostfix, type Postfix } from '../helpers/postfix.js';
import { startRbldnsd, type Rbldnsd } from '../helpers/rbldnsd.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { swaks } from '../helpers/swaks.js';
import { eventually, useCleanup } from '../helpers/procs.js';

useCleanup();
let sink: Sink;
let postfix: Postfix;
let dm: Doorman;
let rbl: Rbldnsd;
const sockDir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-policy-'));
const SOCK = path.join(sockDir, 'policy.sock');

const OUTSIDE = '127.0.0.20';
const LISTED = '127.0.0.66';
const LIMITED = '127.0.0.40';
const DRY = '127.0.0.77';
const TAGGED = '127.0.0.50';

const RULES = {
  'relay.yaml': 'rule: relay\nsettings:\n  localDomains: [example.com]\n  relayNetworks: [127.0.0.30/32]\n',
  'dnsbl.yaml': `rule: dnsbl
settings:
  zones:
    - zone: bl.test
`,
  'ratelimit.yaml': `rule: ratelimit
scope:
  clients: ["${LIMITED}"]
settings:
  limits:
    - name: msgs
      count: messages
      key: client
      limit: 1
      window: 600000
`,
  'dry.yaml': `rule: access
action: dry-run
settings:
  clients:
    - deny: ${DRY}
      reason: dry-run test
`,
  'helo.yaml': `rule: helo
action: tag
scope:
  clients: ["${TAGGED}"]
`,
};

/** swaks from `from` (a 127.0.0.x address) to Postfix. */
function send(client: string, mailFrom: string, to: string, extra: string[] = []) {
  return swaks(['--server', `127.0.0.1:${postfix.port}`, '--local-interface', client, '--from', mailFrom, '--to', to, '--helo', 'client.tester.example', ...extra]);
}

before(async () => {
  sink = await startSink();
  rbl = await startRbldnsd([{ name: 'bl.test', type: 'ip4set', lines: [':127.0.0.2:Listed by bl.test', '127.0.0.2', LISTED] }]);
  dm = await startDoorman({
    backendPort: sink.port,
    // One process, both fronts: the policy server and an SMTP listener (to the sink) with the same rules.
    listen: `policy://127.0.0.1:{PORT},policy://${SOCK},smtp://127.0.0.1:{PORT}`,
    env: { DOORMAN_DNS_SERVERS: rbl.server },
    // Transactions refused before their end of data end (and are logged) after 1.5 s.
    config: 'limits:\n  policyInstanceTtl: 1500\n',
    rules: RULES,
  });
  const policy = `check_policy_service inet:127.0.0.1:${dm.port}`;
  postfix = await startPostfix({
    relayPort: sink.port,
    openRelay: true,
    main: [
      `smtpd_recipient_restrictions = ${policy}, permit_mynetworks, reject_unauth_destination`,
      `smtpd_end_of_data_restrictions = ${policy}`,
      'smtpd_policy_service_default_action = DUNNO',
      'smtpd_policy_service_try_limit = 1',
    ],
  });
});

after(async () => {
  await dm?.stop();
  await postfix?.stop();
  await sink?.stop();
  await rbl?.stop();
  fs.rmSync(sockDir, { recursive: true, force: true });
});

/** The session log line of the policy front for `client`. */
async function sessionOf(client: string) {
  const find = () => dm.sessions().find((l) => l.client === client);
  await eventually(find, 10_000);
  const line = find();
  assert.ok(line, `no session log line for ${client}: ${dm.proc.output().slice(-2000)}`);
  return line;
}

test('a relay attempt is refused by Postfix with the relay rule\'s code and text; local mail flows', async () => {
  const r = await send(OUTSIDE, 'someone@tester.example', 'victim@elsewhere.example', ['--quit-after', 'RCPT']);
  // Postfix puts "<address>: Recipient address rejected: " before a policy server's text at RCPT;
  // the rule's own "<address>: " prefix is left off so that the address is not said twice.
  assert.match(r.out, /<\*\* 554 5\.7\.1 <victim@elsewhere\.example>: Recipient address rejected: Relay access denied\n/, r.out);
  const ok = await send(OUTSIDE, 'inbound@tester.example', 'user@example.com');
  assert.equal(ok.status, 0, ok.out);
  const m = await sink.bySender('inbound@tester.example');
  assert.match(m.rcpts.join(), /^<user@example\.com>/);
  assert.equal(await dm.metric('doorman_rejections_total', { rule: 'relay', stage: 'rcpt', code: '554' }), 1);
});

test('the same rules on the SMTP listener of the same process: the session log lines say which front', async () => {
  const r = await swaks(['--server', `127.0.0.1:${dm.ports[1]}`, '--local-interface', '127.0.0.21', '--from', 'a@tester.example', '--to', 'victim@elsewhere.example', '--helo', 'client.tester.example', '--quit-after', 'RCPT']);
  assert.match(r.out, /<\*\* 554 5\.7\.1 <victim@elsewhere\.example>: Relay access denied\n/, r.out);
  const smtp = await sessionOf('127.0.0.21');
  assert.equal(smtp.front, 'smtp');
  const policy = await sessionOf(OUTSIDE);
  assert.equal(policy.front, 'policy');
  assert.equal(policy.listener, `policy@127.0.0.1:${dm.port}`);
  // The refusals' metric says which front made them.
  assert.equal(await dm.metric('doorman_rejections_total', { front: 'smtp', rule: 'relay', stage: 'rcpt' }), 1);
  assert.equal(await dm.metric('doorman_rejections_total', { front: 'policy', rule: 'relay', stage: 'rcpt' }), 1);
});

test('a DNSBL-listed client is refused with the dnsbl rule\'s code (its connect-stage verdict at RCPT)', async () => {
  const r = await send(LISTED, 'x@tester.example', 'user@example.com', ['--quit-after', 'RCPT']);
  assert.match(r.out, /<\*\* 554 5\.7\.1 <user@example\.com>: Recipient address rejected: Service unavailable; client \[127\.0\.0\.66\] blocked using bl\.test\n/, r.out);
  const line = await sessionOf(LISTED);
  assert.equal(line.front, 'policy');
  assert.equal(line.outcome, 'rejected');
  assert.ok((line.rules as { rule: string; stage: string }[]).some((x) => x.rule === 'dnsbl' && x.stage === 'connect'));
});

test('a rate limit answers DEFER_IF_PERMIT: Postfix says 450 4.7.1 to the second message', async () => {
  const first = await send(LIMITED, 'first@tester.example', 'user@example.com');
  assert.equal(first.status, 0, first.out);
  await sink.bySender('first@tester.example');
  const second = await send(LIMITED, 'second@tester.example', 'user@example.com', ['--quit-after', 'RCPT']);
  assert.match(second.out, /<\*\* 450 4\.7\.1 <user@example\.com>: Recipient address rejected: Error: too much mail, try again later\n/, second.out);
  assert.equal(await dm.metric('doorman_policy_requests_total', { state: 'RCPT', action: 'defer' }), 1);
});

test('a dry-run finding is only logged: the mail flows', async () => {
  const r = await send(DRY, 'dry@tester.example', 'user@example.com');
  assert.equal(r.status, 0, r.out);
  await sink.bySender('dry@tester.example');
  const line = await sessionOf(DRY);
  assert.equal(line.front, 'policy');
  assert.equal(line.outcome, 'passed');
  assert.equal(line.end, 'end-of-message', 'END-OF-MESSAGE ends the transaction at once');
  const entry = (line.rules as { rule: string; effect: string; would?: string }[]).find((x) => x.rule === 'dry');
  assert.deepEqual({ effect: entry?.effect, would: entry?.would }, { effect: 'none', would: 'reject' });
});

test('a tag becomes a PREPENDed X-Doorman-Tag header at the sink', async () => {
  const r = await send(TAGGED, 'tagged@tester.example', 'user@example.com', ['--helo', 'nodot']);
  assert.equal(r.status, 0, r.out);
  const m = await sink.bySender('tagged@tester.example');
  assert.match(m.body, /^X-Doorman-Tag: helo; need fully-qualified hostname$/m);
  assert.equal((m.body.match(/^X-Doorman-Tag:/gm) ?? []).length, 1, 'one header, not one per request');
});

/**
 * Writes `payload` to the unix socket listener; resolves with what came back once `answers`
 * answers arrived (then closes), or when the server closed the connection, or after 3 s.
 */
function talk(payload: string, answers = Infinity) {
  return new Promise<{ data: string; closed: boolean }>((resolve) => {
    const s = net.connect(SOCK);
    let data = '';
    const t = setTimeout(() => {
      s.destroy();
      resolve({ data, closed: false });
    }, 3000);
    s.on('data', (d) => {
      data += d.toString();
      if ((data.match(/\n\n/g) ?? []).length >= answers) {
        clearTimeout(t);
        s.destroy();
        resolve({ data, closed: false });
      }
    });
    s.on('connect', () => s.write(payload));
    s.on('close', () => {
      clearTimeout(t);
      resolve({ data, closed: true });
    });
  });
}

const request = (attrs: Record<string, string>) =>
  'request=smtpd_access_policy\n' + Object.entries(attrs).map(([k, v]) => `${k}=${v}\n`).join('') + '\n';

test('the unix socket listener answers; malformed input closes the connection', async () => {
  const req = request({ protocol_state: 'RCPT', client_address: OUTSIDE, helo_name: 'a.example', sender: 'a@tester.example', recipient: 'b@other.example', instance: 'sock.1' });
  const good = await talk(req);
  assert.equal(good.data, 'action=554 5.7.1 Relay access denied\n\n');
  assert.equal(good.closed, false, 'the connection stays open for the next request');
  const bad = await talk(req + 'not a policy line\n');
  assert.equal(bad.data, 'action=554 5.7.1 Relay access denied\n\n', 'the request before is answered');
  assert.equal(bad.closed, true);
  assert.ok((await dm.metric('doorman_protocol_violations_total', { kind: 'policy_malformed' })) >= 1);
});

test('per instance: connect runs once, a refusal at connect answers every later request, a repeated recipient is not evaluated again', async () => {
  const connects = () => dm.metric('doorman_rule_evaluations_total', { rule: 'dnsbl', stage: 'connect' });
  const relayRcpts = () => dm.metric('doorman_rule_evaluations_total', { rule: 'relay', stage: 'rcpt' });
  const c0 = await connects();
  const r0 = await relayRcpts();
  const base = { protocol_state: 'RCPT', client_address: '127.0.0.90', helo_name: 'c.tester.example', sender: 's@tester.example', instance: 'inst.A' };
  const clean = await talk(
    request({ ...base, recipient: 'u1@example.com' }) + request({ ...base, recipient: 'x@other.example' }) + request({ ...base, recipient: 'x@other.example' }) + request({ ...base, recipient: 'u2@example.com' }),
    4,
  );
  assert.equal(clean.data, ['DUNNO', '554 5.7.1 Relay access denied', '554 5.7.1 Relay access denied', 'DUNNO'].map((a) => `action=${a}\n\n`).join(''));
  assert.equal((await connects()) - c0, 1, 'one connect stage for the four requests of the instance');
  assert.equal((await relayRcpts()) - r0, 3, 'the repeated recipient was answered from memory');
  const listed = { ...base, client_address: LISTED, instance: 'inst.B' };
  const refused = await talk(request({ ...listed, recipient: 'u1@example.com' }) + request({ ...listed, recipient: 'u2@example.com' }), 2);
  const dnsbl = 'action=554 5.7.1 Service unavailable; client [127.0.0.66] blocked using bl.test\n\n';
  assert.equal(refused.data, dnsbl + dnsbl);
  assert.equal((await connects()) - c0, 2, 'the refused instance ran its connect stage once');
  assert.equal((await relayRcpts()) - r0, 3, 'no rcpt stage after a refusal at connect');
});

test('bounds: an idle policy connection is closed after policyIdleTimeout; past policyMaxConnections one is refused; a body rule is warned about once', async () => {
  const small = await startDoorman({
    backendPort: sink.port,
    listen: 'policy://127.0.0.1:{PORT}',
    config: 'limits:\n  policyIdleTimeout: 400\n  policyMaxConnections: 1\n',
    // A rule that reads the body: skipped by the policy front, with one warning at start.
    rules: { 'spamassassin.yaml': 'rule: spamassassin\nsettings:\n  port: 9\n' },
  });
  try {
    const warnings = small.logs().filter((l) => /policy front: no message/.test(l.msg));
    assert.equal(warnings.length, 1, small.proc.output().slice(-2000));
    assert.deepEqual(warnings[0]?.rules, ['spamassassin']);
    const open = () =>
      new Promise<{ socket: net.Socket; closedAfter: Promise<number> }>((resolve) => {
        const socket = net.connect(small.port, '127.0.0.1');
        socket.on('error', () => undefined);
        const t0 = Date.now();
        const closedAfter = new Promise<number>((r) => socket.on('close', () => r(Date.now() - t0)));
        // A connection refused at once can be reset before 'connect' fires: close settles it too.
        socket.on('connect', () => resolve({ socket, closedAfter }));
        socket.on('close', () => resolve({ socket, closedAfter }));
      });
    const first = await open();
    const second = await open();
    assert.ok((await second.closedAfter) < 300, 'the second connection is closed at once');
    assert.equal(await small.metric('doorman_connections_refused_total', { reason: 'too_many' }), 1);
    const idle = await first.closedAfter;
    assert.ok(idle >= 350 && idle < 3000, `idle connection closed after ${idle} ms`);
    // The slot is free again: a request is answered. doorman frees it on its side of the close,
    // which may come a moment after the client saw it: a connection still refused is tried again
    // (bounded), and no wait is without an end.
    let answer = '';
    for (let i = 0; i < 40 && !answer; i++) {
      const third = await open();
      third.socket.write(request({ protocol_state: 'RCPT', client_address: '127.0.0.91', sender: 'a@b.example', recipient: 'c@example.com', instance: 'x' }));
      answer = await new Promise<string>((r) => {
        third.socket.once('data', (d) => r(d.toString()));
        third.socket.once('close', () => r(''));
        setTimeout(() => r(''), 2000).unref();
      });
      third.socket.destroy();
      if (!answer) await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(answer, 'action=DUNNO\n\n');
  } finally {
    await small.stop();
  }
});

test('doorman stopped: Postfix applies smtpd_policy_service_default_action (DUNNO) and mail flows', async () => {
  await dm.stop();
  const r = await send(OUTSIDE, 'whiledown@tester.example', 'user@example.com');
  assert.equal(r.status, 0, r.out);
  await sink.bySender('whiledown@tester.example');
  // Postfix tried doorman, failed, and went on with its default action.
  assert.match(postfix.log(), /warning: problem talking to server 127\.0\.0\.1:\d+: Connection refused/);
});

test('doorman stopped, fail closed: with smtpd_policy_service_default_action = DEFER_IF_PERMIT Postfix defers (4xx) and delivers nothing', async () => {
  await dm.stop();
  const closed = await startPostfix({
    relayPort: sink.port,
    openRelay: true,
    main: [
      `smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:${dm.port}, permit_mynetworks, reject_unauth_destination`,
      'smtpd_policy_service_default_action = DEFER_IF_PERMIT',
      'smtpd_policy_service_try_limit = 1',
    ],
  });
  try {
    const r = await swaks(['--server', `127.0.0.1:${closed.port}`, '--local-interface', '127.0.0.25', '--from', 'failclosed@tester.example', '--to', 'user@example.com', '--helo', 'client.tester.example']);
    assert.match(r.out, /<\*\* 450 4\.7\.1 <user@example\.com>: Recipient address rejected: [^\n]+\n/, r.out);
    assert.match(closed.log(), /warning: problem talking to server 127\.0\.0\.1:\d+: Connection refused/);
    await new Promise((res) => setTimeout(res, 500));
    assert.equal(sink.messages().filter((m) => m.mail.startsWith('<failclosed@tester.example>')).length, 0);
  } finally {
    await closed.stop();
  }
});
