/**
 * scope.ts — where a rule applies: listeners, client networks, authenticated or not, recipient
 * domains (a rule file's `scope:`, built by config/rules.ts; docs/rules.md#scope).
 *
 * The runner asks `inScope` before calling a rule at a stage. What a scope cannot know yet at a
 * stage does not exclude the rule from starting work early (`Rule.start`): a recipient-domain
 * scope is decided at RCPT and the data stages, and a rule scoped to recipient domains is not
 * asked at connect, HELO, AUTH, MAIL or ETRN. A session's end reaches every rule's state (`Rule.end`).
 */
import type { ClientAddress } from '../net/ip.js';
import type { SessionEvent } from './events.js';

export interface RuleScope {
  /** Listener names or roles (smtp, submission, smtps) the rule applies on; absent: every listener. */
  readonly listeners?: ReadonlySet<string>;
  /** Client networks the rule applies to (negated entries already folded in); absent: all. */
  readonly clients?: (client: ClientAddress) => boolean;
  /** true: authenticated sessions only; false: sessions without AUTH only; absent: both. */
  readonly authenticated?: boolean;
  /** Recipient domains (as ParsedPath.domain gives them) the rule applies to; absent: all. */
  readonly recipientDomains?: (domain: string) => boolean;
}

/** Whether the rule with `scope` is asked about `event` (its check, not its early start). */
export function inScope(scope: RuleScope | undefined, event: SessionEvent): boolean {
  if (!scope || event.stage === 'quit') return true;
  if (!inSessionScope(scope, event)) return false;
  const domains = scope.recipientDomains;
  if (!domains) return true;
  switch (event.stage) {
    case 'rcpt':
      return !event.recipient.isNull && domains(event.recipient.domain);
    case 'data_headers':
    case 'data_end':
      return event.session.recipients.some((r) => !r.isNull && domains(r.domain));
    default:
      return false;
  }
}

/** The part of a scope known from the session alone: what decides an early start. */
export function inSessionScope(scope: RuleScope | undefined, event: SessionEvent): boolean {
  if (!scope || event.stage === 'quit') return true;
  const s = event.session;
  if (scope.listeners && !scope.listeners.has(s.listener.name) && !scope.listeners.has(s.listener.role)) return false;
  if (scope.clients && !scope.clients(s.client)) return false;
  if (scope.authenticated !== undefined && (s.auth !== null) !== scope.authenticated) return false;
  return true;
}
