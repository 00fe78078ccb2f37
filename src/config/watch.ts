/**
 * watch.ts — reload the rule files, the configuration file and the TLS certificate when they
 * change. Editors write files in several steps (temp file, rename), so changes are debounced;
 * SIGHUP reloads too (see cli.ts).
 */
import fs from 'node:fs';
import path from 'node:path';

/** Quiet time after the last change before reloading, ms. */
export const RELOAD_DEBOUNCE = 250;

/** Calls `reload` (debounced) when a YAML file in `dir` changes. */
export function watchRules(dir: string, reload: () => void): { close(): void } {
  return watchFolders(new Map([[dir, (name: string) => /\.ya?ml$/.test(name)]]), reload);
}

/**
 * Calls `onChange` (debounced) when one of the files changes. The folder holding each file is
 * watched, not the file: a renewed certificate or an edited configuration usually arrives as a
 * new file renamed over the old one (or a symlink switched, as certbot does), which ends a watch
 * on the file itself.
 */
export function watchFiles(files: readonly string[], onChange: () => void): { close(): void } {
  const byDir = new Map<string, Set<string>>();
  for (const f of files) {
    const dir = path.dirname(f);
    byDir.set(dir, (byDir.get(dir) ?? new Set<string>()).add(path.basename(f)));
  }
  return watchFolders(new Map([...byDir].map(([dir, names]) => [dir, (name: string) => names.has(name)])), onChange);
}

/**
 * Watches each folder for changes to the names its filter accepts (an event without a name
 * counts), and calls `onChange` once things are quiet for RELOAD_DEBOUNCE. A folder that cannot
 * be watched is skipped: SIGHUP still reloads.
 */
function watchFolders(folders: ReadonlyMap<string, (name: string) => boolean>, onChange: () => void): { close(): void } {
  let timer: NodeJS.Timeout | null = null;
  const watchers: fs.FSWatcher[] = [];
  for (const [dir, accepts] of folders) {
    try {
      const w = fs.watch(dir, { persistent: false }, (_event, file) => {
        if (file && !accepts(String(file))) return;
        if (timer) clearTimeout(timer);
        timer = setTimeout(() => {
          timer = null;
          onChange();
        }, RELOAD_DEBOUNCE);
      });
      w.on('error', () => undefined);
      watchers.push(w);
    } catch {
      // not watched
    }
  }
  return {
    close() {
      if (timer) clearTimeout(timer);
      for (const w of watchers) w.close();
    },
  };
}
