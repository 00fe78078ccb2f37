import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NEVER, of, throwError, EMPTY, timer, map } from 'rxjs';
import { evaluate, type LoadedRule } from '../../src/pipeline/run.js';
import type { SessionEvent, SessionSnapshot } from '../../src/pipeline/events.js';
import type { Finding, FindingResult, Rule } from '../../src/pipeline/rule.js';
import { combine, type RuleOutcome } from '../../src/pipeline/verdict.js';
import { parseAddress } from '../../src/net/ip.js';
import { createMetrics } from '../../src/metrics/registry.js';

const session: SessionSnapshot = {
  id: 't', client: parseAddress('192.0.2.1'), clientPort: 1, listener: { name: 'l', role: 'smtp' }, localAddress: '127.0.0.1',
  tls: false, helo: null, esmtp: false, auth: null, transaction: 0, sender: null, recipients: [], recipientsForwarded: 0, acceptedBy: null, authResults: [],
  ended: new AbortController().signal,
};
const ev = (acceptedBy: string | null = null): SessionEvent => ({ stage: 'connect', session: { ...session, acceptedBy } });

function rule(name: string, check: () => FindingResult, opts: Partial<LoadedRule> & { bypassable?: boolean } = {}): LoadedRule {
  const r: Rule = { name, type: 'test', checks: { connect: check }, bypassable: opts.bypassable ?? true };
  return { rule: r, action: 'enforce', onError: 'pass', timeout: 100, file: `${name}.yaml`, ...opts };
}
const reject = (reason = 'bad'): Finding => ({ kind: 'reject', reason });
/** Waits until `cond` holds (polling every 2 ms, at most 2 s). */
async function until(cond: () => boolean): Promise<void> {
  for (let i = 0; i < 1000 && !cond(); i++) await new Promise((r) => setTimeout(r, 2));
  assert.ok(cond(), 'condition never met');
}

test('no applicable rule: a synchronous empty verdict (no Promise on the hot path)', () => {
  const v = evaluate([], ev());
  assert.ok(!(v instanceof Promise));
  assert.equal((v as { reply: unknown }).reply, null);
});

test('values, Promises and Observables are all findings; the first value counts', async () => {
  for (const check of [() => reject(), () => Promise.resolve(reject()), () => of(reject(), { kind: 'pass' } as Finding)]) {
    const v = await evaluate([rule('r', check)], ev());
    assert.equal(v.reply?.code, 554, 'connect-stage default reply');
    assert.equal(v.decidedBy, 'r');
  }
});

test('a rule that throws, rejects, errors or times out fails open by default and is counted', async () => {
  const metrics = createMetrics({ version: 't', defaults: false });
  const errors: string[] = [];
  const cases: [string, () => FindingResult][] = [
    ['sync', () => { throw new Error('boom'); }],
    ['promise', () => Promise.reject(new Error('boom'))],
    ['observable', () => throwError(() => new Error('boom'))],
    ['hang', () => NEVER],
    ['promise-hang', () => new Promise<Finding>(() => undefined)],
    ['slow', () => timer(500).pipe(map(() => reject()))],
  ];
  for (const [name, check] of cases) {
    const v = await evaluate([rule(name, check)], ev(), { metrics, onRuleError: (r, kind) => errors.push(`${r}:${kind}`) });
    assert.equal(v.reply, null, name);
    assert.ok(['error', 'timeout'].includes(v.outcomes[0]?.finding ?? ''), name);
  }
  assert.deepEqual(errors, ['sync:error', 'promise:error', 'observable:error', 'hang:timeout', 'promise-hang:timeout', 'slow:timeout']);
  const text = await metrics.registry.getSingleMetricAsString('doorman_rule_errors_total');
  assert.match(text, /rule="hang",kind="timeout"} 1/);
});

test('an Observable that completes empty is a pass', async () => {
  const v = await evaluate([rule('e', () => EMPTY)], ev());
  assert.equal(v.reply, null);
  assert.equal(v.outcomes[0]?.finding, 'pass');
});

test('onError: tempfail turns a crash into 421 4.3.0 at connect', async () => {
  const v = await evaluate([rule('t', () => { throw new Error('x'); }, { onError: 'tempfail' })], ev());
  assert.equal(v.reply?.code, 421);
  assert.equal(v.reply?.enhanced, '4.3.0');
});

