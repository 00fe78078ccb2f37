/**
 * The session record writer (src/record/writer.ts): rotation by size and age, the total bound on
 * disk (oldest files deleted), records dropped and counted while the disk lags, never a wait.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { RECORD_FILE, RecordWriter } from '../../src/record/writer.js';

function tmp(t: { after: (fn: () => void) => void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-rec-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

const files = (dir: string) =>
  fs
    .readdirSync(dir)
    .filter((n) => RECORD_FILE.test(n))
    .sort();
const lines = (dir: string) => files(dir).flatMap((n) => fs.readFileSync(path.join(dir, n), 'utf8').split('\n').filter(Boolean));

const BIG = 1 << 30;

test('lines are appended as JSON Lines, in order, to one file', async (t) => {
  const dir = tmp(t);
  let written = 0;
  const w = new RecordWriter({ dir, maxFileBytes: BIG, maxFileAge: 3_600_000, maxTotalBytes: BIG, maxPendingBytes: 1 << 20, onWritten: (n) => (written += n) });
  for (let i = 0; i < 100; i++) assert.equal(w.append(JSON.stringify({ i })), true);
  await w.close();
  assert.equal(files(dir).length, 1);
  assert.deepEqual(
    lines(dir).map((l) => (JSON.parse(l) as { i: number }).i),
    Array.from({ length: 100 }, (_, i) => i),
  );
  assert.equal(written, 100);
});

test('a file is rotated before it would pass maxFileBytes', async (t) => {
  const dir = tmp(t);
  const w = new RecordWriter({ dir, maxFileBytes: 1000, maxFileAge: 3_600_000, maxTotalBytes: BIG, maxPendingBytes: 1 << 20 });
  const line = 'x'.repeat(99); // 100 bytes with its newline
  for (let i = 0; i < 25; i++) {
    w.append(line);
    await w.flush(); // one write per line: the size check sees each
  }
  await w.close();
  const names = files(dir);
  assert.equal(names.length, 3, names.join(' '));
  for (const n of names) assert.ok(fs.statSync(path.join(dir, n)).size <= 1000, n);
  assert.equal(lines(dir).length, 25);
});

test('a file is rotated once it is maxFileAge old', async (t) => {
  const dir = tmp(t);
  let now = Date.parse('2026-12-01T10:00:00Z');
  const w = new RecordWriter({ dir, maxFileBytes: BIG, maxFileAge: 60_000, maxTotalBytes: BIG, maxPendingBytes: 1 << 20, now: () => now });
  w.append('a');
  await w.flush();
  now += 59_000;
  w.append('b');
  await w.flush();
  now += 1_000;
  w.append('c');
  await w.close();
  const names = files(dir);
  assert.equal(names.length, 2);
  assert.match(names[0] ?? '', /^records-20261201T100000000Z-/);
  assert.match(names[1] ?? '', /^records-20261201T100100000Z-/);
  assert.equal(fs.readFileSync(path.join(dir, names[0] ?? ''), 'utf8'), 'a\nb\n');
});

test('past maxTotalBytes the oldest files are deleted, never the one in use', async (t) => {
  const dir = tmp(t);
  // Someone else's file in the folder is left alone.
  fs.writeFileSync(path.join(dir, 'notes.txt'), 'x'.repeat(5000));
  const w = new RecordWriter({ dir, maxFileBytes: 1000, maxFileAge: 3_600_000, maxTotalBytes: 2500, maxPendingBytes: 1 << 20 });
  const line = 'y'.repeat(499); // 500 bytes: two per file
  for (let i = 0; i < 20; i++) {
    w.append(`${String(i).padStart(3, '0')}${line.slice(3)}`);
    await w.flush();
  }
  await w.close();
  const names = files(dir);
  const total = names.reduce((a, n) => a + fs.statSync(path.join(dir, n)).size, 0);
  // At most maxTotalBytes plus the file in use.
  assert.ok(total <= 2500 + 1000, `total ${total}`);
  assert.ok(names.length >= 2 && names.length <= 4, names.join(' '));
  // The newest records are kept, the oldest gone.
  const kept = lines(dir).map((l) => Number(l.slice(0, 3)));
  assert.equal(kept.at(-1), 19);
  assert.ok(!kept.includes(0));
  assert.ok(fs.existsSync(path.join(dir, 'notes.txt')));
});

test('while the disk lags, records past maxPendingBytes are dropped and counted; append never waits', async (t) => {
  const dir = tmp(t);
  const dropped: [number, string][] = [];
  let written = 0;
  const w = new RecordWriter({
    dir,
    maxFileBytes: BIG,
    maxFileAge: 3_600_000,
    maxTotalBytes: BIG,
    maxPendingBytes: 10_000,
    onWritten: (n) => (written += n),
    onDropped: (n, reason) => dropped.push([n, reason]),
  });
  const line = 'z'.repeat(999); // 1000 bytes
  // All appended in one synchronous burst: the disk has had no chance to take any of it.
  const started = performance.now();
  const accepted = Array.from({ length: 50 }, () => w.append(line)).filter(Boolean).length;
  const ms = performance.now() - started;
  assert.ok(ms < 200, `append took ${ms} ms`);
  assert.ok(accepted >= 9 && accepted <= 11, `accepted ${accepted}`);
  assert.ok(w.pending <= 10_000);
  await w.flush();
  assert.equal(written, accepted);
  assert.equal(
    dropped.reduce((a, [n]) => a + n, 0),
    50 - accepted,
  );
  assert.ok(dropped.every(([, r]) => r === 'lagging'));
  // Caught up: records are taken again.
  assert.equal(w.append(line), true);
  await w.close();
  assert.equal(lines(dir).length, accepted + 1);
});

test('a disk that refuses the write drops the records, counted as write_error; the writer goes on', async (t) => {
  const dir = tmp(t);
  const blocked = path.join(dir, 'file-not-folder');
  fs.writeFileSync(blocked, '');
  const dropped: string[] = [];
  const errors: string[] = [];
  const w = new RecordWriter({
    dir: blocked,
    maxFileBytes: BIG,
    maxFileAge: 3_600_000,
    maxTotalBytes: BIG,
    maxPendingBytes: 1 << 20,
    onDropped: (_n, reason) => dropped.push(reason),
    onError: (e) => errors.push(e.message),
  });
  assert.equal(w.append('a'), true);
  await w.flush();
  assert.deepEqual(dropped, ['write_error']);
  assert.equal(errors.length, 1);
  await w.close();
});

test('the total bound never deletes the file another live worker writes', async (t) => {
  const dir = tmp(t);
  const isAlive = (pid: number) => {
    try {
      process.kill(pid, 0);
      return true;
    } catch (e) {
      return (e as { code?: string }).code === 'EPERM';
    }
  };
  let dead = 900_000;
  for (let i = 0; i < 100 && isAlive(dead); i++) dead++;
  assert.ok(!isAlive(dead));
  // Older files than ours: a live process's (our parent, standing in for a worker) and a dead one's.
  const live = path.join(dir, `records-20200101T000000000Z-${process.ppid}-0000.jsonl`);
  const gone = path.join(dir, `records-20200101T000000001Z-${dead}-0000.jsonl`);
  fs.writeFileSync(live, 'l'.repeat(3000) + '\n');
  fs.writeFileSync(gone, 'g'.repeat(3000) + '\n');
  const w = new RecordWriter({ dir, maxFileBytes: 1000, maxFileAge: 3_600_000, maxTotalBytes: 2000, maxPendingBytes: 1 << 20 });
  w.append('x');
  await w.close();
  assert.ok(fs.existsSync(live), 'the live process keeps its file');
  assert.ok(!fs.existsSync(gone), "the dead process's file is deleted");
});
