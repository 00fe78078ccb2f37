/**
 * scope.ts — a rule file's `scope:` (docs/rules.md#scope), built into the pipeline's RuleScope
 * (predicates over session facts: the runner depends on nothing here).
 *
 *   listeners:        listener roles (smtp, submission, smtps) or names from doorman.yaml
 *   clients:          addresses / CIDRs, `relayNetworks` / `trustedNetworks` (rules/site.yaml)
 *   authenticated:    true (AUTH sessions only) | false (sessions without AUTH only)
 *   recipientDomains: domain patterns, `localDomains` (rules/site.yaml)
 * `clients` and `recipientDomains` are ordered lists, Postfix-style: an entry may be negated with
 * `!`, the first entry that matches decides; when none matches, a list of only negations
 * matches (`["!relayNetworks"]`: everyone but the relay networks), any other does not.
 */
import { z } from 'zod';
import { parseCidr, inCidr, type ClientAddress } from '../net/ip.js';
import type { RuleScope } from '../pipeline/scope.js';
import { SITE_NETWORKS, type SitePolicy } from '../pipeline/site.js';
import { normaliseDomain } from '../protocol/address.js';
import { DomainList, isDomainPattern } from '../protocol/match.js';
import { LISTENER_ROLES } from './schema.js';

const entries = z.array(z.string().trim().min(1)).min(1, 'an empty list would match nothing: remove the key to apply everywhere');

export const scopeSchema = z.strictObject({
  listeners: entries.optional(),
  clients: entries.optional(),
  authenticated: z.boolean().optional(),
  recipientDomains: entries.optional(),
});

export type ScopeSpec = z.output<typeof scopeSchema>;

export const ROLES = LISTENER_ROLES;

/** A configured listener, as scopes may name it. */
export interface ListenerRef {
  readonly name: string;
  readonly role: string;
}

/** One problem in a scope: the key path below `scope` and the message. */
export type ScopeProblem = { path: (string | number)[]; message: string };

/**
 * The RuleScope for `spec`, or the problems found (each with its path under `scope`).
 * `listeners` absent: listener names are not known (only roles are checked).
 */
export function buildScope(spec: ScopeSpec, site: SitePolicy, listeners: readonly ListenerRef[] | undefined): { scope: RuleScope; problems: ScopeProblem[] } {
  const problems: ScopeProblem[] = [];
  const scope: { -readonly [K in keyof RuleScope]: RuleScope[K] } = {};
  if (spec.listeners) {
    for (const [i, l] of spec.listeners.entries()) {
      if ((ROLES as readonly string[]).includes(l)) continue;
      if (!listeners || listeners.some((x) => x.name === l)) continue;
      const names = listeners.map((x) => `${x.name} (${x.role})`).join(', ');
      problems.push({ path: ['listeners', i], message: `no listener role or name "${l}": roles are ${ROLES.join(', ')}; the listeners configured are ${names || 'none'}` });
    }
    scope.listeners = new Set(spec.listeners);
  }
  if (spec.clients) {
    const tests = spec.clients.map((raw, i) => {
      const { neg, value } = negation(raw);
      if ((SITE_NETWORKS as readonly string[]).includes(value)) {
        const nets = site[value as (typeof SITE_NETWORKS)[number]];
        return { neg, test: (c: ClientAddress) => nets.some((n) => inCidr(c, n)) };
      }
      try {
        const cidr = parseCidr(value);
        return { neg, test: (c: ClientAddress) => inCidr(c, cidr) };
      } catch {
        problems.push({ path: ['clients', i], message: `not an address, CIDR or site list (${SITE_NETWORKS.join(', ')}): ${raw}` });
        return { neg, test: () => false };
      }
    });
    scope.clients = firstMatch(tests);
  }
  if (spec.authenticated !== undefined) scope.authenticated = spec.authenticated;
  if (spec.recipientDomains) {
    const tests = spec.recipientDomains.map((raw, i) => {
      const { neg, value } = negation(raw);
      if (value === 'localDomains') return { neg, test: (d: string) => site.localDomains.has(d) };
      if (!isDomainPattern(value)) problems.push({ path: ['recipientDomains', i], message: `not a domain pattern or localDomains: ${raw}` });
      const list = new DomainList([value]);
      return { neg, test: (d: string) => list.has(normaliseDomain(d)) };
    });
    scope.recipientDomains = firstMatch(tests);
  }
  return { scope, problems };
}

function negation(raw: string): { neg: boolean; value: string } {
  return raw.startsWith('!') ? { neg: true, value: raw.slice(1).trim() } : { neg: false, value: raw };
}

/** Postfix-style: the first matching entry decides; no match → true only for a list of negations. */
function firstMatch<T>(tests: readonly { neg: boolean; test: (x: T) => boolean }[]): (x: T) => boolean {
  const onlyNegations = tests.every((t) => t.neg);
  return (x: T) => {
    for (const t of tests) if (t.test(x)) return !t.neg;
    return onlyNegations;
  };
}
