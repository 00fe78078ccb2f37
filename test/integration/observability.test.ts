/**
 * Observability end to end: a real Prometheus (Debian `prometheus`) scrapes a doorman that
 * handles test traffic (accepted mail, scanned by a real clamd; relay refusals, DNS list hits from rbldnsd, rate limits
 * and greylisting in Redis, protocol violations, a reload). Every query of
 * every Grafana dashboard panel must parse and return data, and the counters move exactly as the
 * traffic implies. Also /healthz and /readyz.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT, startDoorman, type Doorman } from '../helpers/doorman.js';
import { startBlackHole } from '../helpers/dns.js';
import { freePort } from '../helpers/net.js';
import { eventually, sleep, spawnProc, useCleanup, type Proc } from '../helpers/procs.js';
import { startRbldnsd, type Rbldnsd } from '../helpers/rbldnsd.js';
import { startRedis, type RedisServer } from '../helpers/redis.js';
import { startClamd, type Daemon } from '../helpers/scanners.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';

useCleanup();
let sink: Sink;
let rbl: Rbldnsd;
let redis: RedisServer;
let dm: Doorman;
let prom: Proc;
let clamd: Daemon;
let promPort: number;
let promDir: string;
const RELAY_REFUSALS = 7;

const RULES = {
  // No relay networks: the test's clients on 127.0.0.x are outsiders (the default relays 127/8).
  'site.yaml': 'localDomains: [example.com]\nrelayNetworks: []\n',
  '10-relay.yaml': 'rule: relay\n',
  '20-dnsbl.yaml': 'rule: dnsbl\nsettings:\n  zones:\n    - zone: bl.test\n',
  '30-ratelimit.yaml': 'rule: ratelimit\nsettings:\n  limits:\n    - name: conn\n      count: connections\n      limit: 3\n      window: 60000\n',
  '40-greylist.yaml': 'rule: greylist\nsettings:\n  delay: 0\n',
  // A content scanner (real clamd, port filled in below): the scan panels have data.
  '50-clamav.yaml': 'rule: clamav\ntimeout: 10000\nsettings:\n  port: {CLAMD}\n',
};

before(async () => {
  sink = await startSink();
  rbl = await startRbldnsd([{ name: 'bl.test', type: 'ip4set', lines: [':127.0.0.2:listed', '127.0.0.2', '127.0.0.90'] }]);
  [redis, clamd] = await Promise.all([startRedis(), startClamd()]);
  const rules = { ...RULES, '50-clamav.yaml': RULES['50-clamav.yaml'].replace('{CLAMD}', String(clamd.port)) };
  dm = await startDoorman({ backendPort: sink.port, env: { DOORMAN_DNS_SERVERS: rbl.server, DOORMAN_REDIS_URL: redis.url }, rules });
  promPort = await freePort();
  promDir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-prom-'));
  fs.writeFileSync(
    path.join(promDir, 'prometheus.yml'),
    `global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: doorman\n    static_configs:\n      - targets: ['127.0.0.1:${dm.metricsPort}']\n`,
  );
  prom = spawnProc('prometheus', 'prometheus', [`--config.file=${path.join(promDir, 'prometheus.yml')}`, `--storage.tsdb.path=${path.join(promDir, 'data')}`, `--web.listen-address=127.0.0.1:${promPort}`]);
  await prom.waitFor(/Server is ready to receive web requests/, 20_000);
  // Prometheus applies new targets after its discovery delay (about 5 s): wait for the first scrape.
  const up = await eventually(async () => {
    const t = (await (await fetch(`http://127.0.0.1:${promPort}/api/v1/targets`)).json()) as { data: { activeTargets: { health: string }[] } };
    return t.data.activeTargets.some((x) => x.health === 'up');
  }, 30_000, 250);
  assert.ok(up, 'Prometheus scrapes doorman');
});
after(async () => {
  await prom?.stop();
  await dm?.stop();
  await redis?.stop();
  await clamd?.stop();
  await rbl?.stop();
  await sink?.stop();
  if (promDir) fs.rmSync(promDir, { recursive: true, force: true });
});

async function query(expr: string): Promise<{ status: string; data?: { result: { metric: Record<string, string>; value: [number, string] }[] }; error?: string }> {
  const res = await fetch(`http://127.0.0.1:${promPort}/api/v1/query?query=${encodeURIComponent(expr)}`);
  return (await res.json()) as never;
}

async function session(localAddress: string, fn: (c: SmtpClient) => Promise<void>): Promise<void> {
  const c = await SmtpClient.greet(dm.port, { localAddress, timeout: 5000 });
  if (c.greeting.code === 220) await fn(c);
  c.close();
}

test('traffic, then every dashboard query returns data from a real Prometheus', { timeout: 120_000 }, async () => {
  // Accepted mail (greylisting with delay 0 lets the retry pass at once).
  for (const ip of ['127.0.0.80', '127.0.0.81']) {
    await session(ip, async (c) => {
      await c.ehlo('mta.example.org');
      await c.cmd('MAIL FROM:<a@sender.example>');
      await c.cmd('RCPT TO:<user@example.com>');
      await c.cmd('RSET');
      await c.cmd('MAIL FROM:<a@sender.example>');
      await c.cmd('RCPT TO:<user@example.com>');
      await c.cmd('DATA');
      c.write('Subject: m\r\n\r\nbody\r\n.\r\n');
      await c.reply();
      await c.cmd('QUIT');
    });
  }
  // Relay refusals: exactly RELAY_REFUSALS.
  await session('127.0.0.82', async (c) => {
    await c.ehlo('mta.example.org');
    await c.cmd('MAIL FROM:<a@sender.example>');
    for (let i = 0; i < RELAY_REFUSALS; i++) await c.cmd(`RCPT TO:<x${i}@elsewhere.example>`);
  });
  // A DNS-listed client, a rate limit, a protocol violation. (Rule timeouts are counted in the
  // runner's own tests: test/unit/runner.test.ts.)
  await session('127.0.0.90', async () => undefined);
  for (let i = 0; i < 4; i++) await session('127.0.0.83', async () => undefined);
  await session('127.0.0.84', async (c) => {
    await c.cmd('NOOP ' + 'x'.repeat(600));
  });
  // A reload.
  fs.writeFileSync(path.join(dm.rulesDir, '10-relay.yaml'), RULES['10-relay.yaml'] + '# touched\n');
  await eventually(async () => (await dm.metric('doorman_config_reloads_total', { result: 'success' })) >= 1, 5000);

  // Let Prometheus scrape the final values (rate() needs two samples in its window).
  const seen = await eventually(async () => {
    const r = await query('doorman_config_reloads_total{result="success"} >= 1');
    return (r.data?.result.length ?? 0) > 0;
  }, 15_000, 250);
  assert.ok(seen, 'Prometheus has scraped the traffic');
  await sleep(2500);
  const dash = JSON.parse(fs.readFileSync(path.join(ROOT, 'grafana', 'doorman.json'), 'utf8')) as { panels: { title: string; targets: { expr: string }[] }[] };
  const empty: string[] = [];
  for (const p of dash.panels) {
    for (const t of p.targets) {
      const expr = t.expr.replaceAll('$__rate_interval', '1m').replaceAll('$__range', '5m');
      const r = await query(expr);
      assert.equal(r.status, 'success', `${p.title}: ${expr}: ${r.error ?? ''}`);
      if (!r.data?.result.length) empty.push(`${p.title}: ${expr}`);
    }
  }
  assert.deepEqual(empty, [], 'every panel query returns data');

  // The counters tell the truth.
  const relay = await query('sum(doorman_rejections_total{rule="10-relay"})');
  assert.equal(Number(relay.data?.result[0]?.value[1]), RELAY_REFUSALS);
  assert.equal(await dm.metric('doorman_rejections_total', { rule: '10-relay', stage: 'rcpt', code: '554', enhanced_code: '5.7.1' }), RELAY_REFUSALS);
  assert.equal(await dm.metric('doorman_messages_total', { outcome: 'accepted' }), 2);
  assert.equal(await dm.metric('doorman_rejections_total', { rule: '20-dnsbl', stage: 'connect' }), 1);
  assert.equal(await dm.metric('doorman_ratelimit_exceeded_total', { limit: 'conn' }), 1);
  assert.equal(await dm.metric('doorman_protocol_violations_total', { kind: 'line_too_long' }), 1);
  assert.equal(await dm.metric('doorman_rule_errors_total', { rule: '20-dnsbl', kind: 'timeout' }), 0);
  // One new triplet (the retry passed); the relay refusals never reached greylisting.
  assert.equal(await dm.metric('doorman_greylist_total', { result: 'greylisted' }), 1);
  assert.ok((await dm.metric('doorman_connections_total')) >= 9);
});

test('/healthz and /readyz', async () => {
  const h = await fetch(`http://127.0.0.1:${dm.metricsPort}/healthz`);
  assert.equal(h.status, 200);
  const r = await fetch(`http://127.0.0.1:${dm.metricsPort}/readyz`);
  assert.equal(r.status, 200);
  assert.deepEqual(((await r.json()) as { checks: unknown }).checks, { listeners: 'up', backend: 'reachable', redis: 'reachable' });
  const hole = await startBlackHole();
  const lonely = await startDoorman({ backendPort: await freePort() });
  try {
    const nr = await fetch(`http://127.0.0.1:${lonely.metricsPort}/readyz`);
    assert.equal(nr.status, 503);
    assert.equal(((await nr.json()) as { checks: { backend: string } }).checks.backend, 'unreachable');
  } finally {
    await lonely.stop();
    await hole.stop();
  }
});
