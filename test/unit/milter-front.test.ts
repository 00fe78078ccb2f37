// The milter front's mapping (src/fronts/milter/front.ts): milter steps to the pipeline's stages
// through a FrontSession, verdicts to milter verdicts, header changes at end of message, several
// messages per connection, rule errors by onError, dry-run only logged, one session log line.
// The rules are small real Rule objects run by the real pipeline; the log is read from pino.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import pino from 'pino';
import type { RuleSet } from '../../src/config/rules.js';
import { LIMIT_DEFAULTS } from '../../src/config/defaults.js';
import { MilterFront, milterProtocol } from '../../src/fronts/milter/front.js';
import { DOORMAN_PROTOCOL, SMFIP } from '../../src/fronts/milter/codec.js';
import type { MilterHandler, MilterMacros } from '../../src/fronts/milter/server.js';
import { createMetrics } from '../../src/metrics/registry.js';
import type { LoadedRule } from '../../src/pipeline/loaded.js';
import type { Rule } from '../../src/pipeline/rule.js';
import type { Action, OnError } from '../../src/pipeline/verdict.js';
import type { Stage } from '../../src/pipeline/events.js';

function macros(values: Record<string, string> = {}): MilterMacros {
  const m = new Map(Object.entries(values));
  return { get: (n) => m.get(n.replace(/^\{(.*)\}$/, '$1')), all: () => m };
}

function loaded(rule: Rule, action: Action = 'enforce', onError: OnError = 'pass'): LoadedRule {
  return { rule, action, onError, timeout: 200, file: `${rule.name}.yaml` };
}

function ruleSet(rules: LoadedRule[]): RuleSet {
  const stages = new Set<Stage>();
  for (const r of rules) {
    for (const s of Object.keys(r.rule.checks)) stages.add(s as Stage);
    if (r.rule.body) stages.add('data_end');
  }
  return { rules, stages } as unknown as RuleSet;
}

function rig(rules: LoadedRule[]) {
  const lines: Record<string, unknown>[] = [];
  const out = new Writable({
    write(chunk: Buffer, _e, cb) {
      for (const l of chunk.toString().split('\n')) if (l) lines.push(JSON.parse(l) as Record<string, unknown>);
      cb();
    },
  });
  const log = pino({ level: 'info' }, out);
  const metrics = createMetrics({ version: 't' });
  const set = ruleSet(rules);
  const make = (): MilterHandler =>
    new MilterFront({ listener: { name: 'milter@127.0.0.1:1', role: 'milter' }, rules: () => set, limits: () => ({ ...LIMIT_DEFAULTS }) as never, metrics, log, hostname: 'mx.doorman.test' });
  return { lines, metrics, make };
}

const CONNECT = { hostname: 'client.example', family: '4' as const, address: '192.0.2.7', port: 4321 };

