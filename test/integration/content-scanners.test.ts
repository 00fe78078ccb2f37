/**
 * The content scanners over their real protocols: rspamd (HTTP /checkv2), SpamAssassin's spamd
 * (SYMBOLS) and clamd (INSTREAM), each a real daemon started by the test on loopback
 * (test/helpers/scanners.ts), doorman in front of smtp-sink. GTUBE and EICAR are refused with the
 * scanner's verdict, a clean message is delivered, a score over tagScore is an X-Doorman-Tag
 * header at the backend, a message over a scanner's maxSize passes
 * unscanned (counted `skipped`), a 20 MB message keeps doorman's memory flat, a hung scanner costs
 * the rule's timeout, and with the scanners stopped mail flows (onError pass, counted `error`) or
 * is tempfailed (onError tempfail).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { eventually, useCleanup } from '../helpers/procs.js';
import { EICAR, EICAR_NAME, GTUBE, startClamd, startRspamd, startSpamd, type Daemon } from '../helpers/scanners.js';

useCleanup();
let sink: Sink;
let clamd: Daemon;
let spamd: Daemon;
let rspamd: Daemon;
/** One doorman per scanner (whose reply is then the one asserted), and one with all three. */
let dmR: Doorman;
let dmS: Doorman;
let dmC: Doorman;
let dmAll: Doorman;

const rspamdRule = (port: number, extra = '') => `rule: rspamd\ntimeout: 30000\nsettings:\n  port: ${port}\n${extra}`;
const spamdRule = (port: number, extra = '') => `rule: spamassassin\ntimeout: 30000\nsettings:\n  port: ${port}\n${extra}`;
const clamdRule = (port: number, extra = '', top = '') => `rule: clamav\ntimeout: 30000\n${top}settings:\n  port: ${port}\n${extra}`;

before(async () => {
  [sink, clamd, spamd, rspamd] = await Promise.all([startSink(), startClamd(), startSpamd(), startRspamd()]);
  [dmR, dmS, dmC, dmAll] = await Promise.all([
    startDoorman({ backendPort: sink.port, rules: { 'rspamd.yaml': rspamdRule(rspamd.port) } }),
    startDoorman({ backendPort: sink.port, rules: { 'spamassassin.yaml': spamdRule(spamd.port) } }),
    startDoorman({ backendPort: sink.port, rules: { 'clamav.yaml': clamdRule(clamd.port) } }),
    startDoorman({
      backendPort: sink.port,
      rules: { 'clamav.yaml': clamdRule(clamd.port), 'rspamd.yaml': rspamdRule(rspamd.port), 'spamassassin.yaml': spamdRule(spamd.port) },
    }),
  ]);
});
after(async () => {
  await Promise.all([dmR, dmS, dmC, dmAll].map((d) => d?.stop()));
  await Promise.all([clamd, spamd, rspamd].map((d) => d?.stop()));
  await sink?.stop();
});

/** A message with the usual headers and `body` (CRLF line ends). */
function message(from: string, subject: string, body: string): string {
  return [
    `From: Sender <${from}>`,
    'To: User <user@example.com>',
    `Subject: ${subject}`,
    'Date: Tue, 01 Dec 2026 10:00:00 +0000',
    `Message-ID: <${subject.replace(/\W/g, '')}.${Date.now()}@example.org>`,
    'MIME-Version: 1.0',
    'Content-Type: text/plain; charset=us-ascii',
    '',
    body,
    '',
  ].join('\r\n');
}

/** Prose of about `octets` bytes in 72-character lines. */
function prose(octets: number): string {
  const line = 'The quarterly report is attached; please review the figures before Monday.'.slice(0, 72);
  return Array.from({ length: Math.ceil(octets / 74) }, () => line).join('\r\n');
}

async function send(dm: Doorman, from: string, body: string) {
  const c = await SmtpClient.open(dm.port);
  try {
    return await c.message({ from, to: 'user@example.com', body, timeout: 60_000 });
  } finally {
    c.close();
  }
}

async function sessionOf(dm: Doorman, from: string) {
  return eventually(() => dm.sessions().find((s) => (s.transactions as { from?: string }[]).some((t) => t.from === from)), 10_000);
}

const scans = (dm: Doorman, scanner: string, result: string) => dm.metric('doorman_content_scans_total', { scanner, result });

test('GTUBE through rspamd: refused 5xx with rspamd\'s own message, symbols in the session log', async () => {
  const r = await send(dmR, 'gtube-r@example.org', message('gtube-r@example.org', 'rspamd gtube', GTUBE));
  assert.equal(r.code, 550, r.raw);
  assert.equal(r.text, '5.7.1 Gtube pattern');
  const log = await sessionOf(dmR, 'gtube-r@example.org');
  assert.match(JSON.stringify(log?.rules), /"rule":"rspamd","stage":"data_end","finding":"reject".*"reason":"rspamd: reject, score 15\.00\/15\.00; [^"]*GTUBE/);
  assert.equal(await scans(dmR, 'rspamd', 'reject'), 1);
  assert.ok((await dmR.metric('doorman_content_scan_duration_seconds_count', { scanner: 'rspamd' })) >= 1);
  assert.equal(sink.messages().filter((m) => m.mail.startsWith('<gtube-r@example.org>')).length, 0);
});

