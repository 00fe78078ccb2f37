/**
 * spool.ts — a message held until its data_end verdict: in memory up to a bound, then on disk.
 *
 * When a rule reads the body (DKIM, a content scanner), its verdict can add header fields
 * (Authentication-Results, tags) that must come before the body; the message is therefore held
 * and sent to the backend only after that verdict. The first `inMemory` octets stay in memory;
 * the rest go to a file in `dir`, created with mode 0600 and unlinked at once (it disappears
 * with its descriptor, even if doorman is killed). Memory per held message is bounded by
 * `inMemory` plus the writes in flight (at most SPOOL_WRITE_AHEAD: past it, `write` returns a
 * Promise and the session stops reading the client until the disk catches up).
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { copyOf } from '../protocol/bytes.js';

/** File writes in flight, octets, before the writer waits. */
const SPOOL_WRITE_AHEAD = 1 << 20;
/** Read size when replaying the file. */
const READ_SIZE = 64 * 1024;

let fileCounter = 0;

export class Spool {
  private readonly memory: Buffer[] = [];
  private memoryBytes = 0;
  private file: Promise<fs.FileHandle> | null = null;
  private fileBytes = 0;
  private writing: Promise<void> = Promise.resolve();
  private inFlight = 0;
  private failure: Error | null = null;
  private disposed = false;

  constructor(
    private readonly inMemory: number,
    private readonly dir: string,
  ) {}

  /** Octets held (memory and file). */
  get size(): number {
    return this.memoryBytes + this.fileBytes;
  }

  /** Appends `chunks` (copied); a Promise when the disk is behind (wait before writing more). */
  write(chunks: readonly Buffer[]): void | Promise<void> {
    for (const c of chunks) {
      if (this.file === null && this.memoryBytes + c.length <= this.inMemory) {
        this.memory.push(copyOf(c));
        this.memoryBytes += c.length;
        continue;
      }
      this.toFile(copyOf(c));
    }
    if (this.inFlight > SPOOL_WRITE_AHEAD) return this.writing;
  }

  private toFile(c: Buffer): void {
    this.file ??= openUnlinked(this.dir || os.tmpdir());
    const file = this.file;
    const at = this.fileBytes;
    this.fileBytes += c.length;
    this.inFlight += c.length;
    this.writing = this.writing.then(async () => {
      if (this.failure || this.disposed) return;
      try {
        await (await file).write(c, 0, c.length, at);
      } catch (err) {
        this.failure = err instanceof Error ? err : new Error(String(err));
      } finally {
        this.inFlight -= c.length;
      }
    });
  }

  /** The held message, in order, in chunks; throws if the disk failed. */
  async *read(): AsyncGenerator<Buffer> {
    for (const c of this.memory) yield c;
    if (!this.file) return;
    await this.writing;
    if (this.failure) throw this.failure;
    const fh = await this.file;
    for (let at = 0; at < this.fileBytes; ) {
      const buf = Buffer.allocUnsafe(Math.min(READ_SIZE, this.fileBytes - at));
      const { bytesRead } = await fh.read(buf, 0, buf.length, at);
      if (bytesRead === 0) throw new Error('spool file shorter than written');
      at += bytesRead;
      yield buf.subarray(0, bytesRead);
    }
  }

  /** Frees the memory and closes the file (already unlinked). */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.memory.length = 0;
    const file = this.file;
    if (file) void this.writing.then(() => file).then((fh) => fh.close(), () => undefined);
  }
}

async function openUnlinked(dir: string): Promise<fs.FileHandle> {
  const name = path.join(dir, `doorman-spool-${process.pid}-${Date.now().toString(36)}-${(fileCounter++).toString(36)}`);
  const fh = await fs.open(name, 'wx+', 0o600);
  await fs.unlink(name);
  return fh;
}
