/**
 * index.ts — the rule types doorman knows, by the name rule files use in `rule:`.
 * Adding a rule: one file in src/rules/, one line here, docs/rules.md, an example in rules/.
 */
import type { RuleType } from '../pipeline/rule.js';
import { accessRule } from './access.js';
import { clamavRule } from './clamav.js';
import { dnsblRule } from './dnsbl.js';
import { fcrdnsRule } from './fcrdns.js';
import { greylistRule } from './greylist.js';
import { ratelimitRule } from './ratelimit.js';
import { heloRule } from './helo.js';
import { relayRule } from './relay.js';
import { rspamdRule } from './rspamd.js';
import { senderRule } from './sender.js';
import { spamassassinRule } from './spamassassin.js';
import { spfRule } from './spf.js';
import { dmarcRule } from './dmarc.js';

export const RULE_TYPES: ReadonlyMap<string, RuleType> = new Map<string, RuleType>([
  [accessRule.type, accessRule as unknown as RuleType],
  [heloRule.type, heloRule as unknown as RuleType],
  [relayRule.type, relayRule as unknown as RuleType],
  [senderRule.type, senderRule as unknown as RuleType],
  [spfRule.type, spfRule as unknown as RuleType],
  [dnsblRule.type, dnsblRule as unknown as RuleType],
  [fcrdnsRule.type, fcrdnsRule as unknown as RuleType],
  [ratelimitRule.type, ratelimitRule as unknown as RuleType],
  [greylistRule.type, greylistRule as unknown as RuleType],
  [dmarcRule.type, dmarcRule as unknown as RuleType],
  [clamavRule.type, clamavRule as unknown as RuleType],
  [spamassassinRule.type, spamassassinRule as unknown as RuleType],
  [rspamdRule.type, rspamdRule as unknown as RuleType],
]);
