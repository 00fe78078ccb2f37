/**
 * SIGTERM drains: doorman stops accepting, lets open sessions finish their messages until the
 * drain deadline, then sends 421 4.3.2 to the sessions still open and exits 0.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { startDoorman } from '../helpers/doorman.js';
import { startFakeBackend } from '../helpers/fake-backend.js';
import { SmtpClient } from '../helpers/smtp.js';
import { sleep, useCleanup } from '../helpers/procs.js';

useCleanup();

test('SIGTERM: running transactions finish, new clients are turned away, idle sessions get 421', async () => {
  const fb = await startFakeBackend('none');
  const d = await startDoorman({ backendPort: fb.port, config: 'limits:\n  drainTimeout: 2000\n' });
  try {
    const busy = await SmtpClient.open(d.port);
    await busy.message({ from: 'drain@example.org', to: 'b@example.com' });
    busy.write('Subject: during drain\r\n\r\nfirst half\r\n');

    const idle = await SmtpClient.open(d.port);

    const t0 = Date.now();
    process.kill(d.proc.pid, 'SIGTERM');
    await d.proc.waitFor(/"msg":"draining"/);

    const refused = await new Promise<string>((resolve) => {
      const s = net.connect(d.port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        resolve('connected');
      });
      s.once('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? 'error'));
    });
    assert.equal(refused, 'ECONNREFUSED', 'no new sessions while draining');

    busy.write('second half\r\n.\r\n');
    const r = await busy.reply();
    assert.equal(r.code, 250, 'the open transaction completes');
    assert.equal((await busy.cmd('QUIT')).code, 221);
    assert.equal(fb.messages.length, 1);

    const bye = await idle.reply(5000);
    assert.equal(bye.code, 421);
    assert.match(bye.text, /^4\.3\.2 /);
    assert.ok(Date.now() - t0 >= 1900, 'the idle session kept until the deadline');
    assert.equal(await idle.waitClosed(), true);
    assert.equal(await d.proc.exited, 0);
  } finally {
    await d.stop();
    await fb.close();
    await sleep(10);
  }
});