test('steps map to stages: the rule\'s refusal at RCPT, the MTA\'s login at MAIL, tags and A-R at eom, claimed A-R deleted', async () => {
  const seen: string[] = [];
  const body: string[] = [];
  const rules = [
    loaded({
      name: 'relay',
      type: 't',
      bypassable: false,
      checks: {
        connect: (ev) => (seen.push(`connect ${ev.session.client.text}:${ev.session.clientPort} ${ev.session.listener.role}`), { kind: 'pass' }),
        helo: (ev) => (seen.push(`helo ${ev.name} tls=${ev.session.tls}`), { kind: 'pass' }),
        auth: (ev) => (seen.push(`auth ${ev.login}`), { kind: 'pass' }),
        mail: (ev) => (seen.push(`mail ${ev.sender.raw} login=${ev.session.auth?.login} txn=${ev.session.transaction}`), { kind: 'pass', results: [{ method: 'spf', result: 'pass', props: [['smtp.mailfrom', ev.sender.raw]] }] }),
        rcpt: (ev) =>
          ev.recipient.raw === 'victim@elsewhere.example' ? { kind: 'reject', reason: 'relay', reply: { code: 554, enhanced: '5.7.1', text: `<${ev.recipient.raw}>: Relay access denied` } } : { kind: 'pass' },
        data_headers: (ev) => (seen.push(`headers ${JSON.stringify(ev.headers.toString())}`), { kind: 'pass' }),
      },
    } as Rule),
    loaded({ name: 'tagger', type: 't', bypassable: true, checks: { data_end: () => ({ kind: 'reject', reason: 'suspect' }) } } as Rule, 'tag'),
    loaded({
      name: 'reader',
      type: 't',
      bypassable: true,
      checks: {},
      body: { chunk: (c: Buffer) => void body.push(c.toString()), end: () => ({ kind: 'pass' }) },
    } as Rule),
  ];
  const { lines, make } = rig(rules);
  const h = make();
  assert.deepEqual(await h.connect(CONNECT, macros({ daemon_name: 'smtpd' })), { kind: 'continue' });
  assert.deepEqual(await h.helo('client.example', macros({ tls_version: 'TLSv1.3' })), { kind: 'continue' });
  assert.deepEqual(await h.mail('<a@tester.example>', ['SIZE=100'], macros({ auth_authen: 'alice', i: 'Q1' })), { kind: 'continue' });
  assert.deepEqual(await h.rcpt('<victim@elsewhere.example>', [], macros()), { kind: 'reject', code: 554, enhanced: '5.7.1', text: '<victim@elsewhere.example>: Relay access denied' });
  assert.deepEqual(await h.rcpt('<user@example.com>', [], macros()), { kind: 'continue' });
  assert.deepEqual(await h.data(macros()), { kind: 'continue' });
  h.header('Subject', 'hi');
  h.header('Authentication-Results', 'mx.doorman.test; spf=pass');
  h.header('Authentication-Results', 'other.example;\n\tspf=fail');
  h.header('Authentication-Results', ' MX.doorman.test; dkim=pass');
  assert.deepEqual(await h.eoh(macros()), { kind: 'continue' });
  await h.body(Buffer.from('line 1\r\n'));
  const r = await h.eom(macros({ i: 'Q1' }));
  assert.equal(r.verdict.kind, 'continue');
  assert.deepEqual(r.deleteHeaders, [
    { name: 'Authentication-Results', index: 1 },
    { name: 'Authentication-Results', index: 3 },
  ]);
  assert.deepEqual(r.addHeaders, [
    { name: 'Authentication-Results', value: 'mx.doorman.test;\r\n\tspf=pass smtp.mailfrom=a@tester.example', index: 0 },
    { name: 'X-Doorman-Tag', value: (r.addHeaders ?? [])[1]?.value },
  ]);
  assert.match((r.addHeaders ?? [])[1]?.value ?? '', /tagger/);
  assert.deepEqual(seen, [
    'connect 192.0.2.7:4321 milter',
    'helo client.example tls=true',
    'auth alice',
    'mail a@tester.example login=alice txn=1',
    `headers ${JSON.stringify('Subject: hi\r\nAuthentication-Results: mx.doorman.test; spf=pass\r\nAuthentication-Results: other.example;\r\n\tspf=fail\r\nAuthentication-Results:  MX.doorman.test; dkim=pass\r\n\r\n')}`,
  ]);
  assert.match(body.join(''), /^Subject: hi\r\n[\s\S]*\r\n\r\nline 1\r\n$/);
  h.close();
  const line = lines.find((l) => l.msg === 'session');
  assert.ok(line, JSON.stringify(lines));
  assert.equal(line.front, 'milter');
  assert.equal(line.client, '192.0.2.7');
  assert.equal(line.login, 'alice');
  assert.equal(line.daemon, 'smtpd');
  assert.equal(line.outcome, 'rejected');
  assert.deepEqual(line.transactions, [
    {
      from: '<a@tester.example>',
      rcpts: [
        { to: 'victim@elsewhere.example', code: 554 },
        { to: 'user@example.com', code: 250 },
      ],
      queueId: 'Q1',
      size: (line.transactions as { size: number }[])[0]?.size,
      outcome: 'passed',
    },
  ]);
});

