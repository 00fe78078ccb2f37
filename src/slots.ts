/**
 * slots.ts — the connection limits (limits.maxClients in total, limits.maxClientsPerIp per client
 * key), counted from the moment a connection is accepted until it closes, whatever the path:
 * PROXY header, TLS handshake, session.
 *
 * A connection takes its total slot at accept, and its client slot as soon as the client is known
 * (at accept, or after a trusted balancer's PROXY header names it). `release` gives back what was
 * taken. In one process `LocalSlots` counts; in cluster mode the primary keeps one `LocalSlots`
 * for the whole instance (`serveSlots`) and each worker asks it over IPC (`WorkerSlots`), so the
 * limits hold for the instance, not per worker.
 */
import type { Cluster, Worker } from 'node:cluster';

/** Why a connection was refused a slot (the `reason` label of doorman_connections_refused_total). */
export type Refusal = 'max_clients' | 'max_clients_per_ip';

export interface SlotLimits {
  readonly maxClients: number;
  readonly maxClientsPerIp: number;
}

export interface Slots {
  /**
   * Takes a total slot (when `total`) and a slot under `key` (when not null), both or neither.
   * Returns null when taken, else why not; a Promise when the count lives in another process.
   */
  take(total: boolean, key: string | null, limits: SlotLimits): Refusal | null | Promise<Refusal | null>;
  /** Gives back what `take` took. */
  release(total: boolean, key: string | null): void;
}

/** The counts, in this process. */
export class LocalSlots implements Slots {
  private total = 0;
  private readonly perKey = new Map<string, number>();

  take(total: boolean, key: string | null, limits: SlotLimits): Refusal | null {
    if (total && this.total >= limits.maxClients) return 'max_clients';
    const n = key === null ? 0 : (this.perKey.get(key) ?? 0);
    if (key !== null && n >= limits.maxClientsPerIp) return 'max_clients_per_ip';
    if (total) this.total++;
    if (key !== null) this.perKey.set(key, n + 1);
    return null;
  }

  release(total: boolean, key: string | null): void {
    if (total) this.total = Math.max(0, this.total - 1);
    if (key === null) return;
    const left = (this.perKey.get(key) ?? 1) - 1;
    if (left <= 0) this.perKey.delete(key);
    else this.perKey.set(key, left);
  }

  /** Connections counted now, in total and under one key. */
  held(key?: string): number {
    return key === undefined ? this.total : (this.perKey.get(key) ?? 0);
  }
}

/** The IPC messages between a worker and the primary (tagged so other IPC users ignore them). */
interface TakeMessage {
  doormanSlots: 'take';
  id: number;
  total: boolean;
  key: string | null;
  limits: SlotLimits;
}
interface ReleaseMessage {
  doormanSlots: 'release';
  total: boolean;
  key: string | null;
}
interface AnswerMessage {
  doormanSlots: 'answer';
  id: number;
  refusal: Refusal | null;
}
type SlotMessage = TakeMessage | ReleaseMessage | AnswerMessage;

function isSlotMessage(m: unknown): m is SlotMessage {
  return typeof m === 'object' && m !== null && 'doormanSlots' in m;
}

/**
 * How long a worker waits for the primary's answer before admitting the connection without a
 * slot, ms: the primary answers in well under a millisecond; a primary that does not answer at all
 * must not stop a worker from serving mail.
 */
export const SLOT_ANSWER_TIMEOUT = 2_000;

/** A worker's view: every take and release goes to the primary (one IPC round trip per take). */
export class WorkerSlots implements Slots {
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (r: Refusal | null) => void; timer: NodeJS.Timeout }>();

  constructor(private readonly proc: NodeJS.Process = process) {
    proc.on('message', (m: unknown) => {
      if (!isSlotMessage(m) || m.doormanSlots !== 'answer') return;
      const w = this.waiting.get(m.id);
      if (!w) return;
      this.waiting.delete(m.id);
      clearTimeout(w.timer);
      w.resolve(m.refusal);
    });
  }

  take(total: boolean, key: string | null, limits: SlotLimits): Promise<Refusal | null> {
    const id = this.nextId++;
    return new Promise((resolve) => {
      const msg: TakeMessage = { doormanSlots: 'take', id, total, key, limits: { maxClients: limits.maxClients, maxClientsPerIp: limits.maxClientsPerIp } };
      if (!this.proc.send || !this.proc.connected) return resolve(null);
      // No answer: admit (fail open). The connection still releases on close; the primary gives
      // back only what it counted for this worker.
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        resolve(null);
      }, SLOT_ANSWER_TIMEOUT);
      timer.unref();
      this.waiting.set(id, { resolve, timer });
      this.proc.send(msg);
    });
  }

  release(total: boolean, key: string | null): void {
    if (!total && key === null) return;
    const msg: ReleaseMessage = { doormanSlots: 'release', total, key };
    if (this.proc.send && this.proc.connected) this.proc.send(msg);
  }
}

/**
 * The primary's side: one count for all workers. What a worker holds is given back when it
 * exits, so a worker that dies does not leave its connections counted.
 */
export function serveSlots(workers: Cluster): LocalSlots {
  const slots = new LocalSlots();
  const held = new Map<number, { total: number; keys: Map<string, number> }>();
  const of = (w: Worker) => {
    let h = held.get(w.id);
    if (!h) held.set(w.id, (h = { total: 0, keys: new Map() }));
    return h;
  };
  workers.on('message', (w: Worker, m: unknown) => {
    if (!isSlotMessage(m)) return;
    const h = of(w);
    if (m.doormanSlots === 'take') {
      const refusal = slots.take(m.total, m.key, m.limits);
      if (!refusal) {
        if (m.total) h.total++;
        if (m.key !== null) h.keys.set(m.key, (h.keys.get(m.key) ?? 0) + 1);
      }
      const answer: AnswerMessage = { doormanSlots: 'answer', id: m.id, refusal };
      if (w.isConnected()) w.send(answer);
      else slots.release(!refusal && m.total, refusal ? null : m.key);
    } else if (m.doormanSlots === 'release') {
      // Only what this worker holds (a take that timed out on its side may never have been counted).
      const total = m.total && h.total > 0;
      const n = m.key === null ? 0 : (h.keys.get(m.key) ?? 0);
      const key = n > 0 ? m.key : null;
      if (total) h.total--;
      if (key !== null) {
        if (n <= 1) h.keys.delete(key);
        else h.keys.set(key, n - 1);
      }
      slots.release(total, key);
    }
  });
  workers.on('exit', (w: Worker) => {
    const h = held.get(w.id);
    held.delete(w.id);
    if (!h) return;
    for (let i = 0; i < h.total; i++) slots.release(true, null);
    for (const [k, n] of h.keys) for (let i = 0; i < n; i++) slots.release(false, k);
  });
  return slots;
}