test('GTUBE through spamd: refused over rejectScore, the score and rules in the session log', async () => {
  const r = await send(dmS, 'gtube-s@example.org', message('gtube-s@example.org', 'spamd gtube', GTUBE));
  assert.equal(r.code, 550, r.raw);
  assert.equal(r.text, '5.7.1 Message rejected as spam');
  const log = await sessionOf(dmS, 'gtube-s@example.org');
  assert.match(JSON.stringify(log?.rules), /"rule":"spamassassin","stage":"data_end","finding":"reject".*"reason":"spamassassin: score 1\d\d\d(\.\d+)?\/5; [^"]*GTUBE/);
  assert.equal(await scans(dmS, 'spamassassin', 'reject'), 1);
  assert.equal(sink.messages().filter((m) => m.mail.startsWith('<gtube-s@example.org>')).length, 0);
});

test('EICAR through clamd: 554 5.7.1 naming the signature', async () => {
  const r = await send(dmC, 'eicar@example.org', message('eicar@example.org', 'eicar', `See the file below.\r\n${EICAR}`));
  assert.equal(r.code, 554, r.raw);
  assert.equal(r.text, `5.7.1 Message rejected: virus found: ${EICAR_NAME}`);
  const log = await sessionOf(dmC, 'eicar@example.org');
  assert.match(JSON.stringify(log?.rules), new RegExp(`"rule":"clamav".*"reason":"clamav: ${EICAR_NAME.replace('.', '\\.')}"`));
  assert.equal(await scans(dmC, 'clamav', 'virus'), 1);
  assert.equal(sink.messages().filter((m) => m.mail.startsWith('<eicar@example.org>')).length, 0);
});

test('a clean message through all three scanners is delivered, byte for byte', async () => {
  const body = prose(20_000);
  const r = await send(dmAll, 'clean@example.org', message('clean@example.org', 'clean report', body));
  assert.equal(r.code, 250, r.raw);
  const m = await sink.bySender('clean@example.org');
  assert.ok(m.body.includes(body.replace(/\r\n/g, '\n')), 'the body reached the backend');
  assert.equal(await scans(dmAll, 'clamav', 'clean'), 1);
  assert.equal(await scans(dmAll, 'spamassassin', 'clean'), 1);
  // rspamd may add a header for a message from an unknown host: a tag, never a refusal.
  assert.equal((await scans(dmAll, 'rspamd', 'clean')) + (await scans(dmAll, 'rspamd', 'tag')), 1);
  assert.equal(await scans(dmAll, 'rspamd', 'error'), 0);
});

test('a message over a scanner\'s maxSize passes that scanner unscanned, counted skipped', async () => {
  // spamassassin's maxSize is spamc's 500 KB; the others (20 MiB) still scan it.
  const body = `${prose(600_000)}\r\n${GTUBE}`;
  const r = await send(dmS, 'big@example.org', message('big@example.org', 'big', body));
  assert.equal(r.code, 250, `GTUBE past maxSize is not scanned: ${r.raw}`);
  await sink.bySender('big@example.org');
  assert.equal(await scans(dmS, 'spamassassin', 'skipped'), 1);
});

test('a spamd score at or over tagScore: delivered with an X-Doorman-Tag header carrying the score', async () => {
  const reloads = await dmS.metric('doorman_config_reloads_total', { what: 'rules', result: 'success' });
  fs.writeFileSync(path.join(dmS.rulesDir, 'spamassassin.yaml'), spamdRule(spamd.port, '  tagScore: -100\n'));
  await eventually(async () => (await dmS.metric('doorman_config_reloads_total', { what: 'rules', result: 'success' })) > reloads, 10_000);
  const r = await send(dmS, 'tagged@example.org', message('tagged@example.org', 'tagged', 'an ordinary message'));
  assert.equal(r.code, 250, r.raw);
  const m = await sink.bySender('tagged@example.org');
  assert.match(m.body, /^X-Doorman-Tag: spamassassin; spamassassin: score -?[\d.]+\/5; /m);
  assert.equal(await scans(dmS, 'spamassassin', 'tag'), 1);
});

