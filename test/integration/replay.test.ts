/**
 * Session records and `doorman replay` end to end (issue 18): real sessions from swaks on several
 * 127.0.0.x addresses → doorman (relay and dnsbl rules, `record:` on) → Postfix smtp-sink, with
 * a real rbldnsd listing some of the clients. The records hold one line per session with what the
 * rules saw and the verdicts; replaying them against the unchanged rules finds no difference;
 * against changed rules exactly the affected sessions, in the right direction, per rule. The
 * record files rotate at their size limit; sampleRate 0 writes nothing.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { ROOT, startDoorman } from '../helpers/doorman.js';
import { startRbldnsd, type Rbldnsd } from '../helpers/rbldnsd.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { swaks } from '../helpers/swaks.js';
import { useCleanup } from '../helpers/procs.js';
import type { SessionRecord } from '../../src/record/format.js';
import type { ReplayReport } from '../../src/fronts/replay.js';

useCleanup();
const BIN = path.join(ROOT, 'bin', 'doorman.js');

let rbl: Rbldnsd;
let sink: Sink;
let work: string;
let recordDir: string;
let records: SessionRecord[];
let recordFileNames: string[];
let written = 0;
let dropped = 0;

/** A rules folder: site.yaml, relay, dnsbl (verdict at RCPT, so the envelope is recorded). */
function rulesDir(name: string, o: { localDomains: string[]; threshold: number; extra?: Record<string, string> }): string {
  const dir = path.join(work, name);
  fs.mkdirSync(dir);
  fs.writeFileSync(path.join(dir, 'site.yaml'), `localDomains: [${o.localDomains.join(', ')}]\nrelayNetworks: [127.0.0.10/32]\ntrustedNetworks: []\n`);
  fs.writeFileSync(path.join(dir, 'relay.yaml'), 'rule: relay\naction: enforce\n');
  fs.writeFileSync(
    path.join(dir, 'dnsbl.yaml'),
    `rule: dnsbl\nsettings:\n  stage: rcpt\n  threshold: ${o.threshold}\n  zones:\n    - zone: bl.test\n      weight: 1\n`,
  );
  for (const [f, t] of Object.entries(o.extra ?? {})) fs.writeFileSync(path.join(dir, f), t);
  return dir;
}

function run(args: string[]): Promise<{ code: number; out: string; err: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args], { env: { PATH: process.env.PATH ?? '' }, cwd: os.tmpdir(), maxBuffer: 16 << 20 }, (e, stdout, stderr) => {
      resolve({ code: e ? (typeof e.code === 'number' ? e.code : 1) : 0, out: stdout, err: stderr });
    });
  });
}

/** One swaks session: client address, sender, recipients (comma-separated). */
const send = (client: string, from: string, to: string) =>
  swaks(['--server', `127.0.0.1:${port}`, '--local-interface', client, '--from', from, '--to', to, '--helo', `h${client.split('.').pop()}.example.org`]);

let port = 0;
let origRules: string;

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-replay-'));
  recordDir = path.join(work, 'records');
  rbl = await startRbldnsd([{ name: 'bl.test', type: 'ip4set', lines: [':127.0.0.2:Listed', '127.0.0.2', '127.0.0.66', '127.0.0.67'] }]);
  sink = await startSink();
  origRules = rulesDir('orig', { localDomains: ['example.com'], threshold: 1 });
  const dm = await startDoorman({
    backendPort: sink.port,
    env: { DOORMAN_DNS_SERVERS: rbl.server, DOORMAN_RULES: origRules },
    config: `record:\n  dir: ${recordDir}\n  headers: true\n  maxFileBytes: 4096\n`,
  });
  port = dm.port;
  try {
    // Accepted: a local recipient from outside; a relay client sending anywhere.
    for (const c of ['127.0.0.20', '127.0.0.21']) assert.equal((await send(c, 'a@sender.example', 'b@example.com')).status, 0);
    assert.equal((await send('127.0.0.10', 'relay@example.com', 'x@foreign.example')).status, 0);
    // Relay-refused: a foreign recipient from an outside client (one session also with a local one).
    const relayed = await send('127.0.0.30', 'c@sender.example', 'x@foreign.example');
    assert.match(relayed.out, /554 5\.7\.1 <x@foreign\.example>: Relay access denied/);
    const mixed = await send('127.0.0.31', 'd@sender.example', 'y@foreign.example,ok@example.com');
    assert.match(mixed.out, /Relay access denied/);
    // DNSBL-refused: listed clients.
    for (const c of ['127.0.0.66', '127.0.0.67']) assert.match((await send(c, 'e@sender.example', 'b@example.com')).out, /554 5\.7\.1 Service unavailable; client \[127\.0\.0\.6[67]\] blocked using bl\.test/);
    // The same listed client again: the dnsbl rule answers from its cache (no lookup of its own).
    assert.match((await send('127.0.0.66', 'f@sender.example', 'b@example.com')).out, /blocked using bl\.test/);
    await dm.waitSessions(8);
    written = await dm.metric('doorman_records_written_total');
    dropped = await dm.metric('doorman_records_dropped_total');
  } finally {
    // Stopping flushes what is still queued.
    await dm.stop();
  }
  recordFileNames = fs.readdirSync(recordDir).sort();
  records = recordFileNames.flatMap((f) =>
    fs
      .readFileSync(path.join(recordDir, f), 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as SessionRecord),
  );
});

