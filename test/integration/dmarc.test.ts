/**
 * DKIM, DMARC and ARC end to end: keys generated here (RSA 2048, Ed25519), messages signed with
 * mailauth's dkimSign and ARC-sealed with sealMessage, the keys and the DMARC and SPF records
 * served by a real dnsmasq that doorman's resolver asks; clients on 127.0.0.x → doorman (spf and
 * dmarc rules) → a fake backend that stores what it gets. Each case asserts the client's reply
 * and whether the message reached the backend.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { dkimSign, sealMessage } from 'mailauth';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startDnsmasq, type Dnsmasq } from '../helpers/dns.js';
import { startFakeBackend, type FakeBackend } from '../helpers/fake-backend.js';
import { dotStuff, SmtpClient } from '../helpers/smtp.js';
import { useCleanup } from '../helpers/procs.js';

useCleanup();
let dns: Dnsmasq;
let fb: FakeBackend;
let dm: Doorman;
let quarantineReject: Doorman;
let spooling: Doorman;
const spoolDir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-spool-test-'));

const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const ed = crypto.generateKeyPairSync('ed25519');
const fwd = crypto.generateKeyPairSync('ed25519');
const pem = (k: crypto.KeyObject) => k.export({ type: 'pkcs8', format: 'pem' }).toString();
const rsaRecord = () => `v=DKIM1; k=rsa; p=${rsa.publicKey.export({ type: 'spki', format: 'der' }).toString('base64')}`;
const edRecord = (k: crypto.KeyObject) => `v=DKIM1; k=ed25519; p=${k.export({ type: 'spki', format: 'der' }).subarray(-32).toString('base64')}`;
/** dnsmasq: one TXT string per 255 bytes, separated by commas. */
const split = (s: string) => (s.match(/.{1,250}/g) ?? []).join(',');

const OUTSIDE = '127.0.0.50';
const site = 'localDomains: [local.test]\nrelayNetworks: [127.0.0.1/32]\n';
const dmarcRule = (quarantine: string) => `rule: dmarc
timeout: 10000
settings:
  quarantine: ${quarantine}
  trustedSealers: [fwd.test]
`;
const SPF = 'rule: spf\nscope: { clients: ["!relayNetworks"] }\nsettings:\n  checkHelo: false\n';

before(async () => {
  dns = await startDnsmasq({
    txt: [
      ['rsa._domainkey.reject.test', split(rsaRecord())],
      ['ed._domainkey.reject.test', edRecord(ed.publicKey)],
      ['ed._domainkey.quar.test', edRecord(ed.publicKey)],
      ['ed._domainkey.none.test', edRecord(ed.publicKey)],
      ['ed._domainkey.other.test', edRecord(ed.publicKey)],
      ['arc._domainkey.fwd.test', edRecord(fwd.publicKey)],
      ['arc._domainkey.untrusted.test', edRecord(fwd.publicKey)],
      ['_dmarc.reject.test', 'v=DMARC1; p=reject'],
      ['_dmarc.quar.test', 'v=DMARC1; p=quarantine'],
      ['_dmarc.none.test', 'v=DMARC1; p=none'],
      ['_dmarc.spfonly.test', 'v=DMARC1; p=reject'],
      ['reject.test', 'v=spf1 -all'],
      ['spfonly.test', `v=spf1 ip4:${OUTSIDE} -all`],
      ['bounce.test', `v=spf1 ip4:${OUTSIDE} -all`],
    ],
  });
  fb = await startFakeBackend('none');
  const common = { backendPort: fb.port, env: { DOORMAN_DNS_SERVERS: dns.server } };
  dm = await startDoorman({ ...common, rules: { 'site.yaml': site, 'spf.yaml': SPF, 'dmarc.yaml': dmarcRule('tag') } });
  quarantineReject = await startDoorman({ ...common, rules: { 'site.yaml': site, 'spf.yaml': SPF, 'dmarc.yaml': dmarcRule('reject') } });
  // Held messages past 4 KiB go to a spool file (limits.holdInMemory, backend.spoolDir).
  spooling = await startDoorman({
    ...common,
    config: `limits:\n  holdInMemory: 4096\nbackend:\n  spoolDir: ${spoolDir}\n`,
    rules: { 'site.yaml': site, 'spf.yaml': SPF, 'dmarc.yaml': dmarcRule('tag') },
  });
});
after(async () => {
  await dm?.stop();
  await quarantineReject?.stop();
  await spooling?.stop();
  fs.rmSync(spoolDir, { recursive: true, force: true });
  await fb?.close();
  await dns?.stop();
});

