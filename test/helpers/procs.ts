/**
 * procs.ts — start real programs for tests and stop every one of them by its PID.
 * Each test file calls `stopAll()` in an `after` hook (see `useCleanup`).
 */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { after } from 'node:test';

export interface Proc {
  readonly name: string;
  readonly child: ChildProcess;
  readonly pid: number;
  /** Everything written to stdout and stderr so far. */
  output(): string;
  /** Resolves when `re` matches the output (or rejects after `timeout` ms / on exit). */
  waitFor(re: RegExp, timeout?: number): Promise<RegExpMatchArray>;
  /** Resolves with the exit code (or signal name). */
  readonly exited: Promise<number | string>;
  /** Sends `signal` and waits up to `timeout` ms for the exit, then SIGKILL. */
  stop(signal?: NodeJS.Signals, timeout?: number): Promise<number | string>;
}

const running = new Set<Proc>();
const extraPids = new Set<number>();
const closers = new Set<() => Promise<void>>();

export function spawnProc(name: string, cmd: string, args: string[], opts: SpawnOptions = {}): Proc {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  let out = '';
  const waiters = new Set<() => void>();
  const onOut = (d: Buffer) => {
    out += d.toString('utf8');
    for (const w of waiters) w();
  };
  child.stdout?.on('data', onOut);
  child.stderr?.on('data', onOut);
  // Set before the waiters hear of the exit, so that waitFor rejects at once instead of at its timeout.
  let done = false;
  const exited = new Promise<number | string>((resolve) => {
    child.once('exit', (code, sig) => {
      done = true;
      running.delete(proc);
      for (const w of waiters) w();
      resolve(code ?? sig ?? -1);
    });
    child.once('error', (e) => {
      out += `spawn error: ${e.message}\n`;
      done = true;
      running.delete(proc);
      for (const w of waiters) w();
      resolve(-1);
    });
  });
  const proc: Proc = {
    name,
    child,
    pid: child.pid ?? -1,
    output: () => out,
    exited,
    waitFor(re, timeout = 10_000) {
      return new Promise((resolve, reject) => {
        const check = () => {
          const m = re.exec(out);
          if (m) {
            cleanup();
            resolve(m);
          } else if (done) {
            cleanup();
            reject(new Error(`${name} exited before ${re}: ${out.slice(-2000)}`));
          }
        };
        const t = setTimeout(() => {
          cleanup();
          reject(new Error(`${name}: timeout waiting for ${re}; output: ${out.slice(-2000)}`));
        }, timeout);
        const cleanup = () => {
          clearTimeout(t);
          waiters.delete(check);
        };
        waiters.add(check);
        check();
      });
    },
    async stop(signal = 'SIGTERM', timeout = 5000) {
      if (done) return exited;
      try {
        process.kill(proc.pid, signal);
      } catch {
        return exited;
      }
      const t = setTimeout(() => {
        try {
          process.kill(proc.pid, 'SIGKILL');
        } catch {
          /* gone */
        }
      }, timeout);
      const r = await exited;
      clearTimeout(t);
      return r;
    },
  };
  running.add(proc);
  return proc;
}

/** A daemon that forks away from us (Postfix master): stopped by its PID at cleanup. */
export function trackPid(pid: number): void {
  extraPids.add(pid);
}

export function untrackPid(pid: number): void {
  extraPids.delete(pid);
}

/**
 * An in-process server a test opened (the fake backend): closed at cleanup if a failed test left
 * it open — an open server would keep the test file running until CI's own timeout.
 */
export function trackCloser(close: () => Promise<void>): void {
  closers.add(close);
}

export async function stopAll(): Promise<void> {
  await Promise.all([...closers].map((c) => c().catch(() => undefined)));
  closers.clear();
  await Promise.all([...running].map((p) => p.stop('SIGKILL', 2000)));
  for (const pid of extraPids) {
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      /* gone */
    }
  }
  extraPids.clear();
}

/** Registers `stopAll` to run after the test file. */
export function useCleanup(): void {
  after(stopAll);
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls `fn` until it returns a truthy value or `timeout` ms pass. */
export async function eventually<T>(fn: () => T | Promise<T>, timeout = 5000, every = 50): Promise<T> {
  const end = Date.now() + timeout;
  let last: T;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > end) return last;
    await sleep(every);
  }
}
