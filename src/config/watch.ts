/**
 * watch.ts — reload the rule files when they change. Editors write files in several steps
 * (temp file, rename), so changes are debounced; SIGHUP reloads too (see cli.ts).
 */
import fs from 'node:fs';

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
