/**
 * yaml.ts — read a YAML file and validate it against a zod schema, with every problem naming
 * file, line and key path (the yaml package keeps source ranges; LineCounter maps them to lines).
 */
import { LineCounter, parseDocument, isMap, isSeq, type Node } from 'yaml';
import type { z } from 'zod';
import type { Problem } from '../errors.js';

export type Validated<T> = { ok: true; value: T } | { ok: false; problems: Problem[] };

export function validateYaml<S extends z.ZodType>(text: string, file: string, schema: S): Validated<z.output<S>> {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: false, uniqueKeys: true });
  const problems: Problem[] = [];
  for (const e of [...doc.errors, ...doc.warnings]) {
    problems.push({ file, line: lineCounter.linePos(e.pos[0]).line, key: '', message: e.message.split('\n')[0] ?? e.message });
  }
  if (problems.length) return { ok: false, problems };
  const data: unknown = doc.toJS() ?? {};
  const parsed = schema.safeParse(data);
  if (parsed.success) return { ok: true, value: parsed.data };
  for (const issue of parsed.error.issues) {
    const base = issue.path.map((p) => (typeof p === 'symbol' ? String(p) : p));
    // An unknown key is reported at the key itself, one problem per key.
    const keys = issue.code === 'unrecognized_keys' ? issue.keys : [null];
    for (const k of keys) {
      const path = k === null ? base : [...base, k];
      const node = nodeAt(doc.contents as Node | null, path, k !== null);
      const line = node?.range ? lineCounter.linePos(node.range[0]).line : null;
      problems.push({ file, line, key: path.join('.'), message: k === null ? issue.message : 'unknown key' });
    }
  }
  return { ok: false, problems };
}

/**
 * The line of the node at `path` in a YAML text (a key's value; with `key`, the key itself), or
 * of the deepest node on the way that exists; null for a text that does not parse.
 */
export function lineOf(text: string, path: readonly (string | number)[], key = false): number | null {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: false });
  if (doc.errors.length) return null;
  const node = nodeAt(doc.contents as Node | null, path, key);
  return node?.range ? lineCounter.linePos(node.range[0]).line : null;
}

/** The deepest node on `path` that exists (for an unknown key, its parent map). */
function nodeAt(root: Node | null, path: readonly (string | number)[], wantKey = false): Node | null {
  let node: Node | null = root;
  for (const [i, key] of path.entries()) {
    if (isMap(node)) {
      const pair = node.items.find((p) => (p.key as { value?: unknown } | null)?.value === key);
      if (!pair) return node;
      const last = i === path.length - 1;
      node = last && wantKey ? (pair.key as Node) : ((pair.value as Node | null) ?? (pair.key as Node));
    } else if (isSeq(node) && typeof key === 'number') {
      node = (node.items[key] as Node | undefined) ?? node;
    } else {
      return node;
    }
  }
  return node;
}
