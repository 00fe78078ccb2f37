/**
 * access — static allow/deny lists (Postfix access maps, Haraka access plugin).
 *
 * Detects: a client address in a listed network (stage connect), a listed HELO name (helo), a
 *   listed sender (mail) or recipient (rcpt). The first matching entry of a list wins.
 * Settings (each list optional; a stage runs only when its list is given):
 *   clients:    [{ allow|deny: CIDR or [CIDR…], reply?: "5xx x.y.z text" }]
 *   helo:       [{ allow|deny: name, *.suffix or […], reply? }]
 *   senders:    [{ allow|deny: address pattern or […], reply? }]   (patterns: protocol/match.ts)
 *   recipients: [{ allow|deny: address pattern or […], reply? }]
 * Findings: deny → reject (the entry's reply, else the stage's default "Access denied");
 *   allow → accept (an allowlist: other rules' bypassable refusals are cancelled; a client or
 *   HELO allow holds for the rest of the session, a sender allow for its transaction only (until
 *   end of data, RSET or the next MAIL), a recipient allow for that recipient only).
 * Not bypassable: an explicit deny is the operator's word.
 * Metrics: doorman_rule_evaluations_total{rule}, doorman_rejections_total{rule}.
 * Errors: none expected (pure matching); the runner's onError applies regardless.
 */
import { z } from 'zod';
import { inAnyCidr, parseCidr, type Cidr } from '../net/ip.js';
import { defineRuleType, onStages, parseReplySpec, PASS, type Finding, type ReplySpec, type RuleStage } from '../pipeline/rule.js';
import type { SessionEvent } from '../pipeline/events.js';
import { matchAddress, matchHost, parseAddressPattern, type AddressPattern } from '../protocol/match.js';
import { cidrList, replyTemplate } from './shared.js';

const oneOrMany = z.union([z.string().min(1), z.array(z.string().min(1)).min(1)]).transform((v) => (Array.isArray(v) ? v : [v]));

const entry = <T extends z.ZodType>(item: T) =>
  z
    .strictObject({ allow: item.optional(), deny: item.optional(), reply: replyTemplate.optional(), reason: z.string().optional() })
    .refine((e) => (e.allow === undefined) !== (e.deny === undefined), 'each entry needs exactly one of allow or deny');

const cidrs = oneOrMany.pipe(cidrList);
const addrList = oneOrMany.superRefine((list, ctx) => {
  for (const a of list) if (!parseAddressPattern(a)) ctx.addIssue({ code: 'custom', message: `not an address pattern: ${a}` });
});

const settings = z.strictObject({
  clients: z.array(entry(cidrs)).optional(),
  helo: z.array(entry(oneOrMany)).optional(),
  senders: z.array(entry(addrList)).optional(),
  recipients: z.array(entry(addrList)).optional(),
});

interface Entry<P> {
  allow: boolean;
  patterns: P[];
  reply?: ReplySpec;
  reason: string;
}

function compile<P>(list: { allow?: string[]; deny?: string[]; reply?: string; reason?: string }[] | undefined, parse: (s: string) => P): Entry<P>[] {
  return (list ?? []).map((e) => {
    const allow = e.allow !== undefined;
    const raw = (allow ? e.allow : e.deny) ?? [];
    const spec = e.reply ? parseReplySpec(e.reply) : null;
    return {
      allow,
      patterns: raw.map(parse),
      ...(spec ? { reply: spec } : {}),
      reason: e.reason ?? `${allow ? 'allow' : 'deny'} ${raw.join(',')}`,
    };
  });
}

function verdict<P>(entries: Entry<P>[], test: (p: P) => boolean): Finding {
  for (const e of entries) {
    if (!e.patterns.some(test)) continue;
    if (e.allow) return { kind: 'accept', reason: e.reason };
    return { kind: 'reject', reason: e.reason, ...(e.reply ? { reply: e.reply } : {}) };
  }
  return PASS;
}

export const accessRule = defineRuleType({
  type: 'access',
  description: 'Static allow/deny lists of client networks, HELO names, senders and recipients',
  settings,
  create(name, s) {
    const clients = compile<Cidr>(s.clients, parseCidr);
    const helo = compile<string>(s.helo, (x) => x);
    const senders = compile<AddressPattern>(s.senders, (x) => parseAddressPattern(x) as AddressPattern);
    const recipients = compile<AddressPattern>(s.recipients, (x) => parseAddressPattern(x) as AddressPattern);
    const stages: RuleStage[] = [];
    if (clients.length) stages.push('connect');
    if (helo.length) stages.push('helo');
    if (senders.length) stages.push('mail');
    if (recipients.length) stages.push('rcpt');
    return {
      name,
      type: 'access',
      bypassable: false,
      checks: onStages(stages, (ev: SessionEvent): Finding => {
        switch (ev.stage) {
          case 'connect':
            return verdict(clients, (c) => inAnyCidr(ev.session.client, [c]));
          case 'helo':
            return verdict(helo, (p) => matchHost(p, ev.name));
          case 'mail':
            return verdict(senders, (p) => matchAddress(p, ev.sender));
          case 'rcpt':
            return verdict(recipients, (p) => matchAddress(p, ev.recipient));
          default:
            return PASS;
        }
      }),
    };
  },
});