let seq = 0;
function message(from: string, body = 'Hello.\r\n'): { id: string; text: string } {
  const id = `<m${++seq}.${Date.now()}@test>`;
  return { id, text: `From: ${from}\r\nTo: bob@local.test\r\nSubject: test ${seq}\r\nMessage-ID: ${id}\r\nDate: Tue, 1 Dec 2026 12:00:00 +0000\r\n\r\n${body}` };
}
async function sign(text: string, signingDomain: string, selector = 'ed', key = ed.privateKey): Promise<string> {
  const r = await dkimSign(text, { signatureData: [{ signingDomain, selector, privateKey: pem(key) }] } as unknown as Parameters<typeof dkimSign>[1]);
  assert.equal(r.errors?.length ?? 0, 0, JSON.stringify(r.errors));
  return r.signatures + text;
}
async function seal(text: string, signingDomain: string, authResults: string): Promise<string> {
  const h = await sealMessage(Buffer.from(text), { signingDomain, selector: 'arc', privateKey: pem(fwd.privateKey), authResults, cv: 'none' });
  assert.ok(h.length > 0, 'sealed');
  return h.toString() + text;
}

/** Sends `text` from `ip` with envelope sender `from`; the reply to the end of data (or the refusal) and whether the backend got it. */
async function send(text: string, o: { ip?: string; from?: string; port?: number } = {}): Promise<{ code: number; text: string; delivered: boolean }> {
  const before = fb.messages.length;
  const id = /Message-ID: (<[^>]+>)/.exec(text)?.[1] ?? '';
  const c = await SmtpClient.open(o.port ?? dm.port, { localAddress: o.ip ?? OUTSIDE, ehlo: 'client.example.org' });
  const t = await c.transaction({ from: o.from ?? 'x@bounce.test', to: 'bob@local.test', body: text });
  c.close();
  const r = t.last;
  await new Promise((res) => setTimeout(res, 50));
  const delivered = fb.messages.slice(before).some((m) => m.includes(id));
  return { code: r.code, text: r.text, delivered };
}

test('pass: a correctly signed message from a p=reject domain is delivered (Ed25519 and RSA 2048)', async () => {
  const a = await send(await sign(message('alice@reject.test').text, 'reject.test'));
  assert.deepEqual([a.code, a.delivered], [250, true], a.text);
  const b = await send(await sign(message('alice@reject.test').text, 'reject.test', 'rsa', rsa.privateKey));
  assert.deepEqual([b.code, b.delivered], [250, true], b.text);
});

test('DKIM fail: the body changed after signing, p=reject → 550 with the DMARC reason, not delivered', async () => {
  const m = message('alice@reject.test');
  const signed = (await sign(m.text, 'reject.test')).replace('Hello.', 'Hello, changed.');
  const r = await send(signed);
  assert.equal(r.code, 550);
  assert.equal(r.text, '5.7.1 Message rejected: DMARC policy of reject.test is reject (dkim=neutral spf=unaligned)');
  assert.equal(r.delivered, false);
});

test('broken body hash (bh= altered): refused the same way', async () => {
  const signed = (await sign(message('alice@reject.test').text, 'reject.test')).replace(/bh=([A-Za-z0-9+/])/, (_m, c: string) => `bh=${c === 'A' ? 'B' : 'A'}`);
  const r = await send(signed);
  assert.equal(r.code, 550, r.text);
  assert.match(r.text, /^5\.7\.1 Message rejected: DMARC policy of reject\.test is reject \(dkim=(neutral|fail) spf=unaligned\)$/);
  assert.equal(r.delivered, false);
});