test('a 20 MB message with all three scanners: delivered, doorman\'s RSS stays flat', { timeout: 180_000 }, async () => {
  const rss = () => Number(/VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${dmAll.proc.pid}/status`, 'utf8'))?.[1] ?? NaN) / 1024;
  const size = 20_000_000;
  /** Sends one 20 MB message, sampling doorman's RSS (MB) every 100 ms. */
  const big = async (from: string) => {
    const samples = [rss()];
    const timer = setInterval(() => samples.push(rss()), 100);
    const started = Date.now();
    try {
      const r = await send(dmAll, from, message(from, 'huge', prose(size)));
      return { r, ms: Date.now() - started, samples: [...samples, rss()] };
    } finally {
      clearInterval(timer);
    }
  };
  // The first message warms the allocator up (V8 frees socket buffers lazily, up to a plateau).
  const first = await big('huge1@example.org');
  const second = await big('huge2@example.org');
  const third = await big('huge3@example.org');
  for (const [from, sent] of [['huge1@example.org', first], ['huge2@example.org', second], ['huge3@example.org', third]] as const) {
    assert.equal(sent.r.code, 250, sent.r.raw);
    const m = await sink.bySender(from, 30_000);
    assert.ok(m.body.length > size * 0.98, `delivered whole (LF line ends at the sink): ${m.body.length}`);
  }
  // spamassassin (500 KB) skips them; clamd and rspamd (20 MiB) get them streamed.
  assert.equal(await scans(dmAll, 'spamassassin', 'skipped'), 3);
  assert.equal(await scans(dmAll, 'clamav', 'clean'), 4);
  assert.equal((await scans(dmAll, 'rspamd', 'clean')) + (await scans(dmAll, 'rspamd', 'tag')), 4);
  const start = first.samples[0] ?? 0;
  const peak1 = Math.max(...first.samples);
  const peak2 = Math.max(...second.samples);
  const peak3 = Math.max(...third.samples);
  console.log(
    `# 20 MB with clamav+rspamd streaming (spamassassin skipped): ${first.ms} / ${second.ms} / ${third.ms} ms; ` +
      `VmRSS ${start.toFixed(1)} MB at start, peak ${peak1.toFixed(1)} / ${peak2.toFixed(1)} / ${peak3.toFixed(1)} MB`,
  );
  // Holding a message in memory for a scanner would add 20 MB per message and per scanner. Held
  // (spooled) and streamed to the scanners, RSS climbs to a plateau over the first two messages
  // (V8's heap and lazily freed socket buffers: Node 22 about +40 MB, Node 24 about +70 MB, the
  // same on messages 3 to 6) and a later message does not raise it.
  assert.ok(peak3 <= Math.max(peak1, peak2) + 15, `the third message raised the peak: ${peak3.toFixed(1)} MB`);
  const peak = Math.max(peak1, peak2, peak3) - start;
  assert.ok(peak < 90, `RSS peak ${peak.toFixed(1)} MB above the start`);
});

test('a scanner that hangs (clamd stopped with SIGSTOP): the rule\'s timeout, then onError pass', async () => {
  const reloads = await dmC.metric('doorman_config_reloads_total', { what: 'rules', result: 'success' });
  fs.writeFileSync(path.join(dmC.rulesDir, 'clamav.yaml'), clamdRule(clamd.port).replace('timeout: 30000', 'timeout: 1500'));
  await eventually(async () => (await dmC.metric('doorman_config_reloads_total', { what: 'rules', result: 'success' })) > reloads, 10_000);
  process.kill(clamd.proc.pid, 'SIGSTOP');
  try {
    const started = Date.now();
    const r = await send(dmC, 'hung@example.org', message('hung@example.org', 'hung', `clamd hangs\r\n${EICAR}`));
    const ms = Date.now() - started;
    assert.equal(r.code, 250, r.raw);
    assert.ok(ms >= 1400 && ms < 10_000, `answered after the rule's timeout: ${ms} ms`);
    await sink.bySender('hung@example.org');
    assert.equal(await dmC.metric('doorman_rule_errors_total', { rule: 'clamav', kind: 'timeout' }), 1);
    assert.equal(await scans(dmC, 'clamav', 'error'), 1);
  } finally {
    process.kill(clamd.proc.pid, 'SIGCONT');
  }
});

test('scanners stopped: mail flows (onError pass), each counted error; onError tempfail answers 451', async () => {
  await Promise.all([clamd.stop(), spamd.stop(), rspamd.stop()]);
  const r = await send(dmAll, 'down@example.org', message('down@example.org', 'down', `scanners down\r\n${GTUBE}\r\n${EICAR}`));
  assert.equal(r.code, 250, r.raw);
  await sink.bySender('down@example.org');
  for (const s of ['clamav', 'spamassassin', 'rspamd']) assert.equal(await scans(dmAll, s, 'error'), 1, s);
  assert.equal(await dmAll.metric('doorman_rule_errors_total', { rule: 'clamav', kind: 'error' }), 1);

  // The same rule asked to fail closed: the file is reloaded, the message refused 451 4.3.0.
  const reloads = await dmC.metric('doorman_config_reloads_total', { what: 'rules', result: 'success' });
  fs.writeFileSync(path.join(dmC.rulesDir, 'clamav.yaml'), clamdRule(clamd.port, '', 'onError: tempfail\n'));
  await eventually(async () => (await dmC.metric('doorman_config_reloads_total', { what: 'rules', result: 'success' })) > reloads, 10_000);
  const t = await send(dmC, 'down2@example.org', message('down2@example.org', 'down2', 'clamd down'));
  assert.equal(t.code, 451, t.raw);
  assert.match(t.text, /^4\.3\.0 /);
  assert.equal(await scans(dmC, 'clamav', 'error'), 2, 'the hung scan and this one');
});
