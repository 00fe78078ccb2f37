/**
 * The pipeline as a front drives it (openPipeline → attach to a session's events): the sync fast
 * path, tiers, cancellation at the session's end, runner-owned rule state, dry-run checks left
 * detached, and the message body as chunks under back-pressure. Rule types are defined here.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Observable, Subject, timer, map } from 'rxjs';
import { openPipeline, type LoadedRule, type PipelineHooks } from '../../src/pipeline/run.js';
import type { SessionEvent, SessionSnapshot } from '../../src/pipeline/events.js';
import type { Finding, Rule } from '../../src/pipeline/rule.js';
import type { RuleOutcome, StageVerdict } from '../../src/pipeline/verdict.js';
import { snapshot } from '../helpers/rule-fixtures.js';

const loaded = (rule: Rule, opts: Partial<LoadedRule> = {}): LoadedRule => ({ rule, action: 'enforce', onError: 'pass', timeout: 1000, file: `${rule.name}.yaml`, ...opts });
const reject = (reason = 'bad'): Finding => ({ kind: 'reject', reason });

/** A session as a front: its events Subject, its end signal, and the pipeline following them. */
function session(rules: readonly LoadedRule[], hooks: PipelineHooks = {}, id = 's') {
  const events$ = new Subject<SessionEvent>();
  const ended = new AbortController();
  const pipe = openPipeline(rules, hooks).attach(events$, ended.signal);
  const snap: SessionSnapshot = snapshot({ id, ended: ended.signal });
  const emit = (ev: SessionEvent): StageVerdict | Promise<StageVerdict> => {
    events$.next(ev);
    return pipe.verdict(ev);
  };
  return {
    pipe,
    snap,
    connect: () => emit({ stage: 'connect', session: snap }),
    helo: (name = 'mail.example.org') => emit({ stage: 'helo', session: { ...snap, helo: name }, verb: 'EHLO', name }),
    dataEnd: (size = 0) => emit({ stage: 'data_end', session: snap, size }),
    end: () => {
      ended.abort();
      events$.complete();
    },
  };
}

async function until(cond: () => boolean, ms = 2000): Promise<void> {
  const t0 = Date.now();
  while (!cond() && Date.now() - t0 < ms) await new Promise((r) => setTimeout(r, 2));
  assert.ok(cond(), 'condition never met');
}

test('sync fast path: a stage whose rules answer at once gives its verdict as a value; none at all costs nothing', () => {
  const r: Rule = { name: 'm', type: 't', bypassable: false, checks: { connect: () => reject() } };
  const s = session([loaded(r)]);
  const v = s.connect();
  assert.ok(!(v instanceof Promise), 'no Promise, no microtask hop');
  assert.equal(v.reply?.code, 554);
  const none = s.helo();
  assert.ok(!(none instanceof Promise));
  assert.deepEqual(none.outcomes, [], 'no rule at helo');
});

test('deadline: a check slower than its timeout is its onError outcome (the timeout operator)', async () => {
  const r: Rule = { name: 'slow', type: 't', bypassable: true, checks: { connect: () => timer(200).pipe(map(() => reject())) } };
  const errors: string[] = [];
  const v = await session([loaded(r, { timeout: 20, onError: 'tempfail' })], { onRuleError: (n, k) => errors.push(`${n}:${k}`) }).connect();
  assert.equal(v.reply?.code, 421);
  assert.deepEqual(errors, ['slow:timeout']);
});

test('tiers: bypassable rules are not asked when a rule that is not bypassable refused', async () => {
  let asked = 0;
  const hard: Rule = { name: 'acl', type: 't', bypassable: false, checks: { connect: () => Promise.resolve(reject('deny')) } };
  const soft: Rule = { name: 'dns', type: 't', bypassable: true, checks: { connect: () => (asked++, Promise.resolve<Finding>({ kind: 'pass' })) } };
  const v = await session([loaded(hard), loaded(soft)]).connect();
  assert.equal(v.decidedBy, 'acl');
  assert.equal(asked, 0, 'second tier skipped');
  const ok: Rule = { ...hard, checks: { connect: () => ({ kind: 'pass' }) } };
  const w = await session([loaded(ok), loaded(soft)]).connect();
  assert.equal(asked, 1, 'second tier asked when the first passed');
  assert.deepEqual(w.outcomes.map((o) => o.rule), ['acl', 'dns']);
});

