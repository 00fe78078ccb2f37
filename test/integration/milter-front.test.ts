/**
 * The milter front end to end: a real Postfix smtpd with `smtpd_milters = inet:127.0.0.1:<doorman>`,
 * `milter_default_action = accept` and its own relay checks opened (every 127.0.0.x client in
 * mynetworks: doorman's rules decide), relaying to smtp-sink; swaks clients from 127.0.0.x talk to
 * Postfix only. doorman (`DOORMAN_LISTEN='milter://127.0.0.1:{PORT}'`) answers through the milter
 * protocol: a relay attempt refused with the relay rule's reply (and let through for a client
 * Postfix authenticated: `{auth_authen}`), a DNSBL-listed client refused with the dnsbl rule's code,
 * an SPF softfail as an X-Doorman-Tag field and an Authentication-Results field at the sink (and
 * an incoming one claiming doorman's name deleted), EICAR in the body refused by clamav (the body
 * reaches the content rules through the milter), a rate limit deferring with 4xx, a dry-run finding only logged; the session
 * log line says `front: "milter"`. Last, doorman stopped: Postfix applies milter_default_action
 * and mail flows. dnsmasq serves both the SPF records and the DNSBL zone.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startDnsmasq, type Dnsmasq } from '../helpers/dns.js';
import { startPostfix, type Postfix } from '../helpers/postfix.js';
import { EICAR, EICAR_NAME, startClamd, type Daemon } from '../helpers/scanners.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { swaks } from '../helpers/swaks.js';
import { eventually, useCleanup } from '../helpers/procs.js';

useCleanup();
let sink: Sink;
let postfix: Postfix;
let dm: Doorman;
let dns: Dnsmasq;
let clamd: Daemon;

const OUTSIDE = '127.0.0.20';
const LISTED = '127.0.0.66';
const DRY = '127.0.0.77';
const SOFT = '127.0.0.41';
const LIMITED = '127.0.0.40';
const HOSTNAME = 'mx.doorman.test';

const RULES = {
  'relay.yaml': 'rule: relay\nsettings:\n  localDomains: [example.com]\n  relayNetworks: [127.0.0.30/32]\n',
  'dnsbl.yaml': 'rule: dnsbl\nsettings:\n  zones:\n    - zone: bl.test\n',
  'spf.yaml': `rule: spf
timeout: 5000
settings:
  results:
    fail: reject
    softfail: tag
  skipNetworks: [127.0.0.1/32]
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
};

/** swaks from `client` (a 127.0.0.x address) to Postfix. */
function send(client: string, mailFrom: string, to: string, extra: string[] = []) {
  return swaks(['--server', `127.0.0.1:${postfix.port}`, '--local-interface', client, '--from', mailFrom, '--to', to, '--helo', 'client.tester.test', ...extra]);
}

before(async () => {
  [sink, clamd] = await Promise.all([startSink(), startClamd()]);
  dns = await startDnsmasq({
    txt: [['soft.test', 'v=spf1 ip4:127.0.0.40 ~all']],
    // The listed client, and 127.0.0.2 for the zone's RFC 5782 self-test.
    a: [
      ['66.0.0.127.bl.test', '127.0.0.2'],
      ['2.0.0.127.bl.test', '127.0.0.2'],
    ],
  });
  dm = await startDoorman({
    backendPort: sink.port,
    listen: 'milter://127.0.0.1:{PORT}',
    env: { DOORMAN_DNS_SERVERS: dns.server, DOORMAN_HOSTNAME: HOSTNAME },
    // A content rule: clamd reads the body the milter hands over, chunk by chunk.
    rules: { ...RULES, 'clamav.yaml': `rule: clamav\ntimeout: 30000\nsettings:\n  port: ${clamd.port}\n` },
  });
  postfix = await startPostfix({
    relayPort: sink.port,
    sasl: { alice: 'secret' },
    // Postfix relays for every 127.0.0.x client (mynetworks): doorman's relay rule decides.
    openRelay: true,
    main: [`smtpd_milters = inet:127.0.0.1:${dm.port}`, 'milter_default_action = accept', 'milter_command_timeout = 10s'],
  });
});

after(async () => {
  await dm?.stop();
  await postfix?.stop();
  await sink?.stop();
  await dns?.stop();
  await clamd?.stop();
});

/** The session log line of the milter front for `client`. */
async function sessionOf(client: string) {
  const find = () => dm.sessions().find((l) => l.client === client);
  await eventually(find, 10_000);
  const line = find();
  assert.ok(line, `no session log line for ${client}: ${dm.proc.output().slice(-2000)}`);
  return line;
}

