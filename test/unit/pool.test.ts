/**
 * The backend pool's accounting, with stand-in connections (the integration tests in
 * backend-pool.test.ts run it against a real Postfix): connections counted from the start of their
 * opening until they are gone, never more than maxConnections, spares within the cap, a waiter
 * woken when one is freed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import type { BackendConnection } from '../../src/backend/connection.js';
import { BackendPool, parseBackendSpec, type BackendTarget } from '../../src/backend/pool.js';
import type { DnsResolver } from '../../src/net/dns.js';

/** What the pool uses of a BackendConnection. */
class FakeConn extends EventEmitter {
  alive = true;
  reusable = true;
  quit(): void {
    this.alive = false;
    this.emit('gone');
  }
}

function setup(max: number, spares = 0) {
  const spec = parseBackendSpec('127.0.0.1:25');
  assert.ok(spec?.kind === 'static');
  const counts: number[] = [];
  const pool = new BackendPool(spec, 30_000, {} as DnsResolver, { onState: () => undefined, onResolveError: () => undefined, onConnections: (_t, n) => counts.push(n) });
  pool.idleOptions = { max: 10, timeout: 60_000 };
  pool.limits = { maxConnections: max, spares, acquireTimeout: 1000 };
  const opened: FakeConn[] = [];
  const open = () => {
    const c = new FakeConn();
    opened.push(c);
    return Promise.resolve(c as unknown as BackendConnection);
  };
  const t = spec.targets[0] as BackendTarget;
  return { pool, t, open, opened, counts };
}

test('at most maxConnections; a gone connection frees its place and wakes a waiter', async () => {
  const { pool, t, open, opened } = setup(2);
  const a = await pool.acquire(t, open);
  const b = await pool.acquire(t, open);
  assert.ok(a !== 'full' && b !== 'full');
  assert.equal(await pool.acquire(t, open), 'full');
  assert.equal(pool.connections(t), 2);
  const woken = pool.waitForRoom(1000);
  opened[0]!.quit();
  assert.equal(await woken, true);
  assert.equal(pool.connections(t), 1);
  assert.notEqual(await pool.acquire(t, open), 'full');
  assert.equal(await pool.waitForRoom(20), false, 'nothing freed: the wait times out');
});

test('a connection left idle is taken again (reused) and still counted; a failed open frees its place', async () => {
  const { pool, t, open } = setup(1);
  const a = await pool.acquire(t, open);
  assert.ok(a !== 'full' && !a.reused);
  pool.putIdle(t, a.conn);
  assert.equal(pool.connections(t), 1);
  const again = await pool.acquire(t, open);
  assert.ok(again !== 'full' && again.reused && again.conn === a.conn);
  (again.conn as unknown as FakeConn).quit();
  await assert.rejects(pool.acquire(t, () => Promise.reject(new Error('refused'))), /refused/);
  assert.equal(pool.connections(t), 0);
});

test('spares are refilled after a session takes a connection, within maxConnections', async () => {
  const { pool, t, open, opened } = setup(3, 2);
  pool.opener = () => open();
  const first = await pool.acquire(t, open);
  assert.ok(first !== 'full' && !first.reused);
  await new Promise((r) => setImmediate(r));
  assert.equal(pool.idleCount, 2, 'two spares prepared');
  assert.equal(pool.connections(t), 3);
  const second = await pool.acquire(t, open);
  assert.ok(second !== 'full' && second.reused, 'the next session takes a spare');
  await new Promise((r) => setImmediate(r));
  assert.equal(pool.connections(t), 3, 'no refill past the cap');
  assert.equal(opened.length, 3);
});
