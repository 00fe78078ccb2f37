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
      env: { ...process.env, BENCH_OUT: out, BENCH_REPS: '1', BENCH_MESSAGES: '40', BENCH_IDLE: '50', BENCH_ONLY: 'a,b,d', BENCH_PIPE: '1', BENCH_WORKERS: '1' },
    });
    const json = JSON.parse(fs.readFileSync(path.join(out, 'latest.json'), 'utf8')) as { rows: BenchRow[]; reps: number };
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
    const idle = find('(d)', 'no rules');
    assert.ok(idle && idle.doorman > 0, 'RSS per idle connection measured');
    assert.match(idle.note ?? '', /50 of 50 greeted/);
    const md = fs.readFileSync(path.join(out, 'latest.md'), 'utf8');
    assert.match(md, /^\| workload \| doorman config \| direct \| doorman \| ratio \|/);
  } finally {
    fs.rmSync(out, { recursive: true, force: true });
  }
});