test('concurrency: the checks of a tier are all subscribed before any answers', async () => {
  const subscribed: string[] = [];
  const mk = (name: string): Rule => ({
    name, type: 't', bypassable: true,
    checks: { connect: () => new Observable<Finding>((o) => { subscribed.push(name); const t = setTimeout(() => { o.next({ kind: 'pass' }); o.complete(); }, 20); return () => clearTimeout(t); }) },
  });
  const t0 = performance.now();
  const v = session(['a', 'b', 'c'].map((n) => loaded(mk(n)))).connect();
  assert.deepEqual(subscribed, ['a', 'b', 'c']);
  await v;
  assert.ok(performance.now() - t0 < 55, 'ran side by side, not one after the other');
});

test('cancellation: when the session ends, a pending check is unsubscribed at once (its teardown runs)', async () => {
  let torn = 0;
  let promiseSettledLate = false;
  const hang: Rule = { name: 'dns', type: 't', bypassable: true, checks: { connect: () => new Observable<Finding>(() => () => void torn++) } };
  const slow: Rule = {
    name: 'redis', type: 't', bypassable: true,
    checks: { connect: () => new Promise<Finding>((r) => setTimeout(() => { promiseSettledLate = true; r(reject()); }, 50)) },
  };
  const s = session([loaded(hang, { timeout: 10_000 }), loaded(slow, { timeout: 10_000 })]);
  const v = s.connect();
  assert.ok(v instanceof Promise);
  let settled = false;
  void v.then(() => (settled = true));
  assert.equal(torn, 0);
  s.end();
  assert.equal(torn, 1, 'teardown ran synchronously at the end');
  await new Promise((r) => setTimeout(r, 80));
  assert.ok(promiseSettledLate, 'the Promise itself did settle later');
  assert.equal(settled, false, 'but nobody waited for it: the verdict never came');
});

test('state: created at first use, handed to each call, end hook once with the last snapshot, then dropped', () => {
  const created: string[] = [];
  const ended: [string, string | null][] = [];
  const r: Rule<{ id: string; seen: string[] }> = {
    name: 'st', type: 't', bypassable: true,
    session: (snap) => (created.push(snap.id), { id: snap.id, seen: [] }),
    end: (st, snap) => ended.push([st.seen.join(','), snap.helo]),
    checks: {
      helo: (ev, st) => (st.seen.push(ev.stage), { kind: 'pass' }),
      data_end: (ev, st) => (st.seen.push(ev.stage), { kind: 'pass' }),
    },
  };
  const s = session([loaded(r as Rule)], {}, 'a');
  s.connect();
  assert.deepEqual(created, [], 'not at a stage the rule does not act on');
  s.helo('one.example');
  s.dataEnd();
  assert.deepEqual(created, ['a'], 'created once');
  s.end();
  assert.equal(ended.length, 1, 'end hook called once');
  assert.deepEqual(ended[0], ['helo,data_end', null], 'the state it was handed; the last snapshot (data_end\'s)');
  s.end();
  assert.equal(ended.length, 1, 'not twice');
  // A session that never used the rule: no state, no end hook.
  const t = session([loaded(r as Rule)], {}, 'b');
  t.connect();
  t.end();
  assert.deepEqual(created, ['a']);
  assert.equal(ended.length, 1);
  // Another session gets a state of its own.
  const u = session([loaded(r as Rule)], {}, 'c');
  u.helo();
  u.end();
  assert.deepEqual(created, ['a', 'c']);
  assert.equal(ended[1]?.[0], 'helo');
});