test('onError: tempfail is 454 4.3.0 at AUTH (RFC 4954 has no 451) and 451 4.3.0 at RCPT', async () => {
  const crash = () => {
    throw new Error('store down');
  };
  const at = (stage: 'auth' | 'rcpt'): LoadedRule => ({ ...rule('t', crash, { onError: 'tempfail' }), rule: { name: 't', type: 'test', checks: { [stage]: crash }, bypassable: true } });
  const auth = await evaluate([at('auth')], { stage: 'auth', session, mechanism: 'PLAIN', login: null } as unknown as SessionEvent);
  assert.deepEqual([auth.reply?.code, auth.reply?.enhanced], [454, '4.3.0']);
  const rcpt = await evaluate([at('rcpt')], { stage: 'rcpt', session } as unknown as SessionEvent);
  assert.deepEqual([rcpt.reply?.code, rcpt.reply?.enhanced], [451, '4.3.0']);
});

test('actions: dry-run never refuses, tempfail softens 5xx to 4xx, tag adds a header', async () => {
  const dry = await evaluate([rule('d', () => reject(), { action: 'dry-run' })], ev());
  assert.equal(dry.reply, null);
  assert.equal(dry.outcomes[0]?.wouldBe, 'reject');
  const soft = await evaluate([rule('s', () => ({ kind: 'reject', reason: 'x', reply: { code: 550, enhanced: '5.7.1', text: 'no' } }), { action: 'tempfail' })], { stage: 'mail', session } as unknown as SessionEvent);
  // stage mail is not in the rule's stages: nothing runs
  assert.equal(soft.reply, null);
  const r: Rule = { name: 'm', type: 't', checks: { mail: () => ({ kind: 'reject', reason: 'x', reply: { code: 550, enhanced: '5.7.1', text: 'no' } }) }, bypassable: true };
  const v = await evaluate([{ rule: r, action: 'tempfail', onError: 'pass', timeout: 100, file: 'm' }], { stage: 'mail', session, sender: { raw: '' }, params: [] } as unknown as SessionEvent);
  assert.equal(v.reply?.code, 450);
  assert.equal(v.reply?.enhanced, '4.7.1');
  const tag = await evaluate([rule('g', () => reject('odd'), { action: 'tag' })], ev());
  assert.equal(tag.reply, null);
  assert.deepEqual(tag.tags, ['g; odd']);
});

test('precedence: hard refusals, then accept, then bypassable refusals; 5xx before 4xx', () => {
  const o = (rule: string, effect: RuleOutcome['effect'], code: number, bypassable: boolean): RuleOutcome => ({
    rule, stage: 'rcpt', finding: effect === 'accept' ? 'accept' : 'reject', action: 'enforce', effect, bypassable, ms: 0,
    ...(code ? { reply: { code, enhanced: code >= 500 ? '5.7.1' : '4.7.1', lines: ['x'], closes: false } } : {}),
  });
  assert.equal(combine([o('soft4', 'tempfail', 450, true), o('soft5', 'reject', 550, true)], null).decidedBy, 'soft5');
  assert.equal(combine([o('allow', 'accept', 0, false), o('soft5', 'reject', 550, true)], null).decidedBy, null);
  assert.equal(combine([o('allow', 'accept', 0, false), o('hard', 'tempfail', 450, false), o('soft5', 'reject', 550, true)], null).decidedBy, 'hard');
  assert.equal(combine([o('soft5', 'reject', 550, true)], 'earlier-allow').decidedBy, null, 'a session allowlisted earlier');
  assert.equal(combine([o('first', 'reject', 550, false), o('second', 'reject', 554, false)], null).decidedBy, 'first', 'ties: rule order');
});

test('rules of a stage run concurrently: each is started before any has finished', async () => {
  const started: string[] = [];
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const check = (name: string) => async (): Promise<Finding> => {
    started.push(name);
    if (started.length === 3) release();
    await gate; // sequential evaluation would never get past the first rule
    return { kind: 'pass' };
  };
  const v = await evaluate([rule('a', check('a'), { timeout: 1000 }), rule('b', check('b'), { timeout: 1000 }), rule('c', check('c'), { timeout: 1000 })], ev());
  assert.deepEqual(started, ['a', 'b', 'c']);
  assert.deepEqual(v.outcomes.map((o) => o.finding), ['pass', 'pass', 'pass']);
});

test('allowlisted sessions skip bypassable rules entirely', async () => {
  let called = 0;
  const v = await evaluate([rule('b', () => { called++; return reject(); })], ev('access'));
  assert.equal(called, 0);
  assert.equal(v.reply, null);
});