test('alignment failure: a valid signature of another domain does not help a p=reject From', async () => {
  const r = await send(await sign(message('alice@reject.test').text, 'other.test'));
  assert.equal(r.code, 550);
  assert.equal(r.text, '5.7.1 Message rejected: DMARC policy of reject.test is reject (dkim=unaligned spf=unaligned)');
  assert.equal(r.delivered, false);
});

test('unsigned, no SPF alignment → 550; aligned SPF (the spf rule’s result, read from the session) passes without DKIM', async () => {
  const r = await send(message('alice@reject.test').text);
  assert.equal(r.code, 550);
  assert.equal(r.text, '5.7.1 Message rejected: DMARC policy of reject.test is reject (dkim=none spf=unaligned)');
  const ok = await send(message('alice@spfonly.test').text, { from: 'bounces@spfonly.test' });
  assert.deepEqual([ok.code, ok.delivered], [250, true], ok.text);
});

test('p=quarantine: tagged and delivered by default; refused when the operator says reject', async () => {
  const unsigned = message('carol@quar.test');
  const tagged = await send(unsigned.text);
  assert.deepEqual([tagged.code, tagged.delivered], [250, true], tagged.text);
  assert.equal(await dm.metric('doorman_rule_evaluations_total', { rule: 'dmarc', stage: 'data_end', outcome: 'tag' }), 1);
  // The data_end verdict's tag precedes the body: the message was held until it came.
  const got = fb.messages.find((x) => x.includes(unsigned.id)) ?? '';
  assert.match(got, /^X-Doorman-Tag: .*quar\.test.*\r\n/);
  assert.match(got, /dmarc=fail[^;]*header\.from=quar\.test/);
  const refused = await send(message('carol@quar.test').text, { port: quarantineReject.port });
  assert.equal(refused.code, 550);
  assert.equal(refused.text, '5.7.1 Message rejected: DMARC policy of quar.test is quarantine (dkim=none spf=unaligned)');
  assert.equal(refused.delivered, false);
});

test('p=none: a failing message is delivered untagged', async () => {
  const m = message('dave@none.test');
  const r = await send(m.text);
  assert.deepEqual([r.code, r.delivered], [250, true], r.text);
  assert.doesNotMatch(fb.messages.find((x) => x.includes(m.id)) ?? '', /X-Doorman-Tag/);
});

test('ARC: a trusted forwarder’s seal over a broken signature passes; the same from an untrusted sealer is refused', async () => {
  const m = message('alice@reject.test');
  // The list changed the body after the author signed it, then sealed what it had verified.
  const listed = (await sign(m.text, 'reject.test')).replace('Hello.', 'Hello.\r\n-- \r\nlist footer');
  const aar = (d: string) => `${d}; dkim=pass header.d=reject.test; spf=pass smtp.mailfrom=reject.test; dmarc=pass header.from=reject.test`;
  const trusted = await send(await seal(listed, 'fwd.test', aar('fwd.test')));
  assert.deepEqual([trusted.code, trusted.delivered], [250, true], trusted.text);
  const untrusted = await send(await seal(listed.replace(m.id, `<u${m.id.slice(1)}`), 'untrusted.test', aar('untrusted.test')));
  assert.equal(untrusted.code, 550);
  assert.match(untrusted.text, /^5\.7\.1 Message rejected: DMARC policy of reject\.test is reject/);
  assert.equal(untrusted.delivered, false);
});

test('header From of our own domain: refused from an outside client without any DMARC record; fine from relayNetworks', async () => {
  const forged = message('ceo@local.test');
  const r = await send(forged.text);
  assert.equal(r.code, 550);
  assert.equal(r.text, '5.7.1 Message rejected: header From <ceo@local.test> not owned by you');
  assert.equal(r.delivered, false);
  assert.equal(await dm.metric('doorman_rejections_total', { rule: 'dmarc', stage: 'data_headers', code: '550', enhanced_code: '5.7.1' }), 1);
  const ours = message('ceo@local.test');
  const ok = await send(ours.text, { ip: '127.0.0.1' });
  assert.deepEqual([ok.code, ok.delivered], [250, true], ok.text);
});

