// ESLint flat config: typescript-eslint's recommended rules on src/ and test/, and the layering
// of src/ (issue 15) as no-restricted-imports per folder, so a wrong-way import fails `npm run lint`.
// `files` globs are relative to this file's directory (the repository root).
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

const here = path.dirname(fileURLToPath(import.meta.url));

/** `../<folder>` (any file in it) as an import-path regex. */
const folder = (names) => `^\\.\\./(${names.join('|')})(/|$)`;

// Rule files: every src/rules/*.ts but the shared helpers (shared, scanner) and the registry. Read from the folder,
// so a new rule file is covered without touching this config.
const RULE_HELPERS = new Set(['shared', 'scanner', 'index']);
const ruleFiles = fs
  .readdirSync(path.join(here, 'src/rules'))
  .filter((n) => n.endsWith('.ts') && !n.endsWith('.d.ts'))
  .map((n) => n.slice(0, -'.ts'.length))
  .filter((n) => !RULE_HELPERS.has(n));
const escape = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

const noSmtpBackend = {
  regex: folder(['smtp', 'backend']),
  message:
    'Rules and the pipeline never import smtp/ or backend/: take addresses, MAIL/RCPT parameters and replies from ../protocol/ (address.js, params.js, reply.js), and session facts from the events (../pipeline/events.js).',
};
const noOtherRule = {
  regex: `^(\\./|\\.\\./rules/)(${[...ruleFiles, 'index'].map(escape).join('|')})(\\.[jt]s)?$`,
  message:
    'Rules never import each other (nor the registry): put what several rules need in ./shared.js (settings schemas, reply templates, echo) or src/protocol/match.ts (address and host patterns).',
};

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', 'coverage/**', '.node/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    files: ['**/*.ts'],
    rules: {
      '@typescript-eslint/no-explicit-any': 'error',
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
    },
  },
  {
    files: ['bin/**/*.js', 'eslint.config.js'],
    languageOptions: { globals: { process: 'readonly', console: 'readonly' } },
  },
  // Layering. One no-restricted-imports block applies per file (a later block replaces an earlier
  // one's options), so each folder's block lists everything that folder may not import.
  {
    files: ['src/protocol/**/*.ts'],
    rules: {
      'no-restricted-imports': ['error', {
        patterns: [{
          regex: folder(['smtp', 'backend', 'pipeline', 'rules', 'config']),
          message:
            'protocol/ is the ground floor: it imports none of smtp/, backend/, pipeline/, rules/, config/. Keep it to protocol vocabulary (it may use ../net/).',
        }],
      }],
    },
  },
  {
    files: ['src/pipeline/**/*.ts'],
    rules: {
      'no-restricted-imports': ['error', {
        patterns: [
          noSmtpBackend,
          {
            regex: folder(['rules']),
            message: 'The pipeline never imports rules/: rules plug in through the RuleType interface (./rule.js) and the registry that main.ts hands to config/rules.ts.',
          },
        ],
      }],
    },
  },
  {
    // Fronts an MTA calls (policy, milter) feed the one pipeline: they may use pipeline/, protocol/,
    // config/, net/ and metrics/, never the SMTP front (smtp/), the backend (backend/) nor a rule.
    files: ['src/fronts/**/*.ts'],
    rules: {
      'no-restricted-imports': ['error', {
        patterns: [{
          regex: '^(\\.\\./)+(smtp|backend|rules)(/|$)|^(\\.\\./)+(listener|main)(\\.js)?$',
          message: 'fronts/ never import smtp/, backend/, rules/ or the listener: a front builds SessionSnapshots and events for the pipeline (../pipeline/), with ../protocol/, ../config/, ../net/ and ../metrics/.',
        }],
      }],
    },
  },
  {
    // Session records: fed by every front, below all of them.
    files: ['src/record/**/*.ts'],
    rules: {
      'no-restricted-imports': ['error', {
        patterns: [{
          regex: folder(['smtp', 'backend', 'rules', 'fronts']),
          message: 'record/ never imports smtp/, backend/, rules/ or fronts/: fronts hand it their events and verdicts (SessionRecorder); it wraps the resolver and store the rules get.',
        }],
      }],
    },
  },
  {
    files: ['src/rules/**/*.ts'],
    ignores: ['src/rules/index.ts'],
    rules: { 'no-restricted-imports': ['error', { patterns: [noSmtpBackend, noOtherRule] }] },
  },
  {
    // The registry imports every rule; it still may not reach into smtp/ or backend/.
    files: ['src/rules/index.ts'],
    rules: { 'no-restricted-imports': ['error', { patterns: [noSmtpBackend] }] },
  },
  {
    files: ['src/config/**/*.ts'],
    rules: {
      'no-restricted-imports': ['error', {
        patterns: [{
          regex: folder(['rules']),
          message: 'config/ never imports rules/: loadRuleSet takes the rule-type registry from its caller (main.ts / cli.ts pass RULE_TYPES); shared vocabulary goes in ../pipeline/rule.js or ../protocol/.',
        }],
      }],
    },
  },
  {
    files: ['src/backend/**/*.ts'],
    rules: {
      'no-restricted-imports': ['error', {
        patterns: [{
          regex: folder(['smtp']),
          message: 'backend/ never imports smtp/: take replies, addresses and MAIL/RCPT parameters from ../protocol/.',
        }],
      }],
    },
  },
);
