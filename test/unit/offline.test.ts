// The offline session runner (src/fronts/offline.ts): a described session through the one
// pipeline without a socket, with the SMTP session's stage order and semantics, each stage's
// findings, and the conversation a client would see. Rules from real rule files (access, relay)
// plus small hand-made ones where a test needs to see what the rules were handed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { loadRuleSet, type RuleSet } from '../../src/config/rules.js';
import { OfflineInputError, runOffline, type OfflineDeps, type SessionInput } from '../../src/fronts/offline.js';
import { createMetrics } from '../../src/metrics/registry.js';
import type { SessionEvent } from '../../src/pipeline/events.js';
import type { LoadedRule } from '../../src/pipeline/loaded.js';
import { PASS, type Finding, type Rule } from '../../src/pipeline/rule.js';
import { RULE_TYPES } from '../../src/rules/index.js';
import { ruleDeps } from '../helpers/rule-fixtures.js';

const LISTENERS = [
  { name: 'smtp@0.0.0.0:25', role: 'smtp' as const },
  { name: 'sub', role: 'submission' as const },
];

/** A rule set from rule files written to a temporary folder. */
function ruleSet(files: Record<string, string>): RuleSet {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-offline-'));
  try {
    for (const [name, text] of Object.entries(files)) fs.writeFileSync(path.join(dir, name), text);
    return loadRuleSet(dir, ruleDeps(), RULE_TYPES, { listeners: LISTENERS });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** A rule set with hand-made rules added after the files' (in that order). */
function withRules(set: RuleSet, ...rules: { rule: Rule; action?: LoadedRule['action'] }[]): RuleSet {
  const extra: LoadedRule[] = rules.map(({ rule, action }) => ({ rule, action: action ?? 'enforce', onError: 'pass', timeout: 1000, file: `${rule.name}.yaml` }));
  const all = [...set.rules, ...extra];
  const stages = new Set(set.stages);
  for (const { rule } of rules) {
    for (const st of Object.keys(rule.checks)) stages.add(st as never);
    if (rule.body) stages.add('data_end');
  }
  return { ...set, rules: all, stages };
}

function deps(rules: RuleSet, lines: object[] = []): OfflineDeps {
  const log = pino({ level: 'info' }, { write: (l: string) => void lines.push(JSON.parse(l) as object) });
  return { rules, metrics: createMetrics({ version: 't', defaults: false }), log, hostname: 'mx.test', listeners: LISTENERS };
}

const SITE = 'localDomains: [example.com]\nrelayNetworks: []\n';
const ACCESS = `rule: access
settings:
  clients:
    - deny: 192.0.2.0/24
      reply: "554 5.7.1 Access denied"
  recipients:
    - allow: postmaster@
`;

function input(over: Partial<SessionInput> = {}): SessionInput {
  return {
    client: '198.51.100.7',
    listener: 'smtp@0.0.0.0:25',
    tls: false,
    login: null,
    helo: 'mx.example.net',
    esmtp: true,
    transactions: [{ from: 'a@example.net', rcpts: [{ to: 'b@example.com' }] }],
    ...over,
  };
}

test('a clean session: every stage passes, the conversation as the client reads it, accepted', async () => {
  const set = ruleSet({ 'site.yaml': SITE, 'access.yaml': ACCESS, 'relay.yaml': 'rule: relay\n' });
  const lines: object[] = [];
  const r = await runOffline(input(), deps(set, lines));
  assert.equal(r.result, 'accepted');
  assert.equal(r.refusedAt, null);
  assert.deepEqual(
    r.conversation.map((c) => [c.client ?? '', c.server]),
    [
      ['', '220 mx.test ESMTP'],
      ['EHLO mx.example.net', '250 mx.test'],
      ['MAIL FROM:<a@example.net>', '250 2.1.0 Ok'],
      ['RCPT TO:<b@example.com>', '250 2.1.5 Ok'],
      ['QUIT', '221 2.0.0 mx.test closing connection'],
    ],
  );
  // The stages some rule acts on, each with its rules' findings.
  assert.deepEqual(
    r.stages.map((s) => [s.stage, s.outcomes.map((o) => `${o.rule}:${o.finding}`).join(',')]),
    [
      ['connect', 'access:pass'],
      ['mail', 'relay:pass'],
      ['rcpt', 'access:pass,relay:pass'],
    ],
  );
  assert.deepEqual(r.transactions, [
    { from: 'a@example.net', mail: { code: 250, enhanced: '2.1.0', text: 'Ok' }, rcpts: [{ to: 'b@example.com', reply: { code: 250, enhanced: '2.1.5', text: 'Ok' }, result: 'accepted', decidedBy: null }], data: null, tags: [], result: 'accepted' },
  ]);
  // One log line for the session, from the explain front.
  const line = lines.find((l) => (l as { msg?: string }).msg === 'session') as Record<string, unknown> | undefined;
  assert.equal(line?.front, 'explain');
  assert.equal(line?.client, '198.51.100.7');
});

test('refused at connect with a 5xx: 554 instead of the greeting, only QUIT answered, nothing else evaluated', async () => {
  const set = ruleSet({ 'site.yaml': SITE, 'access.yaml': ACCESS, 'relay.yaml': 'rule: relay\n' });
  const r = await runOffline(input({ client: '192.0.2.9' }), deps(set));
  assert.equal(r.result, 'refused');
  assert.equal(r.refusedAt, 'connect');
  assert.deepEqual(r.conversation, [{ server: '554 5.7.1 Access denied' }, { client: 'QUIT', server: '221 2.0.0 mx.test closing connection' }]);
  assert.deepEqual(r.stages.map((s) => s.stage), ['connect']);
  assert.equal(r.stages[0]?.decidedBy, 'access');
  assert.deepEqual(r.transactions[0]?.rcpts, [{ to: 'b@example.com', reply: null, result: 'refused', decidedBy: null }]);
});

test('refused at connect with a 4xx (action tempfail): 421 and the connection closes', async () => {
  const set = ruleSet({ 'site.yaml': SITE, 'access.yaml': `action: tempfail\n${ACCESS}` });
  const r = await runOffline(input({ client: '192.0.2.9' }), deps(set));
  assert.equal(r.result, 'tempfailed');
  assert.deepEqual(r.conversation, [{ server: '421 4.7.1 Access denied' }]);
});

test('a refused HELO leaves the client without one: MAIL gets 503', async () => {
  const set = ruleSet({ 'site.yaml': SITE, 'helo.yaml': 'rule: helo\n' });
  const r = await runOffline(input({ helo: 'nodots' }), deps(set));
  assert.equal(r.refusedAt, 'helo');
  assert.equal(r.result, 'refused');
  assert.deepEqual(
    r.conversation.map((c) => c.server.slice(0, 3)),
    ['220', '504', '503', '221'],
  );
  assert.equal(r.stages.at(-1)?.decidedBy, 'helo');
  assert.equal(r.transactions[0]?.mail?.code, 503);
});

test('per recipient: a refused one is answered alone and is not in the snapshot of later stages; an accept lasts for its recipient only', async () => {
  const seen: string[][] = [];
  const watcher: Rule = {
    name: 'watcher',
    type: 'test',
    bypassable: true,
    checks: {
      rcpt: (ev) => (ev.recipient.local === 'third' ? { kind: 'reject', reason: 'watched' } : PASS),
      data_headers: (ev) => {
        seen.push(ev.session.recipients.map((p) => p.raw));
        return PASS;
      },
    },
  };
  const set = withRules(ruleSet({ 'site.yaml': SITE, 'access.yaml': ACCESS, 'relay.yaml': 'rule: relay\n' }), { rule: watcher });
  const r = await runOffline(
    input({ transactions: [{ from: 'a@example.net', rcpts: [{ to: 'x@other.example' }, { to: 'postmaster@example.com' }, { to: 'third@example.com' }, { to: 'b@example.com' }], headers: 'Subject: hi\r\n' }] }),
    deps(set),
  );
  const t = r.transactions[0];
  assert.deepEqual(
    t?.rcpts.map((x) => [x.to, x.reply?.code, x.decidedBy]),
    [
      ['x@other.example', 554, 'relay'],
      ['postmaster@example.com', 250, null],
      // postmaster's allow was for postmaster: the next recipient goes through the bypassable rules again.
      ['third@example.com', 550, 'watcher'],
      ['b@example.com', 250, null],
    ],
  );
  assert.deepEqual(seen, [['postmaster@example.com', 'b@example.com']]);
  assert.equal(t?.data?.evaluated, 'headers');
  assert.equal(t?.result, 'accepted');
  assert.equal(r.result, 'refused', 'the worst answer of the session');
  assert.ok(r.conversation.some((c) => c.client === 'DATA' && c.server.startsWith('354')));
});

test('a message: header block to data_headers, the whole message to the body readers, its size to data_end; a data_end refusal is the final reply', async () => {
  const got: { headers?: string; body: Buffer[]; size?: number } = { body: [] };
  const reader: Rule = {
    name: 'reader',
    type: 'test',
    bypassable: true,
    checks: {
      data_headers: (ev) => {
        got.headers = ev.headers.toString('latin1');
        return PASS;
      },
    },
    body: {
      chunk: (c) => void got.body.push(Buffer.from(c)),
      end: (ev): Finding => {
        got.size = ev.size;
        return { kind: 'reject', reason: 'spam', reply: { code: 550, enhanced: '5.7.1', text: 'Message rejected as spam' } };
      },
    },
  };
  const set = withRules(ruleSet({ 'site.yaml': SITE }), { rule: reader });
  const message = Buffer.from('Subject: hi\r\nFrom: a@example.net\r\n\r\nbody\r\n.dot line\r\n');
  const r = await runOffline(input({ transactions: [{ from: 'a@example.net', rcpts: [{ to: 'b@example.com' }], message }] }), deps(set));
  assert.equal(got.headers, 'Subject: hi\r\nFrom: a@example.net\r\n');
  assert.equal(Buffer.concat(got.body).toString(), message.toString(), 'the message as it is (no dot-unstuffing)');
  assert.equal(got.size, message.length);
  assert.equal(r.result, 'refused');
  assert.deepEqual(r.transactions[0]?.data, { reply: { code: 550, enhanced: '5.7.1', text: 'Message rejected as spam' }, decidedBy: 'reader', evaluated: 'message' });
  assert.deepEqual(r.conversation.at(-2), { client: `(the message, ${message.length} bytes) .`, server: '550 5.7.1 Message rejected as spam' });
});

test('a dry-run rule that answers late is waited for: its finding is listed, the reply unchanged', async () => {
  const slow: Rule = {
    name: 'slow',
    type: 'test',
    bypassable: true,
    checks: { connect: () => new Promise<Finding>((r) => setTimeout(() => r({ kind: 'reject', reason: 'listed' }), 30)) },
  };
  const set = withRules(ruleSet({ 'site.yaml': SITE }), { rule: slow, action: 'dry-run' });
  const r = await runOffline(input(), deps(set));
  const o = r.stages[0]?.outcomes[0];
  assert.equal(o?.rule, 'slow');
  assert.equal(o?.finding, 'reject');
  assert.equal(o?.wouldBe, 'reject');
  assert.equal(o?.effect, 'none');
  assert.equal(r.result, 'accepted');
});

test('AUTH: the rules see the login before the session is authenticated; passed, later stages see it', async () => {
  const seen: (string | null)[] = [];
  const rule: Rule = {
    name: 'authwatch',
    type: 'test',
    bypassable: false,
    checks: {
      auth: (ev) => {
        seen.push(`auth ${ev.login} ${ev.session.auth === null ? 'unauthenticated' : 'authenticated'}`);
        return PASS;
      },
      mail: (ev) => {
        seen.push(`mail ${ev.session.auth?.login ?? null}`);
        return PASS;
      },
    },
  };
  const set = withRules(ruleSet({ 'site.yaml': SITE }), { rule });
  const r = await runOffline(input({ login: 'alice', listener: 'submission', tls: true }), deps(set));
  assert.deepEqual(seen, ['auth alice unauthenticated', 'mail alice']);
  assert.equal(r.listener.name, 'sub', 'a role names its first listener');
  assert.deepEqual(r.conversation[2], { client: 'AUTH PLAIN (login alice)', server: '235 2.7.0 Authentication successful', assumed: true });
});

test('input that cannot describe a session names its field', async () => {
  const set = ruleSet({ 'site.yaml': SITE });
  const cases: [Partial<SessionInput>, string][] = [
    [{ client: '300.1.2.3' }, 'client'],
    [{ client: 'localhost' }, 'client'],
    [{ listener: 'nope' }, 'listener'],
    [{ helo: 'two words' }, 'helo'],
    [{ transactions: [{ from: 'a b@example.net', rcpts: [] }] }, 'from'],
    [{ transactions: [{ from: 'a@example.net', rcpts: [{ to: 'b@' }] }] }, 'rcpt'],
  ];
  for (const [over, field] of cases) {
    await assert.rejects(runOffline(input(over), deps(set)), (e: unknown) => e instanceof OfflineInputError && e.field === field, JSON.stringify(over));
  }
});

test('several transactions: after one whose recipients were all refused the client sends RSET', async () => {
  const set = ruleSet({ 'site.yaml': SITE, 'relay.yaml': 'rule: relay\n' });
  const r = await runOffline(
    input({
      transactions: [
        { from: 'a@example.net', rcpts: [{ to: 'x@other.example' }] },
        { from: '', rcpts: [{ to: 'b@example.com' }] },
      ],
    }),
    deps(set),
  );
  assert.deepEqual(
    r.conversation.map((c) => c.client ?? ''),
    ['', 'EHLO mx.example.net', 'MAIL FROM:<a@example.net>', 'RCPT TO:<x@other.example>', 'RSET', 'MAIL FROM:<>', 'RCPT TO:<b@example.com>', 'QUIT'],
  );
  assert.deepEqual(r.transactions.map((t) => t.result), ['refused', 'accepted']);
  const events: SessionEvent['stage'][] = r.stages.map((s) => s.stage);
  assert.deepEqual(events, ['mail', 'rcpt', 'mail', 'rcpt']);
});
