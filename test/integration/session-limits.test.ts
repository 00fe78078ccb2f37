/**
 * One client's session is bounded whatever the client does: output is back-pressure (a client
 * that reads none of its replies stops being served, then is dropped after limits.writeTimeout),
 * commands per session and junk commands (NOOP, VRFY, RSET, EHLO…) between delivered messages are
 * capped (421 4.7.0), and every per-session list in the session log line is bounded.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, startDoorman, type Doorman } from '../helpers/doorman.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { eventually, sleep, useCleanup } from '../helpers/procs.js';

useCleanup();
let sink: Sink;
/** The junk and command caps out of the way: what bounds a session without them. */
let open: Doorman;
/** The shipped caps (junk 100), with maxCommands low enough to reach. */
let capped: Doorman;

const HELO_RULE = fs.readFileSync(path.join(ROOT, 'rules', 'helo.yaml'), 'utf8');
/** Tags each recipient at tagged.example with its own reason (15 distinct tags). */
const TAG_RULE = `rule: access
action: tag
settings:
  recipients:
${Array.from({ length: 15 }, (_, i) => `    - deny: u${i}@tagged.example\n      reason: tag-${i}`).join('\n')}
`;

before(async () => {
  sink = await startSink();
  open = await startDoorman({
    backendPort: sink.port,
    rules: { 'helo.yaml': HELO_RULE, 'tag.yaml': TAG_RULE },
    config: 'limits:\n  writeTimeout: 2000\n  maxJunkCommands: 10000000\n  maxCommands: 10000000\n  maxErrors: 10000000\n',
  });
  capped = await startDoorman({ backendPort: sink.port, rules: { 'helo.yaml': HELO_RULE }, config: 'limits:\n  maxCommands: 200\n' });
});
after(async () => {
  await open?.stop();
  await capped?.stop();
  await sink?.stop();
});

function rssKb(pid: number): number {
  return Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
}

test('a client that never reads its replies: doorman stops serving it, drops it after writeTimeout, memory stays bounded', { timeout: 60_000 }, async () => {
  const pid = open.proc.pid;
  const before = rssKb(pid);
  let peak = before;
  const c = await SmtpClient.open(open.port);
  c.socket.pause(); // from here on the client reads nothing
  const chunk = Buffer.from('VRFY x\r\n'.repeat(8192), 'latin1'); // 64 KiB, ~9× as many reply bytes
  const LIMIT = 16 * 1024 * 1024; // bounded: 16 MiB of commands or 20 s, whichever first
  const deadline = Date.now() + 20_000;
  let written = 0;
  let gone = false;
  void c.closed.then(() => (gone = true));
  while (!gone && written < LIMIT && Date.now() < deadline) {
    const ok = c.socket.write(chunk);
    written += chunk.length;
    peak = Math.max(peak, rssKb(pid));
    if (!ok) await Promise.race([new Promise((r) => c.socket.once('drain', r)), c.closed, sleep(deadline - Date.now())]);
  }
  // Doorman drops a client that reads nothing for writeTimeout (2 s here).
  await Promise.race([c.closed, sleep(10_000)]);
  peak = Math.max(peak, rssKb(pid));
  const growthMb = (peak - before) / 1024;
  console.log(`# non-reading client: ${(written / 1048576).toFixed(1)} MiB of VRFY written, doorman RSS ${(before / 1024).toFixed(0)} MB → peak ${(peak / 1024).toFixed(0)} MB (+${growthMb.toFixed(1)} MB)`);
  assert.ok(growthMb < 40, `doorman RSS grew by ${growthMb.toFixed(1)} MB for one non-reading client`);
  assert.equal(gone, true, 'the non-reading client was not dropped');
  const [line] = (await open.waitSessions(1)).filter((s) => s.outcome === 'write-timeout');
  assert.ok(line, 'no session log line with outcome write-timeout');
  assert.ok((await open.metric('doorman_protocol_violations_total', { kind: 'write_timeout' })) >= 1);
  assert.ok(open.logs().some((l) => l.msg === 'client does not read its replies: dropped'));
  // A normal client is still served.
  const n = await SmtpClient.open(open.port, { ehlo: 'mail.example.net' });
  const r = await n.message({ from: 'after-flood@example.org', to: 'user@example.com', body: 'Subject: after\r\n\r\nstill served\r\n' });
  assert.equal(r.code, 250, r.raw);
  assert.equal((await n.cmd('QUIT')).code, 221);
  await sink.bySender('after-flood@example.org');
});

test('junk commands: the 101st NOOP/VRFY/RSET/EHLO without a delivered message gets 421 4.7.0', async () => {
  const c = await SmtpClient.open(capped.port, { ehlo: 'mail.example.net' }); // junk 1
  const verbs = ['NOOP', 'VRFY x', 'RSET', 'HELP', 'EHLO mail.example.net'];
  for (let i = 1; i < 100; i++) {
    const r = await c.cmd(verbs[i % verbs.length] ?? 'NOOP');
    assert.ok(r.code < 400, `junk command ${i + 1}: ${r.raw}`);
  }
  const r = await c.cmd('NOOP');
  assert.equal(r.code, 421, r.raw);
  assert.match(r.text, /^4\.7\.0 .*too many commands/);
  assert.equal(await c.waitClosed(), true);
  const [line] = (await capped.waitSessions(1)).filter((s) => s.outcome === 'too-many-commands');
  assert.equal(line?.commands, 101);
});

