/**
 * The documentation tells the truth: every metric in the registry is in docs/metrics.md and the
 * doc names no metric that does not exist; every limit is in docs/configuration.md; every error
 * code in docs/errors.md; every metric the Grafana dashboard queries exists; every Dockerfile
 * COPY source exists; the README shows the command .ci/run runs.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createMetrics } from '../../src/metrics/registry.js';
import { LIMIT_DEFAULTS } from '../../src/config/defaults.js';
import { ERROR_CODES } from '../../src/errors.js';
import { ENV_VARS } from '../../src/config/load.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const read = (f: string) => fs.readFileSync(path.join(ROOT, f), 'utf8');
const names = () => createMetrics({ version: 't', defaults: false }).registry.getMetricsAsArray().map((m) => (m as unknown as { name: string }).name);

test('docs/metrics.md and the registry list the same metrics', () => {
  const doc = read('docs/metrics.md');
  const documented = new Set([...doc.matchAll(/^\| `(doorman_[a-z_]+)`/gm)].map((m) => m[1]));
  const registered = new Set(names());
  assert.deepEqual([...registered].filter((n) => !documented.has(n)), [], 'registered but not documented');
  assert.deepEqual([...documented].filter((n) => n && !registered.has(n)), [], 'documented but not registered');
});

test('every limit is documented with its default', () => {
  const doc = read('docs/configuration.md');
  for (const [k, v] of Object.entries(LIMIT_DEFAULTS)) {
    assert.match(doc, new RegExp(`\\| \`${k}\` \\| ${String(v)} \\|`), k);
  }
});

test('every error code and environment variable is documented', () => {
  const errors = read('docs/errors.md');
  for (const code of Object.keys(ERROR_CODES)) assert.ok(errors.includes(`\`${code}\``), code);
  const readme = read('README.md');
  for (const v of Object.keys(ENV_VARS)) assert.ok(readme.includes(`\`${v}\``), v);
});

test('the Grafana dashboard queries only metrics that exist', () => {
  const dash = JSON.parse(read('grafana/doorman.json')) as { panels: { targets: { expr: string }[] }[] };
  const known = new Set(names().flatMap((n) => [n, `${n}_bucket`, `${n}_sum`, `${n}_count`]));
  const used = dash.panels.flatMap((p) => p.targets.flatMap((t) => [...t.expr.matchAll(/\bdoorman_[a-z_]+/g)].map((m) => m[0])));
  assert.ok(used.length > 0);
  for (const u of used) assert.ok(known.has(u), `${u} is not a doorman metric`);
});

test('every Dockerfile COPY source exists', () => {
  for (const line of read('Dockerfile').split('\n')) {
    const m = /^COPY (?!--from)(.+) \S+$/.exec(line);
    if (!m?.[1]) continue;
    for (const src of m[1].split(/\s+/)) assert.ok(fs.existsSync(path.join(ROOT, src)), src);
  }
});

test('.ci/run runs the test command the README shows', () => {
  const ci = read('.ci/run');
  const cmd = /\.\/scripts\/[a-z-]+\.sh/.exec(ci)?.[0];
  assert.ok(cmd);
  assert.ok(read('README.md').split('\n').slice(0, 20).some((l) => l.startsWith(cmd)), `${cmd} on the README's first screen`);
});