test('a relay attempt is refused with the relay rule\'s reply; a client Postfix authenticated may relay', async () => {
  const r = await send(OUTSIDE, 'someone@tester.test', 'victim@elsewhere.example', ['--quit-after', 'RCPT']);
  assert.match(r.out, /<\*\* 554 5\.7\.1 <victim@elsewhere\.example>: Relay access denied\n/, r.out);
  const line = await sessionOf(OUTSIDE);
  assert.equal(line.front, 'milter');
  assert.equal(line.listener, `milter@127.0.0.1:${dm.port}`);
  assert.equal(line.outcome, 'rejected');
  assert.equal(await dm.metric('doorman_rejections_total', { front: 'milter', rule: 'relay', stage: 'rcpt', code: '554' }), 1);
  // Postfix's own login reaches the rules as the session's auth ({auth_authen} at MAIL).
  const authed = await send('127.0.0.21', 'alice@tester.test', 'friend@elsewhere.example', ['--auth', 'PLAIN', '--auth-user', 'alice@backend.test', '--auth-password', 'secret']);
  assert.equal(authed.status, 0, authed.out);
  const m = await sink.bySender('alice@tester.test');
  assert.match(m.rcpts.join(), /^<friend@elsewhere\.example>/);
  const authLine = await sessionOf('127.0.0.21');
  assert.equal(authLine.login, 'alice@backend.test');
});

test('a DNSBL-listed client is refused with the dnsbl rule\'s code at connect', async () => {
  const r = await send(LISTED, 'x@tester.test', 'user@example.com', ['--quit-after', 'RCPT']);
  // A milter refusal at connect: Postfix refuses the session with its own 554 greeting and logs
  // the milter's reply (smtpd.c); the rule's code and text are in its log.
  assert.match(r.out, /<\*\* 554 backend\.test ESMTP not accepting connections\n/, r.out);
  await eventually(() => /milter-reject: CONNECT from [^\n]*\[127\.0\.0\.66\]/.test(postfix.log()), 5000);
  assert.match(postfix.log(), /milter-reject: CONNECT from [^\n]*\[127\.0\.0\.66\][^\n]*: 554 5\.7\.1 Service unavailable; client \[127\.0\.0\.66\] blocked using bl\.test/, postfix.log().slice(-2000));
  const line = await sessionOf(LISTED);
  assert.equal(line.front, 'milter');
  assert.equal(line.outcome, 'rejected');
  assert.ok((line.rules as { rule: string; stage: string }[]).some((x) => x.rule === 'dnsbl' && x.stage === 'connect'));
});

test('an SPF softfail: an X-Doorman-Tag field and doorman\'s Authentication-Results at the sink, a forged one claiming its name deleted', async () => {
  const forged = `Authentication-Results: ${HOSTNAME}; spf=pass smtp.mailfrom=soft.test`;
  const accepted = await dm.metric('doorman_messages_total', { outcome: 'accepted' });
  const r = await send(SOFT, 'someone@soft.test', 'user@example.com', ['--add-header', forged, '--add-header', 'Authentication-Results: other.example; spf=none']);
  assert.equal(r.status, 0, r.out);
  const m = await sink.bySender('someone@soft.test');
  const head = m.body.split('\n\n')[0] ?? '';
  assert.match(head, /^X-Doorman-Tag: spf; .+$/m, head);
  const ours = head.match(new RegExp(`^Authentication-Results: ${HOSTNAME.replace(/\./g, '\\.')};[^\\n]*(\\n\\s[^\\n]*)*`, 'gm')) ?? [];
  assert.equal(ours.length, 1, `one field of doorman's, the forged one deleted:\n${head}`);
  assert.match(ours[0] ?? '', /spf=softfail smtp\.mailfrom=someone@soft\.test/);
  assert.match(head, /^Authentication-Results: other\.example; spf=none$/m, 'a field of another host stays');
  // Inserted above the message's own fields (and Postfix's Received).
  const lines = head.split('\n');
  const ar = lines.findIndex((l) => l.startsWith(`Authentication-Results: ${HOSTNAME}`));
  const received = lines.findIndex((l) => l.startsWith('Received:'));
  assert.ok(ar >= 0 && ar < received, head);
  const line = await sessionOf(SOFT);
  assert.equal(line.outcome, 'passed');
  assert.deepEqual(line.tags, [lines.find((l) => l.startsWith('X-Doorman-Tag: '))?.slice('X-Doorman-Tag: '.length)]);
  assert.equal(await dm.metric('doorman_messages_total', { outcome: 'accepted' }), accepted + 1);
});

test('a content rule reads the body through the milter: EICAR refused at end of data with clamav\'s reply', async () => {
  const r = await send('127.0.0.22', 'eicar@tester.test', 'user@example.com', ['--body', `See the file below.\r\n${EICAR}\r\n`]);
  assert.match(r.out, new RegExp(`<\\*\\* 554 5\\.7\\.1 Message rejected: virus found: ${EICAR_NAME.replace(/\./g, '\\.')}\\n`), r.out);
  const line = await sessionOf('127.0.0.22');
  assert.equal((line.transactions as { outcome: string }[])[0]?.outcome, 'rejected');
  assert.equal(await dm.metric('doorman_rejections_total', { rule: 'clamav', stage: 'data_end', code: '554' }), 1);
  // The one message refused at end of data: doorman_messages_total says so, as for the SMTP listener.
  assert.equal(await dm.metric('doorman_messages_total', { outcome: 'rejected' }), 1);
});