test('junk commands: the count starts again after a delivered message (as Postfix)', async () => {
  const c = await SmtpClient.open(capped.port, { ehlo: 'mail.example.net' });
  for (let i = 0; i < 80; i++) assert.equal((await c.cmd('NOOP')).code, 250);
  const r = await c.message({ from: 'junk-reset@example.org', to: 'user@example.com', body: 'Subject: reset\r\n\r\nhi\r\n' });
  assert.equal(r.code, 250, r.raw);
  for (let i = 0; i < 80; i++) assert.equal((await c.cmd('RSET')).code, 250);
  assert.equal((await c.cmd('QUIT')).code, 221);
  await sink.bySender('junk-reset@example.org');
});

test('commands per session: past maxCommands the next command gets 421 4.7.0; earlier messages were delivered', async () => {
  const c = await SmtpClient.open(capped.port, { ehlo: 'mail.example.net' }); // command 1
  // 66 messages of 3 commands each (MAIL, RCPT, DATA): commands 2..199.
  for (let i = 0; i < 66; i++) {
    const r = await c.message({ from: `many-${i}@example.org`, to: 'user@example.com', body: `Subject: ${i}\r\n\r\nhi\r\n` });
    assert.equal(r.code, 250, r.raw);
  }
  assert.equal((await c.cmd('NOOP')).code, 250); // command 200
  const r = await c.cmd('MAIL FROM:<one-too-many@example.org>');
  assert.equal(r.code, 421, r.raw);
  assert.match(r.text, /^4\.7\.0 .*too many commands/);
  assert.equal(await c.waitClosed(), true);
  await sink.bySender('many-65@example.org');
  assert.ok((await capped.metric('doorman_protocol_violations_total', { kind: 'command_flood' })) >= 2);
});

/** The raw JSON session log line of the session whose HELO name was `helo`, once written whole. */
async function sessionLine(dm: Doorman, helo: string): Promise<string> {
  const find = () =>
    dm.proc
      .output()
      .split('\n')
      .slice(0, -1) // the last piece may be a line still being written
      .find((l) => l.endsWith('"msg":"session"}') && l.includes(`"helo":"${helo}"`));
  const line = await eventually(find, 10_000);
  assert.ok(line, `no session log line for ${helo}`);
  return line;
}

test('3000 EHLOs with the shipped dry-run helo rule (caps off): the session log line stays bounded', { timeout: 60_000 }, async () => {
  const c = await SmtpClient.open(open.port, { ehlo: false });
  const n = 3000;
  c.write('EHLO localhost\r\n'.repeat(n));
  for (let i = 0; i < n; i++) assert.equal((await c.reply()).code, 250);
  assert.equal((await c.cmd('QUIT')).code, 221);
  const raw = await sessionLine(open, 'localhost');
  const line = JSON.parse(raw) as { rules: unknown[]; moreRules?: number; commands: number };
  console.log(`# ${n} EHLO localhost: session log line ${raw.length} octets, ${line.rules.length} findings listed, ${line.moreRules ?? 0} counted`);
  assert.equal(line.commands, n + 1);
  assert.ok(raw.length < 64 * 1024, `session log line of ${raw.length} octets`);
  assert.equal(line.rules.length + (line.moreRules ?? 0), n, 'every finding is listed or counted');
});

test('20000 EHLOs with the shipped caps: 421 4.7.0 after 100, a small log line', { timeout: 60_000 }, async () => {
  const c = await SmtpClient.open(capped.port, { ehlo: false });
  c.write('EHLO localhost.localdomain\r\n'.repeat(20_000));
  let r = await c.reply();
  let ok = 0;
  for (; r.code === 250; r = await c.reply()) ok++;
  assert.equal(ok, 100);
  assert.equal(r.code, 421, r.raw);
  assert.match(r.text, /^4\.7\.0 .*too many commands/);
  const raw = await sessionLine(capped, 'localhost.localdomain');
  assert.ok(raw.length < 64 * 1024, `session log line of ${raw.length} octets`);
});

test('tags are bounded: 15 distinct tags, each 4 times, in one message → 10 X-Doorman-Tag headers, the rest counted', async () => {
  const c = await SmtpClient.open(open.port, { ehlo: 'mail.example.net' });
  const to = Array.from({ length: 4 * 15 }, (_, i) => `u${i % 15}@tagged.example`);
  assert.equal((await c.message({ from: 'tags@example.org', to, body: 'Subject: tags\r\n\r\nhi\r\n' })).code, 250);
  assert.equal((await c.cmd('QUIT')).code, 221);
  const m = await sink.bySender('tags@example.org');
  const tags = m.body.split('\n').filter((l) => l.startsWith('X-Doorman-Tag: '));
  assert.deepEqual(tags, Array.from({ length: 10 }, (_, i) => `X-Doorman-Tag: tag; tag-${i}`));
  await eventually(() => open.sessions().some((s) => s.helo === 'mail.example.net' && s.moreTags !== undefined), 5000);
  const line = open.sessions().find((s) => s.moreTags !== undefined);
  assert.equal(line?.moreTags, 20, 'the 4 × 5 findings left out are counted');
});