test('rules that all answer at once are combined at once; one slow rule in the tier makes it wait for all', async () => {
  const metrics = createMetrics({ version: 't', defaults: false });
  const sync = evaluate([rule('a', () => ({ kind: 'pass' })), rule('b', () => reject('now'))], ev(), { metrics });
  assert.ok(!(sync instanceof Promise), 'no Promise when every rule answered synchronously');
  assert.equal((sync as { decidedBy: string | null }).decidedBy, 'b');
  const mixed = evaluate([rule('a', () => ({ kind: 'pass' })), rule('c', () => timer(20).pipe(map(() => reject('later'))))], ev(), { metrics });
  assert.ok(mixed instanceof Promise);
  assert.equal((await mixed).decidedBy, 'c');
  // The same evaluations are counted on both paths.
  const text = await metrics.registry.getSingleMetricAsString('doorman_rule_evaluations_total');
  assert.match(text, /rule="a",stage="connect",outcome="pass"} 2/);
  assert.match(text, /rule="b",stage="connect",outcome="reject"} 1/);
  assert.match(text, /rule="c",stage="connect",outcome="reject"} 1/);
});

test('a rule that returns no finding is that rule’s error, not the session’s', async () => {
  const errors: string[] = [];
  const v = await evaluate([rule('broken', () => undefined as unknown as Finding)], ev(), { onRuleError: (r, kind) => errors.push(`${r}:${kind}`) });
  assert.equal(v.reply, null, 'fails open (onError: pass)');
  assert.equal(v.outcomes[0]?.finding, 'error');
  assert.deepEqual(errors, ['broken:error']);
});

test('a refused event is told to every rule of the stage (refunds); a passed one to none', async () => {
  const told: string[] = [];
  const spender = (name: string, check: () => FindingResult, opts: Partial<LoadedRule> = {}): LoadedRule => {
    const lr = rule(name, check, opts);
    return { ...lr, rule: { ...lr.rule, refused: () => told.push(name) } };
  };
  const e = ev();
  await evaluate([spender('grey', () => Promise.resolve({ kind: 'tempfail', reason: 'grey' })), spender('rate', () => Promise.resolve({ kind: 'pass' }))], e);
  assert.deepEqual(told, ['grey', 'rate'], 'both hear the refusal, once');
  told.length = 0;
  await evaluate([spender('rate', () => Promise.resolve({ kind: 'pass' }))], ev());
  assert.deepEqual(told, [], 'nothing on the common path');
  const dry = evaluate([spender('rate', () => ({ kind: 'pass' })), spender('d', () => reject(), { action: 'dry-run' })], ev());
  assert.ok(!(dry instanceof Promise), 'still synchronous');
  assert.deepEqual(told, [], 'a dry-run refusal refuses nothing');
  const thrower = { ...spender('t', () => reject()), rule: { ...rule('t', () => reject()).rule, refused: () => { throw new Error('bug'); } } };
  const v = await evaluate([thrower, spender('rate', () => ({ kind: 'pass' }))], ev());
  assert.equal(v.reply?.code, 554, 'a throwing hook does not fail the stage');
  assert.deepEqual(told, ['rate']);
});

test('a dry-run rule that has not answered is not waited for: its outcome is handed over when it arrives', async () => {
  const metrics = createMetrics({ version: 't', defaults: false });
  let answer!: (f: Finding) => void;
  const slowDry = rule('dry', () => new Promise<Finding>((r) => (answer = r)), { action: 'dry-run', timeout: 60_000 });
  const slowObs = rule('dry-obs', () => timer(30).pipe(map(() => reject('obs'))), { action: 'dry-run' });
  const late: RuleOutcome[] = [];
  const v = evaluate([rule('now', () => ({ kind: 'pass' })), slowDry, slowObs], ev(), { metrics, late: (o) => late.push(o) });
  assert.ok(!(v instanceof Promise), 'the stage is decided without the dry-run rules');
  assert.deepEqual((v as { outcomes: readonly RuleOutcome[] }).outcomes.map((o) => o.rule), ['now']);
  assert.equal(late.length, 0, 'none in yet');
  answer(reject('slow'));
  await until(() => late.length === 2);
  const a = late.find((o) => o.rule === 'dry');
  const b = late.find((o) => o.rule === 'dry-obs');
  assert.deepEqual([a?.rule, a?.effect, a?.wouldBe, a?.reason], ['dry', 'none', 'reject', 'slow']);
  assert.deepEqual([b?.rule, b?.effect, b?.wouldBe], ['dry-obs', 'none', 'reject']);
  const text = await metrics.registry.getSingleMetricAsString('doorman_rule_evaluations_total');
  assert.match(text, /rule="dry",stage="connect",outcome="dry_run"} 1/);
  // Without the hook (a caller at its bound of checks left running) dry-run rules are waited for.
  const waited = evaluate([rule('dry', () => Promise.resolve(reject('slow')), { action: 'dry-run' })], ev());
  assert.ok(waited instanceof Promise);
  assert.equal((await waited).outcomes[0]?.wouldBe, 'reject');
  // An enforcing rule just as slow is waited for.
  const enforcing = evaluate([rule('slow', () => timer(30).pipe(map(() => reject('x'))))], ev(), { late: () => assert.fail('enforcing rules are awaited') });
  assert.ok(enforcing instanceof Promise);
  assert.equal((await enforcing).reply?.code, 554);
});

