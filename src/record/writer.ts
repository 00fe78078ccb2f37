/**
 * writer.ts — session records to disk without slowing a session: buffered, asynchronous
 * appends to JSON Lines files, rotated by size and age, bounded in total.
 *
 * `append(line)` is synchronous and never waits nor throws: the line joins a queue in memory and
 * one write loop (never more than one) appends the queue to the current file. When the queue
 * holds more than `maxPendingBytes` (the disk is slower than the traffic), the new line is
 * dropped and counted (`onDropped('lagging')`): sessions never wait for the disk, and memory
 * stays bounded. A write the disk refuses drops what it carried (`onDropped('write_error')`,
 * `onError`), and the next write opens a new file.
 *
 * Files: `<dir>/records-<UTC time>-<pid>-<seq>.jsonl` (the time the file was started: names sort
 * by age; the pid keeps cluster workers apart). A file is closed and the next one started before a
 * write would take it past `maxFileBytes` (a lone record larger than that still gets a file of
 * its own) or once it is `maxFileAge` old. After each rotation (and at start) the record files
 * in `dir` beyond `maxTotalBytes` in total are deleted, oldest first — never the file in use, nor
 * the newest file of another live process (cluster workers share the folder): the folder holds at
 * most maxTotalBytes + maxFileBytes per process writing there.
 */
import fs from 'node:fs';
import path from 'node:path';

export interface RecordWriterOptions {
  readonly dir: string;
  /** A file is rotated before it would grow past this, bytes. */
  readonly maxFileBytes: number;
  /** A file is rotated once it is this old, ms. */
  readonly maxFileAge: number;
  /** Record files in `dir` are deleted, oldest first, past this total, bytes. */
  readonly maxTotalBytes: number;
  /** Lines waiting for the disk at most, bytes; past it new lines are dropped. */
  readonly maxPendingBytes: number;
  /** Lines written (after each write). */
  readonly onWritten?: (n: number) => void;
  /** Lines dropped, and why. */
  readonly onDropped?: (n: number, reason: 'lagging' | 'write_error') => void;
  /** A file operation failed (the writer goes on). */
  readonly onError?: (err: Error) => void;
  readonly now?: () => number;
}

/** Record file names: `records-20261201T214500123Z-4242-0000.jsonl` (start time, pid, sequence). */
export const RECORD_FILE = /^records-\d{8}T\d{9}Z-\d+-\d{4}\.jsonl$/;

export class RecordWriter {
  private queue: string[] = [];
  private pendingBytes = 0;
  private writing: Promise<void> | null = null;
  private file: { handle: fs.promises.FileHandle; path: string; bytes: number; opened: number } | null = null;
  private closed = false;
  private seq = 0;
  private readonly now: () => number;

  constructor(private readonly opts: RecordWriterOptions) {
    this.now = opts.now ?? Date.now;
  }

  /** Bytes waiting for the disk now. */
  get pending(): number {
    return this.pendingBytes;
  }

  /** The file written now (null before the first write). */
  get current(): string | null {
    return this.file?.path ?? null;
  }

  /** Queues one line (without its newline); false when it was dropped. Never waits. */
  append(line: string): boolean {
    const bytes = Buffer.byteLength(line) + 1;
    if (this.closed || this.pendingBytes + bytes > this.opts.maxPendingBytes) {
      this.opts.onDropped?.(1, 'lagging');
      return false;
    }
    this.queue.push(line);
    this.pendingBytes += bytes;
    this.writing ??= this.loop();
    return true;
  }

  /** Settles once every line queued so far was written (or dropped). */
  async flush(): Promise<void> {
    while (this.writing) await this.writing;
  }

  /** Writes what is queued, then closes the file; later lines are dropped. */
  async close(): Promise<void> {
    this.closed = true;
    await this.flush();
    const f = this.file;
    this.file = null;
    await f?.handle.close().catch(() => undefined);
  }

  private async loop(): Promise<void> {
    try {
      while (this.queue.length) {
        const lines = this.queue;
        this.queue = [];
        const buf = Buffer.from(lines.join('\n') + '\n');
        this.pendingBytes -= buf.length;
        try {
          const f = await this.target(buf.length);
          await f.handle.write(buf);
          f.bytes += buf.length;
          this.opts.onWritten?.(lines.length);
        } catch (err) {
          this.opts.onDropped?.(lines.length, 'write_error');
          this.opts.onError?.(err as Error);
          // The next write starts a new file.
          const f = this.file;
          this.file = null;
          await f?.handle.close().catch(() => undefined);
        }
      }
    } finally {
      this.writing = null;
    }
  }

  /** The file for `bytes` more: the current one, or a new one when size or age says so. */
  private async target(bytes: number): Promise<NonNullable<RecordWriter['file']>> {
    const now = this.now();
    const f = this.file;
    if (f && (f.bytes + bytes <= this.opts.maxFileBytes || f.bytes === 0) && now - f.opened < this.opts.maxFileAge) return f;
    this.file = null;
    await f?.handle.close().catch(() => undefined);
    await fs.promises.mkdir(this.opts.dir, { recursive: true });
    const stamp = new Date(now).toISOString().replace(/[-:.]/g, '');
    // The sequence number orders files started within the same millisecond (a tiny maxFileBytes).
    const name = `records-${stamp}-${process.pid}-${String(this.seq++ % 10_000).padStart(4, '0')}.jsonl`;
    const p = path.join(this.opts.dir, name);
    const handle = await fs.promises.open(p, 'a');
    this.file = { handle, path: p, bytes: 0, opened: now };
    await this.prune(p);
    return this.file;
  }

  /**
   * Deletes the oldest record files past maxTotalBytes: never `keep`, nor the newest file of
   * another live process (a cluster worker writing into the same folder).
   */
  private async prune(keep: string): Promise<void> {
    const names = (await fs.promises.readdir(this.opts.dir)).filter((n) => RECORD_FILE.test(n)).sort();
    const newest = new Map<number, string>();
    for (const n of names) newest.set(pidOf(n), n);
    const inUse = new Set([...newest].filter(([pid]) => pid !== process.pid && alive(pid)).map(([, n]) => path.join(this.opts.dir, n)));
    const sizes: { p: string; size: number }[] = [];
    for (const n of names) {
      const p = path.join(this.opts.dir, n);
      const st = await fs.promises.stat(p).catch(() => null);
      if (st) sizes.push({ p, size: st.size });
    }
    let total = sizes.reduce((a, x) => a + x.size, 0);
    for (const { p, size } of sizes) {
      if (total <= this.opts.maxTotalBytes) break;
      if (p === keep || inUse.has(p)) continue;
      await fs.promises.unlink(p).catch(() => undefined);
      total -= size;
    }
  }
}

/** The process id in a record file's name. */
function pidOf(name: string): number {
  return Number(/-(\d+)-\d{4}\.jsonl$/.exec(name)?.[1] ?? 0);
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    // EPERM: it exists, owned by someone else.
    return (e as { code?: string }).code === 'EPERM';
  }
}
