/**
 * Session records (src/record/recorder.ts) and replay's pieces (src/fronts/replay.ts): lookups
 * attributed to the session whose stage made them, even when two sessions' lookups interleave;
 * sampling; the line's transactions and verdicts; replay's resolver (own answer, another
 * session's, unrecorded → SERVFAIL) and the direction of a change.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { DnsResolver } from '../../src/net/dns.js';
import type { SessionEvent, SessionSnapshot } from '../../src/pipeline/events.js';
import { EMPTY_VERDICT, type StageVerdict } from '../../src/pipeline/verdict.js';
import { reply } from '../../src/protocol/reply.js';
import { RECORD_SCHEMA, type SessionRecord } from '../../src/record/format.js';
import { Recording, recordingResolver, recordingStore } from '../../src/record/recorder.js';
import { RecordWriter } from '../../src/record/writer.js';
import { MemoryStore } from '../../src/store/store.js';
import { directionOf, RecordedResolver, type Fate } from '../../src/fronts/replay.js';
import type { RecordConfig } from '../../src/config/schema.js';
import { pathOf, snapshot as fixtureSnapshot } from '../helpers/rule-fixtures.js';

const CONFIG: RecordConfig = { dir: '', sampleRate: 1, headers: true, maxFileBytes: 1 << 20, maxFileAge: 3_600_000, maxTotalBytes: 1 << 30, maxPendingBytes: 1 << 20 };

function recording(t: { after: (fn: () => void) => void }, cfg: Partial<RecordConfig> = {}, random?: () => number): { rec: Recording; lines: () => SessionRecord[] } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-rec-unit-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const writer = new RecordWriter({ dir, maxFileBytes: 1 << 20, maxFileAge: 3_600_000, maxTotalBytes: 1 << 30, maxPendingBytes: 1 << 20 });
  const rec = new Recording({ ...CONFIG, dir, ...cfg }, writer, random);
  return {
    rec,
    lines: () =>
      fs
        .readdirSync(dir)
        .flatMap((f) => fs.readFileSync(path.join(dir, f), 'utf8').split('\n'))
        .filter(Boolean)
        .map((l) => RECORD_SCHEMA.parse(JSON.parse(l)) as SessionRecord),
  };
}

function snapshot(id: string, client: string, txn = 0): SessionSnapshot {
  return fixtureSnapshot({ id, ip: client, clientPort: 4000, listener: { name: 'smtp@127.0.0.1:25', role: 'smtp' }, helo: 'h.example', esmtp: true, transaction: txn });
}

const path_ = pathOf;

/** A resolver answering A queries after `delay` ms: listed names → 127.0.0.2, others ENOTFOUND. */
function slowResolver(listed: Set<string>, delay: () => number): DnsResolver {
  const answer = (name: string) =>
    new Promise<{ address: string; ttl: number }[]>((resolve, reject) =>
      setTimeout(() => (listed.has(name) ? resolve([{ address: '127.0.0.2', ttl: 30 }]) : reject(Object.assign(new Error('nx'), { code: 'ENOTFOUND' }))), delay()),
    );
  return {
    servers: [],
    resolve: async (name) => (await answer(name)).map((a) => a.address),
    resolveA: answer,
    resolveAAAA: answer,
    reverse: async () => ['x.example'],
  };
}