test('several messages per connection: abort resets the transaction; results and tags do not leak into the next message', async () => {
  const txns: string[] = [];
  const rules = [
    loaded({
      name: 'spfish',
      type: 't',
      bypassable: true,
      checks: {
        mail: (ev) => (txns.push(`${ev.session.transaction} ${ev.session.authResults.length} ${ev.session.recipients.length}`), ev.sender.raw.startsWith('auth') ? { kind: 'pass', results: [{ method: 'spf', result: 'pass', props: [] }] } : { kind: 'pass' }),
        rcpt: (ev) => (ev.recipient.raw.startsWith('tag') ? { kind: 'tag', reason: 'tagged' } : { kind: 'pass' }),
      },
    } as Rule),
  ];
  const { lines, make } = rig(rules);
  const h = make();
  await h.connect(CONNECT, macros());
  await h.helo('c', macros());
  await h.mail('<auth@a.example>', [], macros());
  await h.rcpt('<tag@b.example>', [], macros());
  h.abort();
  await h.mail('<auth@a.example>', [], macros());
  await h.rcpt('<tag@b.example>', [], macros());
  await h.eoh(macros());
  const first = await h.eom(macros());
  assert.deepEqual(first.addHeaders?.map((a) => a.name), ['Authentication-Results', 'X-Doorman-Tag']);
  await h.mail('<plain@a.example>', [], macros());
  await h.rcpt('<user@b.example>', [], macros());
  await h.eoh(macros());
  const second = await h.eom(macros());
  assert.deepEqual(second.addHeaders, [], 'no results nor tags from the earlier messages');
  assert.deepEqual(txns, ['1 0 0', '2 0 0', '3 0 0']);
  h.close();
  const line = lines.find((l) => l.msg === 'session');
  assert.deepEqual(
    (line?.transactions as { from: string; outcome: string }[]).map((t) => `${t.from} ${t.outcome}`),
    ['<auth@a.example> aborted', '<auth@a.example> passed', '<plain@a.example> passed'],
  );
});

test('a refusal at connect answers every later step; a rule error follows onError; dry-run is only logged', async () => {
  const rules = [
    loaded({ name: 'dnsbl', type: 't', bypassable: true, checks: { connect: (ev) => (ev.session.client.text === '192.0.2.66' ? { kind: 'reject', reason: 'listed', reply: { code: 554, enhanced: '5.7.1', text: 'Service unavailable; client listed' } } : { kind: 'pass' }) } } as Rule),
    loaded({ name: 'broken', type: 't', bypassable: true, checks: { rcpt: (ev) => { if (ev.recipient.raw.startsWith('err')) throw new Error('boom'); return { kind: 'pass' }; } } } as Rule, 'enforce', 'tempfail'),
    loaded({ name: 'dry', type: 't', bypassable: true, checks: { mail: () => ({ kind: 'reject', reason: 'would refuse' }) } } as Rule, 'dry-run'),
  ];
  const { lines, metrics, make } = rig(rules);
  const listed = make();
  const refusal = { kind: 'reject', code: 554, enhanced: '5.7.1', text: 'Service unavailable; client listed' };
  assert.deepEqual(await listed.connect({ ...CONNECT, address: '192.0.2.66' }, macros()), refusal);
  assert.deepEqual(await listed.helo('x', macros()), refusal);
  assert.deepEqual(await listed.mail('<a@b.example>', [], macros()), refusal);
  listed.close();
  const ok = make();
  // The address from the macros when CONNECT carries none (a unix-socket client, family U).
  await ok.connect({ hostname: 'localhost', family: 'U', address: '', port: 0 }, macros({ client_addr: '192.0.2.9', client_port: '25000' }));
  await ok.helo('x', macros());
  assert.deepEqual(await ok.mail('<a@b.example>', [], macros()), { kind: 'continue' }, 'dry-run: not refused');
  const err = await ok.rcpt('<err@b.example>', [], macros());
  assert.equal(err.kind, 'tempfail');
  assert.equal((err as { code: number }).code, 451);
  ok.close();
  const sessions = lines.filter((l) => l.msg === 'session');
  assert.equal(sessions.length, 2);
  assert.equal(sessions[0]?.outcome, 'rejected');
  assert.equal(sessions[0]?.end, 'refused', 'the log line written at the refusal, not when the MTA drops the connection');
  assert.equal(sessions[1]?.client, '192.0.2.9');
  assert.equal(sessions[1]?.port, 25000);
  assert.deepEqual((sessions[1]?.rules as { rule: string; would?: string }[]).find((r) => r.rule === 'dry')?.would, 'reject');
  const rej = await metrics.registry.getSingleMetricAsString('doorman_rejections_total');
  assert.match(rej, /rule="dnsbl",stage="connect",code="554"/);
  assert.doesNotMatch(rej, /rule="dry"/);
});

