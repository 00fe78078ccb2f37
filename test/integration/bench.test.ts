/**
 * The benchmark itself keeps working: `npm run bench` with tiny counts (one repetition, 40
 * messages, 50 idle sessions, the raw-pipe peer) writes a JSON and a Markdown table with every
 * row the issue asks for, the shipped-defaults rows (install.sh's doorman) among them. The figures themselves are not asserted (speed is measured by the
 * bench, never in tests) — only that they were measured.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { ROOT } from '../helpers/doorman.js';

const run = promisify(execFile);

interface RedisUse {
  workload: string;
  config: string;
  sessions: number;
  messages: number;
  calls: Record<string, number>;
}

interface BenchRow {
  workload: string;
  config: string;
  direct: number | null;
  doorman: number;
  unit: string;
  note?: string;
}

test('the benchmark runs end to end and writes its JSON and Markdown tables', { timeout: 240_000 }, async () => {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-bench-'));
  try {
    await run(process.execPath, ['--import', 'tsx', path.join(ROOT, 'bench', 'run.ts')], {
      cwd: ROOT,
      timeout: 230_000,
      maxBuffer: 16 * 1024 * 1024,
      env: { ...process.env, BENCH_OUT: out, BENCH_REPS: '1', BENCH_MESSAGES: '40', BENCH_IDLE: '50', BENCH_ONLY: 'a,b,d', BENCH_PIPE: '1', BENCH_WORKERS: '1', BENCH_REDIS: '1' },
    });
    const json = JSON.parse(fs.readFileSync(path.join(out, 'latest.json'), 'utf8')) as { rows: BenchRow[]; reps: number; redis: RedisUse[] };
    assert.equal(json.reps, 1);
    const find = (w: string, c: string) => json.rows.find((r) => r.workload.startsWith(w) && r.config.startsWith(c));
    for (const w of ['(a)', '(b)']) {
      for (const c of ['no rules', 'default rules', 'raw Node pipe']) {
        const r = find(w, c);
        assert.ok(r, `${w} ${c} measured`);
        assert.ok((r.direct ?? 0) > 0 && r.doorman > 0, `${w} ${c}: msg/s on both paths`);
        assert.equal(r.unit, 'msg/s');
      }
      assert.match(find(w, 'no rules')?.note ?? '', /× the raw pipe/);
      // Doorman as scripts/install.sh starts it, beside the tuned rows, with what its defaults refused.
      const shipped = find(w, 'shipped defaults (install.sh)');
      assert.ok(shipped && (shipped.direct ?? 0) > 0 && shipped.doorman > 0, `${w} shipped defaults measured`);
      assert.match(shipped.note ?? '', /× the tuned default rules; resolver \d+ ms late; .* connections refused, \d+ rule refusals/);
    }
    // BENCH_REDIS=1: Redis's commandstats around the Redis-backed rows, against doorman's counts.
    for (const w of ['(a)', '(b)']) {
      const u = json.redis.find((x) => x.workload.startsWith(w) && x.config === 'shipped rules, Redis');
      assert.ok(u && u.messages > 0 && u.sessions > 0, `${w} Redis use counted`);
      assert.ok((u.calls.evalsha ?? 0) > 0, `${w}: the rate-limit script ran by EVALSHA`);
    }
    const idle = find('(d)', 'no rules');
    assert.ok(idle && idle.doorman > 0, 'RSS per idle connection measured');
    assert.match(idle.note ?? '', /50 of 50 greeted/);
    const md = fs.readFileSync(path.join(out, 'latest.md'), 'utf8');
    assert.match(md, /^\| workload \| doorman config \| direct \| doorman \| ratio \|/);
    assert.match(md, /- shipped rules, Redis: .*evalsha: [\d.-]+ per session \+ [\d.-]+ per message/);
  } finally {
    fs.rmSync(out, { recursive: true, force: true });
  }
});

test('the Redis capacity script measures one Redis and a 3-master cluster', { timeout: 120_000 }, async () => {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-cap-'));
  try {
    await run(process.execPath, ['--import', 'tsx', path.join(ROOT, 'bench', 'redis-capacity.ts')], {
      cwd: ROOT,
      timeout: 110_000,
      env: { ...process.env, CAP_OUT: out, CAP_SECONDS: '1', CAP_CLIENTS: '1', CAP_INFLIGHT: '8', CAP_BENCH_CALLS: '2000' },
    });
    const json = JSON.parse(fs.readFileSync(path.join(out, 'redis-capacity.json'), 'utf8')) as { results: { target: string; callsPerSec: number; errors: number; redisCpuUsPerCall: number }[]; redisBenchmark: number };
    assert.deepEqual(json.results.map((r) => r.target), ['one Redis', 'Redis Cluster, 3 masters']);
    for (const r of json.results) {
      assert.ok(r.callsPerSec > 0 && r.errors === 0, `${r.target}: calls made without errors`);
      assert.ok(r.redisCpuUsPerCall > 0, `${r.target}: Redis CPU per call measured`);
    }
    assert.ok(json.redisBenchmark > 0, 'redis-benchmark ran the script');
  } finally {
    fs.rmSync(out, { recursive: true, force: true });
  }
});
