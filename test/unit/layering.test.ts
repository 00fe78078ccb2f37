// The import directions between src/ folders (issue 15) are part of `npm run lint`: these lint
// snippets as if they were files in src/ with the repository's eslint.config.js, and check that a
// wrong-way import is an error of no-restricted-imports and a right-way one is not.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ESLint } from 'eslint';

const root = fileURLToPath(new URL('../..', import.meta.url));
const eslint = new ESLint({ cwd: root });

/** The no-restricted-imports messages for `code` linted as the file `file` (relative to the root). */
async function restricted(file: string, code: string): Promise<string[]> {
  const [result] = await eslint.lintText(code, { filePath: path.join(root, file) });
  assert.ok(result, `no lint result for ${file}`);
  return result.messages.filter((m) => m.ruleId === 'no-restricted-imports').map((m) => m.message);
}

test('a rule may not import smtp/', async () => {
  const msgs = await restricted('src/rules/helo.ts', "import { Session } from '../smtp/session.js';\nexport const s = Session;\n");
  assert.equal(msgs.length, 1);
  assert.match(msgs[0] ?? '', /protocol/);
});

test('the pipeline may not import backend/', async () => {
  const msgs = await restricted('src/pipeline/run.ts', "import { BackendConnection } from '../backend/connection.js';\nexport const b = BackendConnection;\n");
  assert.equal(msgs.length, 1);
});

test('a rule may not import another rule', async () => {
  const msgs = await restricted('src/rules/helo.ts', "import { dnsblRule } from './dnsbl.js';\nexport const d = dnsblRule;\n");
  assert.equal(msgs.length, 1);
  assert.match(msgs[0] ?? '', /shared/);
});

test('a rule may import protocol/ and the shared helpers', async () => {
  const code = "import { normaliseDomain } from '../protocol/address.js';\nimport { echo } from './shared.js';\nexport const n = [normaliseDomain, echo];\n";
  assert.deepEqual(await restricted('src/rules/helo.ts', code), []);
});

test('the registry may import every rule', async () => {
  assert.deepEqual(await restricted('src/rules/index.ts', "import { dnsblRule } from './dnsbl.js';\nexport const d = dnsblRule;\n"), []);
});

test('config/ may not import rules/', async () => {
  const msgs = await restricted('src/config/rules.ts', "import { RULE_TYPES } from '../rules/index.js';\nexport const t = RULE_TYPES;\n");
  assert.equal(msgs.length, 1);
});

test('a front may not import smtp/ or backend/, at any depth', async () => {
  const smtp = await restricted('src/fronts/session.ts', "import { Session } from '../smtp/session.js';\nexport const s = Session;\n");
  assert.equal(smtp.length, 1);
  assert.match(smtp[0] ?? '', /fronts\//);
  const backend = await restricted('src/fronts/policy/server.ts', "import { BackendPool } from '../../backend/pool.js';\nexport const b = BackendPool;\n");
  assert.equal(backend.length, 1);
});

test('a front may import the pipeline, protocol, config, net and metrics', async () => {
  const code = [
    "import { openPipeline } from '../../pipeline/run.js';",
    "import { reply } from '../../protocol/reply.js';",
    "import { parseHostPort } from '../../config/schema.js';",
    "import { parseAddress } from '../../net/ip.js';",
    "import { createMetrics } from '../../metrics/registry.js';",
    "import { FrontSession } from '../session.js';",
    'export const all = [openPipeline, reply, parseHostPort, parseAddress, createMetrics, FrontSession];',
    '',
  ].join('\n');
  assert.deepEqual(await restricted('src/fronts/policy/server.ts', code), []);
});
