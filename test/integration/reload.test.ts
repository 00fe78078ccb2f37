/**
 * Staying up through routine operations: a renewed certificate and a changed limit apply on
 * SIGHUP (and when the files change) to new connections, without dropping a session: a session
 * opened before keeps its certificate and delivers. An invalid certificate keeps the last good one.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type tls from 'node:tls';
import { makeCert } from '../helpers/certs.js';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { eventually, useCleanup } from '../helpers/procs.js';

useCleanup();
let sink: Sink;
let certA: ReturnType<typeof makeCert>;
let certB: ReturnType<typeof makeCert>;
let dir: string;

before(async () => {
  sink = await startSink();
  certA = makeCert('a.doorman.test');
  certB = makeCert('b.doorman.test');
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-reload-'));
});
after(async () => {
  await sink?.stop();
  for (const d of [dir, certA?.dir, certB?.dir]) if (d) fs.rmSync(d, { recursive: true, force: true });
});

const fingerprint = (certFile: string) => new crypto.X509Certificate(fs.readFileSync(certFile)).fingerprint256;
const peerFingerprint = (c: SmtpClient) => (c.socket as tls.TLSSocket).getPeerCertificate().fingerprint256;

/** Puts a certificate in place the way a renewal does: a new file renamed over the old one. */
function install(from: ReturnType<typeof makeCert>, to: { cert: string; key: string }): void {
  for (const k of ['cert', 'key'] as const) {
    fs.copyFileSync(from[k], to[k] + '.new');
    fs.renameSync(to[k] + '.new', to[k]);
  }
}

function config(files: { cert: string; key: string }, perIp: number, watch: boolean): string {
  return `tls:\n  cert: ${files.cert}\n  key: ${files.key}\nrules:\n  watch: ${watch}\nlimits:\n  maxClientsPerIp: ${perIp}\n`;
}

async function startWith(name: string, watch: boolean): Promise<{ dm: Doorman; files: { cert: string; key: string } }> {
  const files = { cert: path.join(dir, `${name}-cert.pem`), key: path.join(dir, `${name}-key.pem`) };
  install(certA, files);
  const dm = await startDoorman({ backendPort: sink.port, listen: 'smtp://127.0.0.1:{PORT},smtps://127.0.0.1:{PORT}', config: config(files, 5, watch) });
  return { dm, files };
}

/** The config file doorman was started with (the helper writes it into its work folder). */
function configFile(dm: Doorman): string {
  return path.join(path.dirname(dm.rulesDir), 'doorman.yaml');
}

test('SIGHUP: a renewed certificate and a changed limit apply to new connections; an open session stays and delivers', async () => {
  const { dm, files } = await startWith('hup', false);
  try {
    const a = fingerprint(certA.cert);
    const b = fingerprint(certB.cert);
    // Sessions opened before the reload, one per TLS mode, in the middle of a transaction.
    const old = await SmtpClient.open(dm.ports[1]!, { tls: true, localAddress: '127.0.0.50' });
    const oldStarttls = await SmtpClient.open(dm.ports[0]!, { localAddress: '127.0.0.50', starttls: true });
    assert.equal(peerFingerprint(old), a);
    assert.equal(peerFingerprint(oldStarttls), a);
    assert.equal((await old.cmd('MAIL FROM:<before-reload@example.org>')).code, 250);
    assert.equal((await old.cmd('RCPT TO:<bob@example.com>')).code, 250);

    install(certB, files);
    fs.writeFileSync(configFile(dm), config(files, 2, false));
    process.kill(dm.proc.pid, 'SIGHUP');
    await eventually(() => dm.logs().some((l) => l.msg === 'settings reloaded'), 5000);

    const fresh = await SmtpClient.open(dm.ports[1]!, { tls: true, localAddress: '127.0.0.51', ehlo: false });
    assert.equal(peerFingerprint(fresh), b, 'a new smtps connection gets the new certificate');
    const freshStarttls = await SmtpClient.open(dm.ports[0]!, { localAddress: '127.0.0.51', starttls: true });
    assert.equal(peerFingerprint(freshStarttls), b, 'STARTTLS on a new connection gets the new certificate');
    // maxClientsPerIp 5 → 2: the third session from 127.0.0.51 is refused.
    const third = await SmtpClient.greet(dm.ports[0]!, { localAddress: '127.0.0.51' });
    const r = third.greeting;
    assert.equal(r.code, 421, 'the new per-IP limit applies');
    assert.match(r.text, /^4\.7\.0 /);

    // The sessions opened before go on: the transaction completes and reaches the backend.
    assert.equal((await old.cmd('DATA')).code, 354);
    old.write('Subject: across a reload\r\n\r\nstill here\r\n.\r\n');
    assert.equal((await old.reply()).code, 250);
    assert.equal((await old.cmd('QUIT')).code, 221);
    await sink.bySender('before-reload@example.org');
    assert.equal((await oldStarttls.cmd('NOOP')).code, 250);
    for (const c of [oldStarttls, fresh, freshStarttls]) c.close();
    assert.equal(await dm.metric('doorman_config_reloads_total', { what: 'settings', result: 'success' }), 1);

    // A broken certificate: refused with a reason, the last good one stays.
    fs.writeFileSync(files.cert, '-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n');
    process.kill(dm.proc.pid, 'SIGHUP');
    await eventually(() => dm.logs().some((l) => l.msg.startsWith('settings reload failed')), 5000);
    const failed = dm.logs().find((l) => l.msg.startsWith('settings reload failed'));
    assert.match(String(failed?.err), /DMN_ERR_TLS/);
    assert.equal(await dm.metric('doorman_config_reloads_total', { what: 'settings', result: 'failure' }), 1);
    const still = await SmtpClient.open(dm.ports[1]!, { tls: true, localAddress: '127.0.0.52', ehlo: false });
    assert.equal(peerFingerprint(still), b);
    still.close();
  } finally {
    await dm.stop();
  }
});

test('a certificate renewed on disk is picked up without a signal; a restart-only change is logged, not applied', async () => {
  const { dm, files } = await startWith('watch', true);
  try {
    install(certB, files);
    await eventually(() => dm.logs().some((l) => l.msg === 'settings reloaded'), 5000);
    const c = await SmtpClient.open(dm.ports[1]!, { tls: true, ehlo: false });
    assert.equal(peerFingerprint(c), fingerprint(certB.cert));
    c.close();
    fs.writeFileSync(configFile(dm), config(files, 5, true) + 'backend:\n  poolSize: 3\n');
    await eventually(() => dm.logs().some((l) => l.msg.startsWith('changed settings apply only after a restart')), 5000);
    const warn = dm.logs().find((l) => l.msg.startsWith('changed settings apply only after a restart'));
    assert.deepEqual(warn?.keys, ['backend.poolSize']);
  } finally {
    await dm.stop();
  }
});
