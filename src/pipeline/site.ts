/**
 * site.ts — what is ours, said once (rules/site.yaml, built by config/site.ts; docs/rules.md#site):
 * the domains we receive mail for, the networks that may relay through us, and the networks we
 * trust not to forge senders (a backup MX, a forwarder) without giving them relay rights.
 *
 * Handed to every rule as RuleDeps.site; a rule file may narrow a list for itself (its own
 * `localDomains` / `relayNetworks`). Rule scopes name the lists too (`clients: ["!relayNetworks"]`).
 */
import { inAnyCidr, type Cidr, type ClientAddress } from '../net/ip.js';
import { DomainList } from '../protocol/match.js';

export interface SitePolicy {
  /** Domains we receive mail for (relay: anyone may send to them; sender: only we send from them). */
  readonly localDomains: DomainList;
  /** Clients with relay rights (they may send anywhere and use our domains as senders). */
  readonly relayNetworks: readonly Cidr[];
  /**
   * Clients without relay rights whose mail is not checked for forged local senders (sender's
   * not_owned) nor SPF: a backup MX or forwarder passing on mail that it did not originate.
   */
  readonly trustedNetworks: readonly Cidr[];
  /** The lists as written, for messages and `doorman check`. */
  readonly lists: { readonly localDomains: readonly string[]; readonly relayNetworks: readonly string[]; readonly trustedNetworks: readonly string[] };
}

/** The site names a scope may use as entries (`clients: ["!relayNetworks"]`). */
export const SITE_NETWORKS = ['relayNetworks', 'trustedNetworks'] as const;
export type SiteNetwork = (typeof SITE_NETWORKS)[number];

export function inNetworks(client: ClientAddress, site: SitePolicy, which: SiteNetwork): boolean {
  return inAnyCidr(client, site[which]);
}

/** A rule built without a site (a rule's unit test): nothing is local, nobody relays or is trusted. */
export const NO_SITE: SitePolicy = Object.freeze({
  localDomains: new DomainList([]),
  relayNetworks: [],
  trustedNetworks: [],
  lists: { localDomains: [], relayNetworks: [], trustedNetworks: [] },
});