/** The message the backend got for `id`. */
function atBackend(id: string): string {
  return fb.messages.find((x) => x.includes(id)) ?? '';
}

test('Authentication-Results: one field with doorman’s name, the dkim, spf and dmarc results, above the message', async () => {
  const m = message('alice@reject.test');
  const r = await send(await sign(m.text, 'reject.test'), { from: 'x@bounce.test' });
  assert.deepEqual([r.code, r.delivered], [250, true], r.text);
  const got = atBackend(m.id);
  const fields = got.match(/^Authentication-Results:[^\r]*(\r\n[ \t][^\r]*)*/gim) ?? [];
  assert.equal(fields.length, 1, got.slice(0, 800));
  const ar = (fields[0] ?? '').replace(/\r\n[ \t]/g, ' ');
  assert.match(ar, /^Authentication-Results: mx\.doorman\.test; /);
  assert.match(ar, /; spf=pass smtp\.mailfrom=x@bounce\.test/);
  assert.match(ar, /; dkim=pass [^;]*header\.d=reject\.test/);
  assert.match(ar, /; dmarc=pass [^;]*header\.from=reject\.test/);
  // Above the client's header block (doorman's hop at the top), the signed message unchanged below.
  assert.ok(got.indexOf('Authentication-Results:') < got.indexOf('DKIM-Signature:'));
  assert.ok(got.endsWith('\r\n\r\nHello.'), JSON.stringify(got.slice(-40)));
});

test('incoming Authentication-Results claiming doorman’s name are removed (RFC 8601 §5); others kept', async () => {
  const m = message('alice@reject.test');
  const forged =
    'Authentication-Results: MX.Doorman.Test; dkim=pass header.d=reject.test;\r\n\tdmarc=pass\r\n' +
    'Authentication-Results: (comment) "mx.doorman.test"; spf=pass\r\n' +
    'Authentication-Results: relay.example.net; spf=pass smtp.mailfrom=x@bounce.test\r\n';
  const r = await send(forged + (await sign(m.text, 'reject.test')));
  assert.deepEqual([r.code, r.delivered], [250, true], r.text);
  const got = atBackend(m.id);
  const fields = (got.match(/^Authentication-Results:[^\r]*(\r\n[ \t][^\r]*)*/gim) ?? []).map((f) => f.replace(/\r\n[ \t]/g, ' '));
  assert.equal(fields.length, 2, fields.join('\n'));
  assert.match(fields[0] ?? '', /^Authentication-Results: mx\.doorman\.test; spf=/);
  assert.equal(fields[1], 'Authentication-Results: relay.example.net; spf=pass smtp.mailfrom=x@bounce.test');
});

test('a message held past limits.holdInMemory is spooled to disk and delivered byte for byte; no spool file is left', async () => {
  const line = 'The quick brown fox jumps over the lazy dog 0123456789.\r\n';
  const m = message('alice@reject.test', line.repeat(6000) + '.leading dot line\r\n'); // ~350 KB
  const signed = await sign(m.text, 'reject.test');
  const before = fb.messages.length;
  const c = await SmtpClient.open(spooling.port, { localAddress: OUTSIDE, ehlo: 'client.example.org' });
  const t = await c.transaction({ from: 'x@bounce.test', to: 'bob@local.test', body: dotStuff(signed) });
  c.close();
  assert.equal(t.last.code, 250, t.last.text);
  await new Promise((res) => setTimeout(res, 100));
  const got = fb.messages.slice(before).find((x) => x.includes(m.id)) ?? '';
  // dkim=pass: the body reached the backend in order and complete (its hash still matches).
  assert.match(got, /dkim=pass/);
  // The fake backend keeps the bytes as sent (dot-stuffed), without the CRLF before the final ".".
  const body = signed.slice(signed.indexOf('\r\n\r\n')).replace(/\r\n\./g, '\r\n..').slice(0, -2);
  assert.ok(got.endsWith(body), 'body intact');
  assert.deepEqual(fs.readdirSync(spoolDir), []);
});
