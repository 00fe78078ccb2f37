import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Spool } from '../../src/smtp/spool.js';
import { rfc5322Date, stripClaimed } from '../../src/smtp/trace.js';

test('stripClaimed: folded fields claiming the authserv-id go, whatever their case and comments; others stay byte for byte', () => {
  const block =
    'Received: from a\r\n\tby b\r\n' +
    'Authentication-Results: MX.example.com;\r\n\tdkim=pass\r\n' +
    'authentication-results:(x) mx.example.com; spf=pass\r\n' +
    'Authentication-Results: mx.example.com.evil; spf=pass\r\n' +
    'Subject: hi\r\n\r\n';
  const out = stripClaimed(Buffer.from(block), 'mx.example.com').toString();
  assert.equal(out, 'Received: from a\r\n\tby b\r\nAuthentication-Results: mx.example.com.evil; spf=pass\r\nSubject: hi\r\n\r\n');
  const none = Buffer.from('Subject: x\r\n\r\n');
  assert.equal(stripClaimed(none, 'mx.example.com'), none);
});

test('rfc5322Date: day, month, +0000', () => {
  assert.equal(rfc5322Date(new Date(Date.UTC(2026, 11, 1, 9, 5, 7))), 'Tue, 1 Dec 2026 09:05:07 +0000');
});

test('Spool: memory up to the bound, then an unlinked file; read back in order; nothing left in the folder', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'spool-unit-'));
  const s = new Spool(10, dir);
  const parts = ['0123456789', 'abcdef', 'ghij', 'x'.repeat(200_000)].map((x) => Buffer.from(x));
  for (const p of parts) await s.write([p]);
  assert.equal(s.size, parts.reduce((n, p) => n + p.length, 0));
  const back: Buffer[] = [];
  for await (const c of s.read()) back.push(c);
  assert.deepEqual(fs.readdirSync(dir), [], 'the file is unlinked once open');
  assert.equal(Buffer.concat(back).toString(), parts.map((p) => p.toString()).join(''));
  s.dispose();
  fs.rmSync(dir, { recursive: true });
});

test('Spool: a folder that cannot be written makes read() throw (the session answers 451)', async () => {
  const s = new Spool(0, '/nonexistent/doorman-spool');
  await s.write([Buffer.from('abc')]);
  await assert.rejects(async () => {
    for await (const _ of s.read()) void _;
  });
  s.dispose();
});
