/**
 * proc-stat.ts — CPU time and RSS of a process under test, read from /proc: the process alone, or
 * with its children (doorman's cluster workers, the pipe's processes). Shared by bench/run.ts and
 * bench/one-worker.ts.
 */
import fs from 'node:fs';

/** The process's children (none when the kernel keeps no list). */
export function childrenOf(pid: number): number[] {
  try {
    return fs.readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

/** One process's CPU time (user + system, ms) and RSS (kB); zeros for a process that is gone. */
export function ownStat(pid: number): { cpuMs: number; rssKb: number } {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    const cpuMs = ((Number(stat[11]) + Number(stat[12])) * 1000) / 100; // utime + stime, 100 Hz
    const rssKb = Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
    return { cpuMs, rssKb };
  } catch {
    return { cpuMs: 0, rssKb: 0 };
  }
}

/** CPU time and RSS of a process and its children together. */
export function procStat(pid: number): { cpuMs: number; rssKb: number } {
  let cpuMs = 0;
  let rssKb = 0;
  for (const p of [pid, ...childrenOf(pid)]) {
    const s = ownStat(p);
    cpuMs += s.cpuMs;
    rssKb += s.rssKb;
  }
  return { cpuMs, rssKb };
}
