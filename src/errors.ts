/**
 * errors.ts — the catalogue of startup and configuration errors (DMN_ERR_*).
 *
 * SMTP outcomes are Replies (protocol/reply.ts), never exceptions. These errors stop a start or a
 * `doorman check`, and each names what the operator must fix. docs/errors.md lists every code;
 * a test checks that the two agree.
 */

export const ERROR_CODES = {
  DMN_ERR_CONFIG_READ: 'cannot read configuration file',
  DMN_ERR_CONFIG_INVALID: 'invalid configuration',
  DMN_ERR_RULES_READ: 'cannot read rule files',
  DMN_ERR_RULES_INVALID: 'invalid rule file',
  DMN_ERR_TLS: 'cannot load TLS certificate or key',
  DMN_ERR_LISTEN: 'cannot listen on address',
  DMN_ERR_USAGE: 'bad command line',
  DMN_ERR_STATE: 'cannot reach the limit state',
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

/** One problem in a file: where, which key, what. */
export interface Problem {
  file: string;
  line: number | null;
  key: string;
  message: string;
}

export function formatProblem(p: Problem): string {
  return `${p.file}${p.line ? `:${p.line}` : ''}: ${p.key ? `${p.key}: ` : ''}${p.message}`;
}

export class DoormanError extends Error {
  constructor(
    readonly code: ErrorCode,
    detail: string,
    readonly problems: readonly Problem[] = [],
  ) {
    super(`${code}: ${ERROR_CODES[code]}${detail ? `: ${detail}` : ''}${problems.length ? '\n' + problems.map((p) => '  ' + formatProblem(p)).join('\n') : ''}`);
    this.name = 'DoormanError';
  }
}
