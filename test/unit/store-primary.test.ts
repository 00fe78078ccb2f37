/**
 * The cluster's in-memory store (src/store/primary.ts): a worker's calls reach the primary's one
 * MemoryStore and come back, the calls of one turn of the event loop in one message; a primary
 * that does not answer makes the call reject (the rules' fail mode applies), never hang.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import type { Cluster, Worker } from 'node:cluster';
import { serveStore, WorkerStore } from '../../src/store/primary.js';

/** Two workers wired to one primary through fake IPC channels; `sent` counts their messages. */
function wire(sent = { n: 0 }) {
  const primary = new EventEmitter();
  const procs = [1, 2].map((id) => {
    const proc = new EventEmitter() as EventEmitter & { send: (m: unknown) => boolean; connected: boolean };
    const worker = { id, isConnected: () => true, send: (m: unknown) => setImmediate(() => proc.emit('message', m)) } as unknown as Worker;
    proc.connected = true;
    proc.send = (m: unknown) => {
      sent.n++;
      setImmediate(() => primary.emit('message', worker, m));
      return true;
    };
    return proc;
  });
  serveStore(primary as unknown as Cluster);
  return procs.map((p) => new WorkerStore(200, p as unknown as NodeJS.Process));
}

test('two workers share one bucket, one slot set and one greylist triplet', async () => {
  const [a, b] = wire();
  assert.ok(a && b);
  assert.equal((await a.rate('k', 60_000, 2, 1)).allowed, true);
  assert.equal((await b.rate('k', 60_000, 2, 1)).allowed, true);
  assert.equal((await a.rate('k', 60_000, 2, 1)).allowed, false, 'the limit holds across workers');
  assert.equal((await a.acquire('c', 's1', 1, 60_000)).ok, true);
  assert.equal((await b.acquire('c', 's2', 1, 60_000)).ok, false);
  await a.release('c', 's1');
  assert.equal((await b.acquire('c', 's2', 1, 60_000)).ok, true);
  assert.equal((await a.greylist('t', 0, 60_000, 60_000)).firstAttempt, true);
  assert.equal((await b.greylist('t', 0, 60_000, 60_000)).passed, true, 'the retry on the other worker finds the triplet');
  // The looks of `doorman explain` travel too, and change nothing.
  assert.deepEqual(await a.peekSlots('c', 's3', 1), { ok: false, inUse: 1 });
  assert.deepEqual(await b.peekSlots('c', 's2', 1), { ok: true, inUse: 1 });
  assert.deepEqual(await a.peekGreylist('new', 1000), { passed: false, waitMs: 1000, firstAttempt: true });
  assert.equal((await b.inspect('new')).state, null);
  assert.equal(await b.reset('k'), true);
  assert.equal((await a.inspect('k')).state, null);
  await a.close();
  await b.close();
});

test('a primary that does not answer: the call rejects at the deadline', async () => {
  const proc = new EventEmitter() as EventEmitter & { send: (m: unknown) => boolean; connected: boolean };
  proc.connected = true;
  proc.send = () => true;
  const s = new WorkerStore(50, proc as unknown as NodeJS.Process);
  const t0 = Date.now();
  const alive = setTimeout(() => undefined, 5000); // the deadline's timer is unref'd, as in a worker
  await assert.rejects(s.rate('k', 1000, 1, 1), /did not answer/);
  clearTimeout(alive);
  assert.ok(Date.now() - t0 >= 45);
  await s.close();
});

test('the calls of one turn of the event loop travel in one message, each with its own answer', async () => {
  const sent = { n: 0 };
  const [a] = wire(sent);
  assert.ok(a);
  const answers = await Promise.all([a.rate('x', 60_000, 1, 1), a.rate('x', 60_000, 1, 1), a.acquire('s', 't', 1, 60_000), a.rate('y', 60_000, 1, 1)]);
  assert.equal(sent.n, 1);
  assert.deepEqual(
    answers.map((r) => ('allowed' in r ? r.allowed : r.ok)),
    [true, false, true, true],
    'in the order they were made',
  );
  assert.equal((await a.rate('y', 60_000, 1, 1)).allowed, false);
  assert.equal(sent.n, 2);
  await a.close();
});
