// `doorman explain`'s own parts (src/fronts/explain.ts): its options (both spellings, a repeated
// --rcpt, what each bad one says), the session they describe, a --message file's line ends, and
// the printed explanation of a report from the offline runner.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import type { RuleSet } from '../../src/config/rules.js';
import { ExplainInputError, explainInput, formatExplanation, parseExplainArgs, readMessage } from '../../src/fronts/explain.js';
import { runOffline } from '../../src/fronts/offline.js';
import { createMetrics } from '../../src/metrics/registry.js';
import type { LoadedRule } from '../../src/pipeline/loaded.js';
import type { Rule } from '../../src/pipeline/rule.js';

test('options: --name value and --name=value, --rcpt repeated, flags', () => {
  const o = parseExplainArgs(['--ip=192.0.2.7', '--helo', 'mx.example.net', '--from', '<>', '--rcpt', 'b@example.com', '--rcpt=c@example.com', '--tls', '--json', '--listener', 'submission', '--login', 'alice']);
  assert.deepEqual(o, { ip: '192.0.2.7', helo: 'mx.example.net', from: '<>', rcpts: ['b@example.com', 'c@example.com'], listener: 'submission', login: 'alice', tls: true, message: null, json: true });
  assert.deepEqual(explainInput(o, 'smtp@x', undefined), {
    client: '192.0.2.7',
    listener: 'submission',
    tls: true,
    login: 'alice',
    helo: 'mx.example.net',
    esmtp: true,
    transactions: [{ from: '<>', rcpts: [{ to: 'b@example.com' }, { to: 'c@example.com' }] }],
  });
  assert.equal(explainInput(parseExplainArgs(['--ip', '::1']), 'smtp@x', undefined).listener, 'smtp@x', 'the default listener');
});

test('bad options name themselves', () => {
  const cases: [string[], string, RegExp][] = [
    [[], '--ip', /required/],
    [['--ip', '192.0.2.999'], '--ip', /not an IP address/],
    [['--ip', '192.0.2.7', '--helo'], '--helo', /needs a value/],
    [['--ip', '192.0.2.7', '--ip', '192.0.2.8'], '--ip', /given twice/],
    [['--ip', '192.0.2.7', '--tls=yes'], '--tls', /takes no value/],
    [['--ip', '192.0.2.7', '--rcpt', 'b@example.com'], '--from', /recipients need a sender/],
    [['--ip', '192.0.2.7', '--frmo', 'a@b'], '--frmo', /unknown option/],
  ];
  for (const [args, option, message] of cases) {
    assert.throws(() => parseExplainArgs(args), (e: unknown) => e instanceof ExplainInputError && e.option === option && message.test(e.message), args.join(' '));
  }
});

test('a --message file: LF line ends become CRLF, CRLF stays; a missing file names --message', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-explain-unit-'));
  try {
    const f = path.join(dir, 'm.eml');
    fs.writeFileSync(f, 'A: 1\nB: 2\r\n\nbody\n');
    assert.equal(readMessage(f).toString(), 'A: 1\r\nB: 2\r\n\r\nbody\r\n');
    assert.throws(() => readMessage(path.join(dir, 'none.eml')), (e: unknown) => e instanceof ExplainInputError && e.option === '--message' && /ENOENT/.test(e.message));
    assert.throws(() => readMessage(dir), (e: unknown) => e instanceof ExplainInputError && /not a file/.test(e.message));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('the printed explanation: each rule per stage, the decision, the conversation with assumed answers marked', async () => {
  const rule: Rule = {
    name: 'limits',
    type: 't',
    bypassable: true,
    checks: { auth: () => ({ kind: 'tempfail', reason: 'too many logins', reply: { code: 454, enhanced: '4.7.0', text: 'Try later' } }), rcpt: () => ({ kind: 'pass' }) },
  };
  const lr: LoadedRule = { rule, action: 'enforce', onError: 'pass', timeout: 1000, file: 'limits.yaml' };
  const rules = { rules: [lr], stages: new Set(['auth', 'rcpt']), version: 'v1', files: [], site: {}, warnings: [] } as unknown as RuleSet;
  const input = explainInput(parseExplainArgs(['--ip', '192.0.2.7', '--helo', 'mx.example.net', '--login', 'alice', '--from', 'a@example.net', '--rcpt', 'b@example.com']), 'smtp@0.0.0.0:25', undefined);
  const report = await runOffline(input, { rules, metrics: createMetrics({ version: 't', defaults: false }), log: pino({ level: 'silent' }), hostname: 'mx.test', listeners: [{ name: 'smtp@0.0.0.0:25', role: 'smtp' }] });
  // A refused AUTH leaves the session unauthenticated; it is the session's worst answer.
  assert.equal(report.result, 'tempfailed');
  assert.equal(
    formatExplanation(report, input, { rulesDir: '/r', version: 'v1', store: 'memory' }),
    `Session: client 192.0.2.7, listener smtp@0.0.0.0:25 (smtp), EHLO mx.example.net, no TLS, login alice
Rules: /r (version v1); store: memory, looked at only (nothing counted)

auth
  limits  tempfail  action enforce   effect tempfail  reason: too many logins  reply: 454 4.7.0 Try later
  → decided by limits: 454 4.7.0 Try later

rcpt TO:<b@example.com>
  limits  pass      action enforce   effect none
  → passed

Conversation (as the client would see it):
  S: 220 mx.test ESMTP
  C: EHLO mx.example.net
  S: 250 mx.test    (the backend's answer, assumed)
  C: AUTH PLAIN (login alice)
  S: 454 4.7.0 Try later
  C: MAIL FROM:<a@example.net>
  S: 250 2.1.0 Ok
  C: RCPT TO:<b@example.com>
  S: 250 2.1.5 Ok    (the backend's answer, assumed)
  C: QUIT
  S: 221 2.0.0 mx.test closing connection

Result: tempfailed (exit 2)
`,
  );
});