test('lookups are noted on the session whose stage made them, even interleaved', async (t) => {
  const { rec, lines } = recording(t);
  let n = 0;
  const resolver = recordingResolver(slowResolver(new Set(['2.0.0.127.bl.test']), () => (n++ % 2 ? 5 : 30)));
  const sessions = ['127.0.0.2', '127.0.0.3'].map((ip, i) => {
    const r = rec.session('smtp');
    assert.ok(r);
    return { r, ip, id: `s${i}` };
  });
  // Both sessions' connect stages start a lookup; the answers come back in the other order.
  const pending = sessions.map((s) => {
    const ev: SessionEvent = { stage: 'connect', session: snapshot(s.id, s.ip) };
    return s.r.stage(ev, () => {
      const name = `${s.ip.split('.').reverse().join('.')}.bl.test`;
      return resolver.resolveA(name).then(
        (): StageVerdict => ({ ...EMPTY_VERDICT, reply: reply(554, '5.7.1', 'listed'), decidedBy: 'dnsbl' }),
        (): StageVerdict => EMPTY_VERDICT,
      );
    });
  });
  await Promise.all(pending);
  // A lookup outside any session's stage (a self-test) is noted nowhere.
  await resolver.resolveA('2.0.0.127.bl.test');
  for (const s of sessions) s.r.end();
  await rec.close();
  const got = lines();
  assert.equal(got.length, 2);
  const by = (id: string) => got.find((l) => l.id === id);
  assert.deepEqual(by('s0')?.dns, [{ type: 'A', name: '2.0.0.127.bl.test', answer: ['127.0.0.2'], ttls: [30] }]);
  assert.deepEqual(by('s1')?.dns, [{ type: 'A', name: '3.0.0.127.bl.test', error: 'ENOTFOUND' }]);
  assert.deepEqual(by('s0')?.verdicts, [{ stage: 'connect', reply: { code: 554, enhanced: '5.7.1', text: 'listed' }, decidedBy: 'dnsbl' }]);
  assert.deepEqual(by('s1')?.verdicts, [{ stage: 'connect', reply: null, decidedBy: null }]);
});

test('store operations are noted with their key, arguments and result', async (t) => {
  const { rec, lines } = recording(t);
  const store = recordingStore(new MemoryStore(() => 1_000_000));
  const r = rec.session('policy');
  assert.ok(r);
  const ev: SessionEvent = { stage: 'connect', session: snapshot('p1', '192.0.2.7') };
  await r.stage(ev, () => {
    return store.rate('conn:192.0.2.7', 60_000, 10, 1).then(() => EMPTY_VERDICT);
  });
  r.end();
  await rec.close();
  const [line] = lines();
  assert.equal(line?.front, 'policy');
  assert.deepEqual(line?.store, [{ op: 'rate', key: 'conn:192.0.2.7', args: [60_000, 10, 1], result: { allowed: true, remaining: 9, retryAfterMs: 0, resetMs: 6000 } }]);
});

test('transactions, recipients with parameters, out-of-order verdicts and the header block', async (t) => {
  const { rec, lines } = recording(t);
  const r = rec.session('smtp');
  assert.ok(r);
  const base = snapshot('t1', '198.51.100.9', 1);
  const mail: SessionEvent = { stage: 'mail', session: base, sender: path_('a@x.example'), params: [{ key: 'SIZE', value: '100' }, { key: 'SMTPUTF8', value: null }] };
  const r1: SessionEvent = { stage: 'rcpt', session: base, recipient: path_('b@y.example'), params: [] };
  const r2: SessionEvent = { stage: 'rcpt', session: base, recipient: path_('c@y.example'), params: [{ key: 'NOTIFY', value: 'NEVER' }] };
  const hdr: SessionEvent = { stage: 'data_headers', session: base, headers: Buffer.from('Subject: caf\xe9\r\n', 'latin1'), truncated: false };
  assert.equal(r.hears('data_headers'), true);
  assert.equal(r.hears('data_end'), false);
  r.stage(mail, () => EMPTY_VERDICT);
  let answer1: (v: StageVerdict) => void = () => undefined;
  let answer2: (v: StageVerdict) => void = () => undefined;
  const p1 = r.stage(r1, () => new Promise<StageVerdict>((res) => (answer1 = res)));
  const p2 = r.stage(r2, () => new Promise<StageVerdict>((res) => (answer2 = res)));
  // Pipelined: the second recipient's verdict comes first.
  answer2(EMPTY_VERDICT);
  await p2;
  answer1({ ...EMPTY_VERDICT, reply: reply(450, '4.7.1', 'later'), decidedBy: 'greylist' });
  await p1;
  r.stage(hdr, () => EMPTY_VERDICT);
  r.stage({ stage: 'data_end', session: base, size: 1234 }, () => EMPTY_VERDICT);
  r.end();
  await rec.close();
  const [line] = lines();
  assert.deepEqual(line?.session.transactions, [
    { from: 'a@x.example', fromParams: { SIZE: '100', SMTPUTF8: '' }, rcpts: [{ to: 'b@y.example' }, { to: 'c@y.example', params: { NOTIFY: 'NEVER' } }], headers: 'Subject: caf\xe9\r\n', size: 1234 },
  ]);
  assert.deepEqual(
    line?.verdicts.map((v) => [v.stage, v.txn, v.rcpt, v.decidedBy]),
    [
      ['mail', 0, undefined, null],
      ['rcpt', 0, 1, null],
      ['rcpt', 0, 0, 'greylist'],
      ['data_headers', 0, undefined, null],
      ['data_end', 0, undefined, null],
    ],
  );
});