test('a late dry-run rule still meets its timeout (an error outcome, counted)', async () => {
  const errors: string[] = [];
  const late: RuleOutcome[] = [];
  evaluate([rule('hang', () => new Promise<Finding>(() => undefined), { action: 'dry-run', timeout: 20 })], ev(), { late: (o) => late.push(o), onRuleError: (r, k) => errors.push(`${r}:${k}`) });
  await until(() => late.length === 1);
  assert.equal(late[0]?.finding, 'timeout');
  assert.deepEqual(errors, ['hang:timeout']);
});

test('start: work begun at one stage for a verdict at a later one, never waited for', async () => {
  const calls: string[] = [];
  let lookup: Promise<Finding> | null = null;
  const r: Rule = {
    name: 'dns', type: 't', bypassable: true,
    starts: {
      connect: (e) => {
        calls.push(`start:${e.stage}`);
        lookup = new Promise((res) => setTimeout(() => res(reject('listed')), 20));
      },
    },
    checks: {
      rcpt: (e) => {
        calls.push(`check:${e.stage}`);
        return lookup ?? { kind: 'pass' };
      },
    },
  };
  const lr: LoadedRule = { rule: r, action: 'enforce', onError: 'pass', timeout: 1000, file: 'dns.yaml' };
  const atConnect = evaluate([lr], ev());
  assert.ok(!(atConnect instanceof Promise), 'nothing to wait for at connect');
  assert.equal((atConnect as { reply: unknown }).reply, null);
  const v = await evaluate([lr], { stage: 'rcpt', session, recipient: { raw: '' }, params: [] } as unknown as SessionEvent);
  assert.deepEqual(calls, ['start:connect', 'check:rcpt']);
  assert.equal(v.reply?.code, 550);
  // A throwing start is the rule's error, with its onError.
  const broken: Rule = { ...r, starts: { connect: () => { throw new Error('boom'); } } };
  const b = await evaluate([{ ...lr, rule: broken, onError: 'tempfail' }], ev());
  assert.equal(b.reply?.code, 421);
  assert.equal(b.outcomes[0]?.finding, 'error');
});

test('authentication results: every answering rule’s, in rule order, whatever its action; a late dry-run one’s with its outcome and event', async () => {
  const spf = { method: 'spf', result: 'pass', props: [['smtp.mailfrom', 'a@b.example']] } as const;
  const dkim = { method: 'dkim', result: 'fail', props: [['header.d', 'b.example']] } as const;
  const dmarc = { method: 'dmarc', result: 'fail', props: [['header.from', 'b.example']] } as const;
  const v = await evaluate(
    [
      rule('a', () => ({ kind: 'pass', results: [spf] })),
      rule('b', () => Promise.resolve<Finding>({ kind: 'reject', reason: 'x', results: [dkim] }), { action: 'tag' }),
      rule('c', () => ({ kind: 'tempfail', reason: 'y', results: [dmarc] }), { action: 'dry-run' }),
      rule('d', () => ({ kind: 'pass' })),
    ],
    ev(),
  );
  assert.deepEqual(v.results, [spf, dkim, dmarc]);
  assert.deepEqual(v.outcomes.map((o) => o.results?.length ?? 0), [1, 1, 1, 0]);
  assert.deepEqual(combine([], null).results, []);
  // A dry-run rule that answers after the stage's verdict: its results reach the late hook, with the event.
  const late: [RuleOutcome, SessionEvent][] = [];
  const e = ev();
  const now = evaluate([rule('dry', () => timer(10).pipe(map((): Finding => ({ kind: 'pass', results: [spf] }))), { action: 'dry-run' })], e, {
    late: (o, event) => late.push([o, event]),
  });
  assert.ok(!(now instanceof Promise));
  assert.deepEqual((now as { results: unknown }).results, []);
  await until(() => late.length === 1);
  assert.deepEqual(late[0]?.[0].results, [spf]);
  assert.equal(late[0]?.[1], e);
});
