/**
 * The milter server against miltertest (OpenDKIM's MTA-side test driver, Debian package
 * `miltertest`): an implementation of the MTA side that is not Postfix's, driven by Lua scripts.
 * Each script fails (exit code ≠ 0, error text on stderr) on the first unexpected reply.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { serveMilter, type MilterHandler, type MilterVerdict, type EomResult } from '../../src/fronts/milter/server.js';
import { trackCloser, useCleanup } from '../helpers/procs.js';

useCleanup();
const CONTINUE: MilterVerdict = { kind: 'continue' };
let server: net.Server;
let port: number;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-miltertest-'));
const sockets = new Set<net.Socket>();

/** Refuses recipients named refused@…; at end of message refuses bodies with "SPAM", else adds fields. */
function handler(): MilterHandler {
  let body = '';
  return {
    connect: async () => CONTINUE,
    helo: async () => CONTINUE,
    mail: async () => CONTINUE,
    rcpt: async (r) => (r.includes('refused@') ? { kind: 'reject', code: 550, enhanced: '5.7.1', text: 'Recipient refused' } : CONTINUE),
    data: async () => CONTINUE,
    header() {},
    eoh: async () => CONTINUE,
    body(chunk) {
      body += chunk.toString('latin1');
    },
    eom: async (): Promise<EomResult> =>
      body.includes('SPAM')
        ? { verdict: { kind: 'reject', code: 554, enhanced: '5.7.1', text: 'Message refused' } }
        : {
            verdict: CONTINUE,
            addHeaders: [
              { name: 'Authentication-Results', value: 'doorman.test; spf=pass', index: 0 },
              { name: 'X-Doorman-Tag', value: 'bulk' },
            ],
          },
    abort() {
      body = '';
    },
    close() {},
  };
}

before(async () => {
  server = net.createServer((s) => {
    sockets.add(s);
    serveMilter(s, handler);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  port = (server.address() as net.AddressInfo).port;
  trackCloser(stop);
});
function stop(): Promise<void> {
  for (const s of sockets) s.destroy();
  return new Promise((r) => (server.listening ? server.close(() => r()) : r()));
}
after(async () => {
  await stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Runs a Lua script (after a connect/negotiate prelude) through miltertest; bounded by `timeout`. */
function run(name: string, script: string): Promise<{ code: number; stdout: string; stderr: string }> {
  const file = path.join(dir, `${name}.lua`);
  fs.writeFileSync(
    file,
    `conn = mt.connect("inet:${port}@127.0.0.1", 10, 0.2)
if conn == nil then error "connect failed" end
local e = mt.negotiate(conn, nil, nil, nil)
if e ~= nil then error("negotiate: " .. e) end
mt.macro(conn, SMFIC_CONNECT, "{client_addr}", "192.0.2.9", "j", "mx.test")
if mt.conninfo(conn, "client.test", "192.0.2.9") ~= nil then error "conninfo failed" end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error "conninfo reply" end
if mt.helo(conn, "client.test") ~= nil then error "helo failed" end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error "helo reply" end
${script}
`,
  );
  return new Promise((resolve) => {
    execFile('miltertest', ['-s', file], { timeout: 20_000 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

const MESSAGE = (body: string) => `
if mt.rcptto(conn, "ok@example.com") ~= nil then error "rcpt failed" end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error "rcpt reply" end
if mt.header(conn, "From", "a@example.org") ~= nil then error "header failed" end
if mt.header(conn, "Subject", "hi") ~= nil then error "header failed" end
if mt.eoh(conn) ~= nil then error "eoh failed" end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error "eoh reply" end
if mt.bodystring(conn, "${body}\\r\\n") ~= nil then error "body failed" end
if mt.eom(conn) ~= nil then error "eom failed" end
`;

test('miltertest: refused recipient, header insert and add at end of message, a second message after ABORT', async () => {
  const r = await run('session', `
mt.macro(conn, SMFIC_MAIL, "i", "Q1")
if mt.mailfrom(conn, "a@example.org") ~= nil then error "mail failed" end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error "mail reply" end
if mt.rcptto(conn, "refused@example.com") ~= nil then error "rcpt failed" end
if mt.getreply(conn) ~= SMFIR_REPLYCODE then error "refused rcpt: expected REPLYCODE" end
mt.echo("RCPT-REFUSED")
${MESSAGE('hello')}
if mt.getreply(conn) ~= SMFIR_CONTINUE then error "eom reply" end
if not mt.eom_check(conn, MT_HDRINSERT, "Authentication-Results", "doorman.test; spf=pass") then error "no Authentication-Results inserted" end
if not mt.eom_check(conn, MT_HDRADD, "X-Doorman-Tag", "bulk") then error "no tag added" end
mt.echo("EOM-HEADERS")
if mt.abort(conn) ~= nil then error "abort failed" end
if mt.mailfrom(conn, "b@example.org") ~= nil then error "mail2 failed" end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error "mail2 reply" end
mt.echo("SECOND-MESSAGE")
mt.disconnect(conn)
`);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(r.stdout.trim().split('\n'), ['RCPT-REFUSED', 'EOM-HEADERS', 'SECOND-MESSAGE']);
});

test('miltertest: a message refused at end of message carries the rule\'s code, enhanced code and text', async () => {
  const r = await run('refused', `
if mt.mailfrom(conn, "a@example.org") ~= nil then error "mail failed" end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error "mail reply" end
${MESSAGE('SPAM')}
if mt.getreply(conn) ~= SMFIR_REPLYCODE then error "eom: expected REPLYCODE" end
if not mt.eom_check(conn, MT_SMTPREPLY, "554", "5.7.1", "Message refused") then error "eom: wrong reply" end
mt.echo("EOM-REFUSED")
mt.disconnect(conn)
`);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout.trim(), 'EOM-REFUSED');
});