test('sampleRate: 0 records no session, 0.5 those the draw lets in', (t) => {
  assert.equal(recording(t, { sampleRate: 0 }).rec.session('smtp'), null);
  const draws = [0.2, 0.7, 0.49, 0.5];
  const { rec } = recording(t, { sampleRate: 0.5 }, () => draws.shift() ?? 1);
  assert.deepEqual(
    [1, 2, 3, 4].map(() => rec.session('smtp') !== null),
    [true, false, true, false],
  );
});

function rec(time: string, dns: SessionRecord['dns']): SessionRecord {
  return { v: 1, time, id: time, front: 'smtp', role: 'smtp', session: { client: '192.0.2.1', listener: 'smtp', tls: false, login: null, helo: null, esmtp: true, transactions: [] }, verdicts: [], dns, store: [] };
}

test('replay DNS: the own answer, else the nearest earlier session\'s, else SERVFAIL (counted)', async () => {
  const a = rec('2026-12-01T10:00:00Z', [{ type: 'A', name: 'x.bl.test', answer: ['127.0.0.2'], ttls: [60] }]);
  const b = rec('2026-12-01T10:05:00Z', [{ type: 'A', name: 'x.bl.test', error: 'ENOTFOUND' }]);
  const c = rec('2026-12-01T10:10:00Z', [{ type: 'TXT', name: 'example.org', answer: [['v=spf1 -all']] }]);
  const r = new RecordedResolver([a, b, c]);
  r.use(a);
  assert.deepEqual(await r.resolveA('x.bl.test'), [{ address: '127.0.0.2', ttl: 60 }]);
  r.use(c);
  // Not its own: b's, the latest before c.
  await assert.rejects(r.resolveA('X.BL.TEST.'), (e: { code?: string }) => e.code === 'ENOTFOUND');
  assert.deepEqual(await r.resolve('example.org', 'TXT'), [['v=spf1 -all']]);
  await assert.rejects(r.resolveA('y.bl.test'), (e: { code?: string }) => e.code === 'ESERVFAIL');
  assert.deepEqual(r.counts, { own: 2, otherSessions: 1, unrecorded: 1 });
  assert.deepEqual([...r.unrecordedQueries], ['A y.bl.test']);
});

test('replay: the direction of a change', () => {
  const ok: Fate = { code: null, enhanced: '', text: '', rule: null, stage: null };
  const r554: Fate = { code: 554, enhanced: '5.7.1', text: 'no', rule: 'relay', stage: 'rcpt' };
  const r554b: Fate = { ...r554, rule: 'dnsbl' };
  const t450: Fate = { code: 450, enhanced: '4.7.1', text: 'later', rule: 'greylist', stage: 'rcpt' };
  assert.equal(directionOf(ok, ok), null);
  assert.equal(directionOf(r554, { ...r554, text: 'other text' }), null);
  assert.equal(directionOf(ok, r554), 'accepted → refused');
  assert.equal(directionOf(ok, t450), 'accepted → tempfailed');
  assert.equal(directionOf(r554, ok), 'refused → accepted');
  assert.equal(directionOf(t450, ok), 'tempfailed → accepted');
  assert.equal(directionOf(r554, t450), '5xx → 4xx');
  assert.equal(directionOf(t450, r554), '4xx → 5xx');
  assert.equal(directionOf(r554, r554b), 'other refusal');
});
