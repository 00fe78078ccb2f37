/**
 * watch.ts — reload the rule files, the configuration file and the TLS certificate when they
 * change. Editors write files in several steps (temp file, rename), so changes are debounced;
 * SIGHUP reloads too (see cli.ts).
 */
import fs from 'node:fs';
import path from 'node:path';

/** Quiet time after the last change before reloading, ms. */
export const RELOAD_DEBOUNCE = 250;

export function watchRules(dir: string, reload: () => void): { close(): void } {
  let timer: NodeJS.Timeout | null = null;
  let watcher: fs.FSWatcher | null = null;
  try {
    watcher = fs.watch(dir, { persistent: false }, (_event, file) => {
      if (file && !/\.ya?ml$/.test(String(file))) return;
      if (timer) clearTimeout(timer);
      timer = setTimeout(() => {
        timer = null;
        reload();
      }, RELOAD_DEBOUNCE);
    });
    watcher.on('error', () => undefined);
  } catch {
    watcher = null;
  }
  return {
    close() {
      if (timer) clearTimeout(timer);
      watcher?.close();
    },
  };
}

/**
 * Calls `onChange` (debounced) when one of the files changes. The folder holding each file is
 * watched, not the file: a renewed certificate or an edited configuration usually arrives as a
 * new file renamed over the old one (or a symlink switched, as certbot does), which ends a watch
 * on the file itself.
 */
export function watchFiles(files: readonly string[], onChange: () => void): { close(): void } {
  let timer: NodeJS.Timeout | null = null;
  const byDir = new Map<string, Set<string>>();
  for (const f of files) {
    const dir = path.dirname(f);
    const names = byDir.get(dir) ?? new Set<string>();
    names.add(path.basename(f));
    byDir.set(dir, names);
  }
  const watchers: fs.FSWatcher[] = [];
  for (const [dir, names] of byDir) {
    try {
      const w = fs.watch(dir, { persistent: false }, (_event, file) => {
        if (file && !names.has(String(file))) return;
        if (timer) clearTimeout(timer);
        timer = setTimeout(() => {
          timer = null;
          onChange();
        }, RELOAD_DEBOUNCE);
      });
      w.on('error', () => undefined);
      watchers.push(w);
    } catch {
      // A folder that cannot be watched: SIGHUP still reloads.
    }
  }
  return {
    close() {
      if (timer) clearTimeout(timer);
      for (const w of watchers) w.close();
    },
  };
}
