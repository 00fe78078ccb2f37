/**
 * site.ts — rules/site.yaml: what is ours, said once for every rule (docs/rules.md#site).
 *
 *   localDomains:    domains we receive mail for (DomainList patterns)
 *   relayNetworks:   clients with relay rights (addresses / CIDRs)
 *   trustedNetworks: clients without relay rights whose senders and SPF are not checked
 * A missing file or key means SITE_DEFAULTS (no local domains; relay from 127.0.0.0/8 and ::1).
 * The file lives in the rules folder, so it is validated, reloaded and checked with the rules;
 * it is not a rule. Also: whether a rule file's own copy of a list fits inside the site's.
 */
import fs from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import type { Problem } from '../errors.js';
import { parseCidr, inCidr, type Cidr } from '../net/ip.js';
import type { SitePolicy } from '../pipeline/site.js';
import { normaliseDomain } from '../protocol/address.js';
import { DomainList, isDomainPattern } from '../protocol/match.js';
import { SITE_DEFAULTS, SITE_FILE } from './defaults.js';
import { validateYaml } from './yaml.js';

export const cidrs = z.array(z.string()).superRefine((list, ctx) => {
  for (const [i, c] of list.entries()) {
    try {
      parseCidr(c);
    } catch {
      ctx.addIssue({ code: 'custom', path: [i], message: `not an address or CIDR: ${c}` });
    }
  }
});

export const domains = z.array(z.string()).superRefine((list, ctx) => {
  for (const [i, d] of list.entries()) if (!isDomainPattern(d)) ctx.addIssue({ code: 'custom', path: [i], message: `not a domain pattern: ${d}` });
});

const siteSchema = z.strictObject({
  localDomains: domains.default(SITE_DEFAULTS.localDomains),
  relayNetworks: cidrs.default(SITE_DEFAULTS.relayNetworks),
  trustedNetworks: cidrs.default(SITE_DEFAULTS.trustedNetworks),
});

export type SiteLists = z.output<typeof siteSchema>;
export type SiteKey = keyof SiteLists;
export const SITE_KEYS: readonly SiteKey[] = ['localDomains', 'relayNetworks', 'trustedNetworks'];

export interface LoadedSite {
  readonly policy: SitePolicy;
  /** The file read, or null when the folder has none (the defaults). */
  readonly file: string | null;
  /** Its text (part of the rule set's version hash), '' without a file. */
  readonly text: string;
}

export function buildSitePolicy(lists: SiteLists): SitePolicy {
  return {
    localDomains: new DomainList(lists.localDomains),
    relayNetworks: lists.relayNetworks.map(parseCidr),
    trustedNetworks: lists.trustedNetworks.map(parseCidr),
    lists: { localDomains: [...lists.localDomains], relayNetworks: [...lists.relayNetworks], trustedNetworks: [...lists.trustedNetworks] },
  };
}

/** Reads `<dir>/site.yaml` (site.yml too); problems go to `problems` and the defaults are returned. */
export function loadSite(dir: string, problems: Problem[]): LoadedSite {
  const file = [SITE_FILE, SITE_FILE.replace(/\.yaml$/, '.yml')].map((n) => path.join(dir, n)).find((f) => fs.existsSync(f)) ?? null;
  if (!file) return { policy: buildSitePolicy(siteSchema.parse({})), file: null, text: '' };
  const text = fs.readFileSync(file, 'utf8');
  const v = validateYaml(text, file, siteSchema);
  if (!v.ok) {
    problems.push(...v.problems);
    return { policy: buildSitePolicy(siteSchema.parse({})), file, text };
  }
  return { policy: buildSitePolicy(v.value), file, text };
}

/** Entries of a rule file's own list that the site's list does not cover (so they widen it). */
export function notCovered(key: SiteKey, own: readonly string[], site: SitePolicy): string[] {
  if (key === 'localDomains') return own.filter((d) => !domainCovered(d, site.lists.localDomains));
  const nets = site[key].map((c) => c);
  return own.filter((c) => {
    let cidr: Cidr;
    try {
      cidr = parseCidr(c);
    } catch {
      return false; // the rule's schema reports it
    }
    return !nets.some((n) => cidrWithin(cidr, n));
  });
}

function domainCovered(pattern: string, site: readonly string[]): boolean {
  const d = normaliseDomain(pattern.trim());
  const list = new DomainList(site);
  if (!d.startsWith('*.')) return list.has(d.startsWith('[') ? d.replace(/^\[ipv6:/i, '[ipv6:') : d);
  // *.x.example.com is covered by *.x.example.com or by *.example.com (not by x.example.com).
  const suffix = d.slice(1);
  return site.some((s) => {
    const n = normaliseDomain(s.trim());
    return n.startsWith('*.') && suffix.endsWith(n.slice(1));
  });
}

function cidrWithin(inner: Cidr, outer: Cidr): boolean {
  const [ip, bits] = inner.range;
  if (bits < outer.range[1]) return false;
  return inCidr({ text: ip.toString(), family: ip.kind() === 'ipv4' ? 4 : 6, ip }, outer);
}
