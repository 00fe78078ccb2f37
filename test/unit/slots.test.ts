/**
 * Connection slots (src/slots.ts): counted in total and per client, both or neither, released;
 * in cluster mode the primary's count, fed by worker messages, gives back what a dead worker held.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import type { Cluster, Worker } from 'node:cluster';
import { LocalSlots, serveSlots } from '../../src/slots.js';

test('LocalSlots: total and per key, both or neither, and released', () => {
  const s = new LocalSlots();
  const limits = { maxClients: 3, maxClientsPerIp: 2 };
  assert.equal(s.take(true, 'a', limits), null);
  assert.equal(s.take(true, 'a', limits), null);
  assert.equal(s.take(true, 'a', limits), 'max_clients_per_ip');
  assert.equal(s.held(), 2, 'a refused take takes nothing');
  assert.equal(s.take(true, null, limits), null);
  assert.equal(s.take(true, 'b', limits), 'max_clients');
  assert.equal(s.take(false, 'b', limits), null, 'a client slot for a connection counted in total already');
  s.release(true, 'a');
  assert.equal(s.held('a'), 1);
  assert.equal(s.held(), 2);
  s.release(true, 'a');
  s.release(true, 'b');
  assert.equal(s.held(), 0);
  assert.equal(s.held('a'), 0);
});

test('serveSlots: the primary answers takes, counts for all workers, and frees what a dead worker held', () => {
  const cluster = new EventEmitter();
  const sent: unknown[] = [];
  const worker = (id: number) => ({ id, isConnected: () => true, send: (m: unknown) => sent.push(m) }) as unknown as Worker;
  const w1 = worker(1);
  const w2 = worker(2);
  const w3 = worker(3);
  const slots = serveSlots(cluster as unknown as Cluster);
  const limits = { maxClients: 10, maxClientsPerIp: 2 };
  const take = (w: Worker, id: number, key: string) => cluster.emit('message', w, { doormanSlots: 'take', id, total: true, key, limits });
  take(w1, 1, 'a');
  take(w2, 1, 'a');
  take(w2, 2, 'a');
  assert.deepEqual(sent, [
    { doormanSlots: 'answer', id: 1, refusal: null },
    { doormanSlots: 'answer', id: 1, refusal: null },
    { doormanSlots: 'answer', id: 2, refusal: 'max_clients_per_ip' },
  ]);
  // A release for something this worker never held (a take that timed out) changes nothing.
  cluster.emit('message', w3, { doormanSlots: 'release', total: true, key: 'a' });
  assert.equal(slots.held(), 2);
  cluster.emit('message', w1, { doormanSlots: 'release', total: true, key: 'a' });
  assert.equal(slots.held('a'), 1);
  cluster.emit('exit', w2);
  assert.equal(slots.held(), 0);
  assert.equal(slots.held('a'), 0);
  cluster.emit('message', w1, { unrelated: true });
  assert.equal(sent.length, 3, 'other IPC messages are left alone');
});