test('dry-run checks stay detached: not awaited, handed over late, not cancelled; end hooks wait for them', async () => {
  const late: RuleOutcome[] = [];
  let ends = 0;
  const dry: Rule = {
    name: 'dry', type: 't', bypassable: true,
    session: () => ({}),
    end: () => void ends++,
    checks: { connect: () => timer(30).pipe(map(() => reject('late'))) },
  };
  const s = session([loaded(dry, { action: 'dry-run' })], { late: (o) => late.push(o), maxPendingDryRun: 1 });
  const v = s.connect();
  assert.ok(!(v instanceof Promise), 'the stage did not wait');
  s.end();
  assert.equal(ends, 0, 'the end hook waits for the dry-run check');
  await until(() => late.length === 1);
  assert.equal(late[0]?.wouldBe, 'reject');
  assert.equal(ends, 1);
  // Past maxPendingDryRun, the stage waits like for any rule.
  const t = session([loaded(dry, { action: 'dry-run' })], { late: (o) => late.push(o), maxPendingDryRun: 0 });
  const w = t.connect();
  assert.ok(w instanceof Promise);
  assert.equal((await w).outcomes[0]?.wouldBe, 'reject');
});

/** A body rule: counts the bytes it reads, refuses above `max`; `delay` ms per chunk. */
function counter(max: number, delay = 0, seen: Buffer[] = []): Rule<{ bytes: number }> {
  return {
    name: delay ? 'slow-body' : 'size', type: 't', bypassable: true, checks: {},
    session: () => ({ bytes: 0 }),
    body: {
      chunk: (c, st) => {
        seen.push(c);
        if (!delay) return void (st.bytes += c.length);
        return new Promise<void>((r) => setTimeout(() => r(void (st.bytes += c.length)), delay));
      },
      end: (_ev, st) => (st.bytes > max ? { kind: 'reject', reason: `${st.bytes} bytes` } : { kind: 'pass' }),
    },
  };
}

test('body: readers get the unstuffed chunks; the finding counts at data_end', async () => {
  const seen: Buffer[] = [];
  const unstuff = () => (cs: readonly Buffer[]) => cs.map((c) => Buffer.from(c.toString().replace(/^\.\./gm, '.')));
  const s = session([loaded(counter(10, 0, seen) as Rule)], { unstuff });
  assert.ok(s.pipe.wantsBody);
  s.connect();
  assert.equal(s.pipe.body([Buffer.from('Subject: x\r\n\r\n')], false), undefined, 'a reader that keeps up: no wait');
  s.pipe.body([Buffer.from('..dot\r\n')], true);
  assert.equal(seen[1]?.toString(), '.dot\r\n', 'unstuffed');
  const v = await s.dataEnd();
  assert.equal(v.decidedBy, 'size');
  assert.match(v.outcomes[0]?.reason ?? '', /20 bytes/);
  const small = session([loaded(counter(100) as Rule)]);
  small.connect();
  small.pipe.body([Buffer.from('hi\r\n')], true);
  assert.equal((await small.dataEnd()).reply, null);
  const none = session([]);
  assert.equal(none.pipe.wantsBody, false);
  assert.equal(none.pipe.body([Buffer.from('x')], true), undefined, 'no body rule: nothing done');
});

test('body: back-pressure — past maxBodyLag the feed waits for a slow reader; data_end waits until it has read all', async () => {
  const s = session([loaded(counter(1 << 20, 15) as Rule, { timeout: 5000 })], { maxBodyLag: 10 });
  s.connect();
  const chunk = Buffer.alloc(8, 'a');
  assert.equal(s.pipe.body([chunk], false), undefined, '8 bytes behind: within the bound');
  const wait = s.pipe.body([chunk], false);
  assert.ok(wait instanceof Promise, '16 bytes behind: the front must wait');
  let released = false;
  void wait.then(() => (released = true));
  await new Promise((r) => setTimeout(r, 5));
  assert.equal(released, false, 'still lagging');
  await wait;
  s.pipe.body([chunk], true);
  const t0 = performance.now();
  const v = await s.dataEnd();
  assert.ok(performance.now() - t0 >= 10, 'the verdict waited for the last chunk to be read');
  assert.equal(v.outcomes[0]?.finding, 'pass');
  assert.equal(v.outcomes[0]?.rule, 'slow-body');
});