test('a message cut short by ABORT is over for the body readers: the next message begins afresh', async () => {
  const messages: string[][] = [];
  const rules = [
    loaded({
      name: 'reader',
      type: 't',
      bypassable: true,
      checks: {},
      body: { begin: () => void messages.push([]), chunk: (c: Buffer) => void messages.at(-1)?.push(c.toString()), end: () => ({ kind: 'pass' }) },
    } as Rule),
  ];
  const { make } = rig(rules);
  const h = make();
  await h.connect(CONNECT, macros());
  await h.mail('<a@b.example>', [], macros());
  await h.rcpt('<u@example.com>', [], macros());
  h.header('Subject', 'one');
  await h.eoh(macros());
  await h.body(Buffer.from('first, cut short\r\n'));
  h.abort();
  await h.mail('<a@b.example>', [], macros());
  await h.rcpt('<u@example.com>', [], macros());
  h.header('Subject', 'two');
  await h.eoh(macros());
  await h.body(Buffer.from('second\r\n'));
  assert.equal((await h.eom(macros())).verdict.kind, 'continue');
  h.close();
  assert.deepEqual(messages, [
    ['Subject: one\r\n\r\n', 'first, cut short\r\n'],
    ['Subject: two\r\n\r\n', 'second\r\n'],
  ]);
});

test('a sender doorman cannot parse: no rule runs on that message, nor with the previous one\'s facts', async () => {
  const seen: string[] = [];
  const rules = [loaded({ name: 'end', type: 't', bypassable: true, checks: { data_end: (ev) => (seen.push(`data_end ${ev.session.sender?.raw}`), { kind: 'pass' }) } } as Rule)];
  const { make } = rig(rules);
  const h = make();
  await h.connect(CONNECT, macros());
  await h.mail('<a@b.example>', [], macros());
  await h.eoh(macros());
  await h.eom(macros());
  assert.deepEqual(await h.mail('<not an address>', [], macros()), { kind: 'continue' });
  await h.rcpt('<u@example.com>', [], macros());
  h.header('Subject', 'x');
  assert.deepEqual(await h.eoh(macros()), { kind: 'continue' });
  assert.deepEqual(await h.eom(macros()), { verdict: { kind: 'continue' } });
  h.close();
  assert.deepEqual(seen, ['data_end a@b.example']);
});

test('negotiation: no reply asked for the steps no rule acts on, end of header only for header or body rules; DATA keeps its reply', () => {
  const pass = () => ({ kind: 'pass' }) as const;
  const flags = (rules: LoadedRule[]) => {
    const p = milterProtocol(ruleSet(rules));
    return Object.entries(SMFIP).filter(([, bit]) => (p & bit) !== 0 && (DOORMAN_PROTOCOL & bit) === 0).map(([k]) => k).sort();
  };
  const relayOnly = [loaded({ name: 'relay', type: 't', bypassable: false, checks: { rcpt: pass } } as Rule)];
  assert.deepEqual(flags(relayOnly), ['NOEOH', 'NR_CONN', 'NR_HELO', 'NR_MAIL']);
  // The bench's rules: connect (dnsbl, ratelimit), mail (sender), rcpt (relay, ratelimit).
  const bench = [loaded({ name: 'b', type: 't', bypassable: false, checks: { connect: pass, mail: pass, rcpt: pass } } as Rule)];
  assert.deepEqual(flags(bench), ['NOEOH', 'NR_HELO']);
  // A HELO rule keeps MAIL's reply (its refusal is answered again there); auth runs at MAIL.
  assert.deepEqual(flags([loaded({ name: 'h', type: 't', bypassable: false, checks: { helo: pass } } as Rule)]), ['NOEOH', 'NR_CONN', 'NR_RCPT']);
  assert.deepEqual(flags([loaded({ name: 'a', type: 't', bypassable: false, checks: { auth: pass } } as Rule)]), ['NOEOH', 'NR_CONN', 'NR_HELO', 'NR_RCPT']);
  // A header rule or a body reader needs end of header (the header block, the body's first chunk).
  assert.deepEqual(flags([loaded({ name: 'd', type: 't', bypassable: false, checks: { data_headers: pass } } as Rule)]), ['NR_CONN', 'NR_HELO', 'NR_MAIL', 'NR_RCPT']);
  const reader = loaded({ name: 'r', type: 't', bypassable: true, checks: {}, body: { chunk: () => undefined, end: pass } } as unknown as Rule);
  assert.deepEqual(flags([reader]), ['NR_CONN', 'NR_HELO', 'NR_MAIL', 'NR_RCPT']);
  // DATA is never skipped nor left unanswered: its lone macro packet would hold the message ~40 ms (front.ts).
  for (const set of [relayOnly, bench, [reader]]) assert.equal(milterProtocol(ruleSet(set)) & (SMFIP.NODATA | SMFIP.NR_DATA), 0);
});