after(async () => {
  await rbl?.stop();
  await sink?.stop();
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

test('one record per session: what the rules saw, the verdicts, the DNS answers', () => {
  assert.equal(records.length, 8);
  const byClient = (c: string) => records.filter((r) => r.session.client === c);
  for (const r of records) {
    assert.equal(r.v, 1);
    assert.equal(r.front, 'smtp');
    assert.equal(r.role, 'smtp');
    assert.ok(!Number.isNaN(Date.parse(r.time)));
    assert.match(r.id, /^[0-9a-z]+$/);
    assert.equal(r.session.esmtp, true);
    assert.equal(r.session.tls, false);
    assert.equal(r.session.login, null);
    assert.equal(r.session.transactions.length, 1);
  }
  const ok = byClient('127.0.0.20')[0];
  assert.ok(ok);
  assert.equal(ok.session.helo, 'h20.example.org');
  assert.deepEqual(
    ok.session.transactions.map((t) => ({ from: t.from, rcpts: t.rcpts.map((x) => x.to) })),
    [{ from: 'a@sender.example', rcpts: ['b@example.com'] }],
  );
  // The header block, asked for (record.headers); never the body.
  assert.match(ok.session.transactions[0]?.headers ?? '', /^Date: /m);
  assert.ok(!JSON.stringify(ok).includes('This is a test mailing'));
  // No rule acts at data_end: that stage is neither evaluated nor recorded.
  assert.equal(ok.session.transactions[0]?.size, undefined);
  // Each stage's verdict; the dnsbl lookup of the client, with its answer.
  assert.deepEqual(
    ok.verdicts.map((v) => [v.stage, v.txn, v.rcpt, v.reply]),
    [
      ['connect', undefined, undefined, null],
      ['helo', undefined, undefined, null],
      ['mail', 0, undefined, null],
      ['rcpt', 0, 0, null],
      ['data_headers', 0, undefined, null],
    ],
  );
  assert.deepEqual(ok.dns, [{ type: 'A', name: '20.0.0.127.bl.test', error: 'ENOTFOUND' }]);

  const mixed = byClient('127.0.0.31')[0];
  const rcpts = mixed?.verdicts.filter((v) => v.stage === 'rcpt');
  assert.deepEqual(
    rcpts?.map((v) => [v.rcpt, v.decidedBy, v.reply?.code, v.reply?.enhanced]),
    [
      [0, 'relay', 554, '5.7.1'],
      [1, null, undefined, undefined],
    ],
  );
  const listed = byClient('127.0.0.66');
  assert.equal(listed.length, 2);
  assert.deepEqual(listed[0]?.dns, [{ type: 'A', name: '66.0.0.127.bl.test', answer: ['127.0.0.2'], ttls: [60] }]);
  // The second session got the answer from the rule's cache: no lookup of its own.
  assert.deepEqual(listed[1]?.dns, []);
  assert.deepEqual(
    listed.map((r) => r.verdicts.find((v) => v.stage === 'rcpt')?.decidedBy),
    ['dnsbl', 'dnsbl'],
  );
});

test('records are counted, none dropped; the files rotate at maxFileBytes', () => {
  assert.equal(written, 8);
  assert.equal(dropped, 0);
  assert.ok(recordFileNames.length >= 2, `files: ${recordFileNames.join(' ')}`);
  for (const f of recordFileNames) {
    assert.match(f, /^records-\d{8}T\d{9}Z-\d+-\d{4}\.jsonl$/);
    assert.ok(fs.statSync(path.join(recordDir, f)).size <= 4096, f);
  }
});

test('replay against the unchanged rules: no difference, exit 0', async () => {
  const r = await run(['replay', recordDir, '--rules', origRules]);
  assert.equal(r.code, 0, r.out + r.err);
  assert.match(r.out, /^replayed 8 sessions \(8 transactions, 9 recipients\) from \d+ files? against the rules in /);
  assert.match(r.out, /\nno difference\n/);
  // Every lookup of a session is answered from the records (the second session of 127.0.0.66 gets
  // the answer from the rule's cache, as it did live); the DNSBL self-test at load is not recorded:
  // SERVFAIL leaves the zone in use.
  assert.match(r.out, /DNS: 7 answers from the session's own record, 0 from another session's, 1 unrecorded \(answered SERVFAIL\)\n {2}unrecorded: A 2\.0\.0\.127\.bl\.test\n/);
});

test('replay against a changed rule set: exactly the affected sessions, refused → accepted, per rule; exit 1', async () => {
  const changed = rulesDir('changed', { localDomains: ['example.com', 'foreign.example'], threshold: 2 });
  const r = await run(['replay', ...recordFileNames.map((f) => path.join(recordDir, f)), '--rules', changed, '--json']);
  assert.equal(r.code, 1, r.out + r.err);
  const rep = JSON.parse(r.out) as ReplayReport;
  assert.equal(rep.sessions, 8);
  assert.deepEqual(rep.changed, { sessions: 5, transactions: 5, recipients: 5 });
  const summary = rep.changes.map((c) => [c.direction, c.rule, c.sessions, c.transactions, c.recipients]);
  assert.deepEqual(summary, [
    ['refused → accepted', 'dnsbl', 3, 3, 3],
    ['refused → accepted', 'relay', 2, 2, 2],
  ]);
  const relay = rep.changes.find((c) => c.rule === 'relay');
  assert.deepEqual(relay?.examples.map((e) => [e.client, e.rcpt]).sort(), [
    ['127.0.0.30', 'x@foreign.example'],
    ['127.0.0.31', 'y@foreign.example'],
  ]);
  assert.match(relay?.examples[0]?.old ?? '', /^554 5\.7\.1 <.+>: Relay access denied \(relay at rcpt\)$/);
  assert.equal(relay?.examples[0]?.new, 'accepted');
  const dnsbl = rep.changes.find((c) => c.rule === 'dnsbl');
  assert.deepEqual([...new Set(dnsbl?.examples.map((e) => e.client))].sort(), ['127.0.0.66', '127.0.0.67']);

  // The same as text.
  const t = await run(['replay', recordDir, '--rules', changed]);
  assert.equal(t.code, 1);
  assert.match(t.out, /changed: 5 sessions, 5 transactions, 5 recipients/);
  assert.match(t.out, /refused → accepted, rule dnsbl: 3 sessions, 3 transactions, 3 recipients/);
  assert.match(t.out, /refused → accepted, rule relay: 2 sessions, 2 transactions, 2 recipients\n {2}127\.0\.0\.3[01] from <[cd]@sender\.example> to <[xy]@foreign\.example>\n {4}was: 554 5\.7\.1 .*Relay access denied \(relay at rcpt\)\n {4}now: accepted/);
});

test('replay the other way: a tighter rule set, accepted → refused and another rule refusing', async () => {
  // No local domain any more: outside clients' local recipients are refused by relay now.
  const tighter = rulesDir('tighter', { localDomains: [], threshold: 1 });
  const r = await run(['replay', recordDir, '--rules', tighter, '--json']);
  assert.equal(r.code, 1, r.out + r.err);
  const rep = JSON.parse(r.out) as ReplayReport;
  const summary = rep.changes.map((c) => [c.direction, c.rule, c.sessions, c.recipients]);
  assert.deepEqual(summary, [
    // .20, .21 and the local recipient of .31.
    ['accepted → refused', 'relay', 3, 3],
    // The listed clients: refused by relay (checked first) instead of dnsbl.
    ['other refusal', 'relay', 3, 3],
  ]);
  assert.match(rep.changes[0]?.examples[0]?.old ?? '', /^accepted$/);
  assert.match(rep.changes[0]?.examples[0]?.new ?? '', /^554 5\.7\.1 .*Relay access denied \(relay at rcpt\)$/);
});

test('replay: bad input exits 3 naming it', async () => {
  const bad = path.join(work, 'bad.jsonl');
  fs.writeFileSync(bad, `${JSON.stringify(records[0])}\n{"v":1,"time":"x"}\n`);
  const r = await run(['replay', bad, '--rules', origRules]);
  assert.equal(r.code, 3);
  assert.match(r.err, /bad\.jsonl:2: not a session record/);
  const missing = await run(['replay', path.join(work, 'nope.jsonl'), '--rules', origRules]);
  assert.equal(missing.code, 3);
  assert.match(missing.err, /nope\.jsonl/);
  const noRules = await run(['replay', recordDir]);
  assert.equal(noRules.code, 3);
  assert.match(noRules.err, /--rules DIR is required/);
});

test('sampleRate 0 records nothing', async () => {
  const dir = path.join(work, 'sampled');
  const dm = await startDoorman({
    backendPort: sink.port,
    env: { DOORMAN_DNS_SERVERS: rbl.server, DOORMAN_RULES: origRules },
    config: `record:\n  dir: ${dir}\n  sampleRate: 0\n`,
  });
  try {
    port = dm.port;
    assert.equal((await send('127.0.0.20', 'a@sender.example', 'b@example.com')).status, 0);
    await dm.waitSessions(1);
    assert.equal(await dm.metric('doorman_records_written_total'), 0);
  } finally {
    await dm.stop();
  }
  assert.deepEqual(fs.existsSync(dir) ? fs.readdirSync(dir) : [], []);
});

test('the policy front records its sessions too, and they replay', async () => {
  const dir = path.join(work, 'policy-records');
  const dm = await startDoorman({
    backendPort: sink.port,
    listen: 'policy://127.0.0.1:{PORT}',
    env: { DOORMAN_DNS_SERVERS: rbl.server, DOORMAN_RULES: origRules },
    config: `record:\n  dir: ${dir}\n`,
  });
  const attrs = { request: 'smtpd_access_policy', protocol_state: 'RCPT', client_address: '127.0.0.40', client_port: '40000', helo_name: 'p.example.org', sender: 'p@sender.example', recipient: 'z@foreign.example', instance: 'rec.1' };
  let answer = '';
  try {
    answer = await new Promise<string>((resolve, reject) => {
      const s = net.connect(dm.port, '127.0.0.1');
      let data = '';
      const t = setTimeout(() => reject(new Error(`no answer: ${data}`)), 5000);
      s.on('data', (d) => {
        data += d.toString();
        if (data.includes('\n\n')) {
          clearTimeout(t);
          s.destroy();
          resolve(data);
        }
      });
      s.on('error', reject);
      s.on('connect', () => s.write(Object.entries(attrs).map(([k, v]) => `${k}=${v}\n`).join('') + '\n'));
    });
  } finally {
    // Stopping ends the open policy transaction: its record is written and flushed.
    await dm.stop();
  }
  assert.equal(answer, 'action=554 5.7.1 Relay access denied\n\n');
  const lines = fs.readdirSync(dir).flatMap((f) => fs.readFileSync(path.join(dir, f), 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as SessionRecord));
  assert.equal(lines.length, 1);
  assert.equal(lines[0]?.front, 'policy');
  assert.equal(lines[0]?.role, 'policy');
  assert.deepEqual(lines[0]?.session.transactions, [{ from: 'p@sender.example', rcpts: [{ to: 'z@foreign.example' }] }]);
  assert.equal(lines[0]?.verdicts.find((v) => v.stage === 'rcpt')?.decidedBy, 'relay');
  const changed = fs.existsSync(path.join(work, 'changed')) ? path.join(work, 'changed') : rulesDir('changed', { localDomains: ['example.com', 'foreign.example'], threshold: 2 });
  const r = await run(['replay', dir, '--rules', changed, '--json']);
  assert.equal(r.code, 1, r.out + r.err);
  const rep = JSON.parse(r.out) as ReplayReport;
  assert.deepEqual(
    rep.changes.map((c) => [c.direction, c.rule, c.sessions, c.recipients]),
    [['refused → accepted', 'relay', 1, 1]],
  );
});