test('body: a session that ends mid-message drops its readers', async () => {
  let reads = 0;
  const r = counter(1 << 20, 20);
  const reader = r.body!;
  const counting: Rule<{ bytes: number }> = { ...r, body: { ...reader, chunk: (c, st) => (reads++, reader.chunk(c, st)) } };
  const s = session([loaded(counting as Rule)], { maxBodyLag: 1 << 20 });
  s.connect();
  s.pipe.body([Buffer.from('a'), Buffer.from('b'), Buffer.from('c')], false);
  assert.equal(reads, 1, 'one chunk at a time');
  s.end();
  await new Promise((res) => setTimeout(res, 60));
  assert.equal(reads, 1, 'the queued chunks are never read');
});

test('body: begin is called once per message, before its first chunk, with the snapshot the front hands over', async () => {
  const calls: string[] = [];
  const rule: Rule<{ n: number }> = {
    name: 'begins', type: 't', bypassable: true, checks: {},
    session: () => ({ n: 0 }),
    body: {
      begin: (snap, st) => void calls.push(`begin ${snap.recipients.length} rcpt, state ${st.n}`),
      chunk: (c, st) => void (calls.push(`chunk ${c.toString()}`), st.n++),
      end: () => ({ kind: 'pass' }),
    },
  };
  const s = session([loaded(rule as Rule)]);
  s.connect();
  const at = { ...s.snap, recipients: [{ raw: 'a@example.com' }, { raw: 'b@example.com' }] } as unknown as SessionSnapshot;
  s.pipe.body([Buffer.from('one'), Buffer.from('two')], false, () => at);
  s.pipe.body([Buffer.from('three')], true, () => at);
  // The next message begins again: one refused or cut short never reached its end.
  s.pipe.body([Buffer.from('four')], true, () => s.snap);
  await s.dataEnd();
  assert.deepEqual(calls, ['begin 2 rcpt, state 0', 'chunk one', 'chunk two', 'chunk three', 'begin 0 rcpt, state 3', 'chunk four']);
});

test('body: a reader whose begin throws reads nothing and holds nothing back; its error is its finding', async () => {
  let reads = 0;
  const rule: Rule = {
    name: 'broken', type: 't', bypassable: true, checks: {},
    body: {
      begin: () => {
        throw new Error('cannot connect');
      },
      chunk: () => void reads++,
      end: () => ({ kind: 'pass' }),
    },
  };
  const s = session([loaded(rule)], { maxBodyLag: 4 });
  s.connect();
  assert.equal(s.pipe.body([Buffer.alloc(16)], true, () => s.snap), undefined, 'no lag: no wait');
  const v = await s.dataEnd();
  assert.equal(reads, 0);
  assert.equal(v.outcomes[0]?.finding, 'error');
  assert.match(v.outcomes[0]?.reason ?? '', /cannot connect/);
});

test('body: a reader that data_end will not ask is not fed (allowlisted and bypassable, or out of scope)', async () => {
  const fed: string[] = [];
  const reader = (name: string, bypassable: boolean): Rule => ({
    name, type: 't', bypassable, checks: {},
    body: {
      begin: () => void fed.push(`${name} begin`),
      chunk: () => void fed.push(`${name} chunk`),
      end: () => ({ kind: 'pass' }),
    },
  });
  const outOfScope = { listeners: new Set(['submission']) };
  const s = session([loaded(reader('soft', true)), loaded(reader('hard', false)), loaded(reader('scoped', false), { scope: outOfScope })]);
  s.connect();
  const allowlisted = { ...s.snap, acceptedBy: 'access' };
  s.pipe.body([Buffer.from('x')], true, () => allowlisted);
  await new Promise((r) => setTimeout(r, 5));
  assert.deepEqual(fed, ['hard begin', 'hard chunk']);
  fed.length = 0;
  s.pipe.body([Buffer.from('y')], true, () => s.snap);
  await new Promise((r) => setTimeout(r, 5));
  assert.deepEqual(fed, ['soft begin', 'hard begin', 'soft chunk', 'hard chunk']);
});