test('a rate limit answers 4xx through the milter: the second message is deferred with the rule\'s reply', async () => {
  const first = await send(LIMITED, 'first@tester.test', 'user@example.com');
  assert.equal(first.status, 0, first.out);
  await sink.bySender('first@tester.test');
  const second = await send(LIMITED, 'second@tester.test', 'user@example.com', ['--quit-after', 'RCPT']);
  assert.match(second.out, /<\*\* 450 4\.7\.1 Error: too much mail, try again later\n/, second.out);
  assert.equal(await dm.metric('doorman_rejections_total', { rule: 'ratelimit', code: '450' }), 1);
});

test('a dry-run finding is only logged: the mail flows', async () => {
  const r = await send(DRY, 'dry@tester.test', 'user@example.com');
  assert.equal(r.status, 0, r.out);
  await sink.bySender('dry@tester.test');
  const line = await sessionOf(DRY);
  assert.equal(line.front, 'milter');
  assert.equal(line.outcome, 'passed');
  const entry = (line.rules as { rule: string; effect: string; would?: string }[]).find((x) => x.rule === 'dry');
  assert.deepEqual({ effect: entry?.effect, would: entry?.would }, { effect: 'none', would: 'reject' });
});

test('doorman stopped: Postfix applies milter_default_action (accept) and mail flows', async () => {
  await dm.stop();
  const r = await send(OUTSIDE, 'whiledown@tester.test', 'victim@elsewhere.example');
  assert.equal(r.status, 0, r.out);
  const m = await sink.bySender('whiledown@tester.test');
  assert.ok(!m.body.includes('X-Doorman-Tag'), m.body);
  assert.match(postfix.log(), /connect to Milter service inet:127\.0\.0\.1:\d+: Connection refused/);
});

test('only the steps its rules need get a reply (a relay rule alone: RCPT, DATA and end of message); doorman stopped with milter_default_action = tempfail: 451, nothing delivered', async () => {
  const d2 = await startDoorman({ backendPort: sink.port, listen: 'milter://127.0.0.1:{PORT}', rules: { 'relay.yaml': RULES['relay.yaml'] } });
  const pf2 = await startPostfix({ relayPort: sink.port, openRelay: true, main: [`smtpd_milters = inet:127.0.0.1:${d2.port}`, 'milter_default_action = tempfail', 'milter_command_timeout = 10s'] });
  try {
    const via = (client: string, from: string, to: string, extra: string[] = []) =>
      swaks(['--server', `127.0.0.1:${pf2.port}`, '--local-interface', client, '--from', from, '--to', to, '--helo', 'client.tester.test', ...extra]);
    // Connect, HELO and MAIL were negotiated without a reply, end of header away: the
    // session still runs, the relay rule still refuses at RCPT, local mail is delivered.
    const refused = await via('127.0.0.23', 'nr@tester.test', 'victim@elsewhere.example', ['--quit-after', 'RCPT']);
    assert.match(refused.out, /<\*\* 554 5\.7\.1 <victim@elsewhere\.example>: Relay access denied\n/, refused.out);
    const ok = await via('127.0.0.23', 'nr-local@tester.test', 'user@example.com');
    assert.equal(ok.status, 0, ok.out);
    const m = await sink.bySender('nr-local@tester.test');
    assert.match(m.rcpts.join(), /^<user@example\.com>/);
    await eventually(() => d2.sessions().length >= 2, 10_000);
    const line = d2.sessions().find((l) => (l.transactions as { from: string }[])[0]?.from === '<nr-local@tester.test>');
    assert.ok(line, JSON.stringify(d2.sessions()));
    assert.equal(line.helo, 'client.tester.test', 'HELO without a reply still reaches the session');
    assert.equal((line.transactions as { size?: number }[])[0]?.size !== undefined, true, 'the size is known: header and body still come');
    assert.equal(await d2.metric('doorman_messages_total', { outcome: 'accepted' }), 1);
    // Fail closed: doorman down, Postfix answers 4xx and keeps nothing.
    await d2.stop();
    const down = await via('127.0.0.24', 'closed@tester.test', 'user@example.com');
    assert.match(down.out, /<\*\* 451 4\.7\.1 Service unavailable - try again later\n/, down.out);
    assert.match(pf2.log(), /connect to Milter service inet:127\.0\.0\.1:\d+: Connection refused/);
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(sink.messages().filter((x) => x.mail.startsWith('<closed@tester.test>')).length, 0);
  } finally {
    await d2.stop();
    await pf2.stop();
  }
});
