/**
 * dmarc — the header From authenticated: DKIM (RFC 6376) of every signature, DMARC (RFC 7489)
 * alignment and policy, ARC (RFC 8617) for mail a trusted forwarder sealed, and our own domains in
 * the header From refused from outsiders.
 *
 * data_headers (the header block, before the body): a header From in the site's `localDomains`
 * from a client that is neither in `relayNetworks` (nor `trustedNetworks`) nor authenticated is
 * refused, with or without a DMARC record (`ownDomains`, default true), like the `sender` rule for
 * the envelope → 550 5.7.1 Message rejected: header From <addr> not owned by you.
 *
 * data_end (a body reader): the message's chunks, as they arrive, go to mailauth's DKIM verifier
 * (a Writable: the body is hashed, never held; the header block is held until its end, bounded by
 * `maxHeaderBytes`, past which the message is not verified: dkim=permerror). At the end of data:
 *   - DKIM: each signature verified (keys through doorman's resolver): pass, fail, neutral (a body
 *     hash that does not verify), policy, temperror, permerror;
 *   - SPF: the spf rule's result from SessionSnapshot.authResults (no second lookup); none without;
 *   - DMARC: the record of the author domain, else of its organisational domain (Public Suffix
 *     List, the `tldts` package) with `sp=` for a subdomain; DKIM (a passing signature's d=) and
 *     SPF (a passing MAIL FROM domain) alignment, relaxed (same organisational domain) or strict
 *     (`adkim`/`aspf=s`); `pct` (a message outside the sample gets the next weaker policy,
 *     RFC 7489 §6.6.4). Then:
 *       pass, p=none, no record        → pass
 *       fail and p=reject              → 550 5.7.1 Message rejected: DMARC policy of <domain> is reject (dkim=… spf=…)
 *       fail and p=quarantine          → `quarantine`: tag (default) | reject | tempfail | pass
 *       temperror (DNS)                → `temperror`: pass (default) | tempfail (451 4.7.1)
 *   - ARC: the chain verified; when DMARC fails but the chain passes, its newest seal's d= is in
 *     `trustedSealers` and that sealer's ARC-Authentication-Results say dmarc, dkim or spf pass,
 *     the message passes (RFC 7489 §6.7 local policy: `arc=pass`, and the dmarc result says why).
 * Not evaluated (pass) for authenticated clients and `relayNetworks` (our own mail going out).
 * Every finding carries its results (dkim per signature, spf as the spf rule gave it, dmarc with
 * header.from, arc) for the Authentication-Results header.
 * Settings: quarantine (tag), temperror (pass), ownDomains (true), trustedSealers ([]),
 *   minKeyBits (1024), maxHeaderBytes (1 MiB).
 * Bypassable. Errors: DNS failures are temperror; a verifier crash is the rule's error (onError).
 */
import { PassThrough } from 'node:stream';
import { once } from 'node:events';
import { arc as arcVerify, dkimVerify, type ARCData, type DKIMResult } from 'mailauth';
import { getDomain } from 'tldts';
import { z } from 'zod';
import { inAnyCidr } from '../net/ip.js';
import { NO_SITE } from '../pipeline/site.js';
import { defineRuleType, PASS, type Finding, type ReplySpec } from '../pipeline/rule.js';
import type { EventOf, SessionSnapshot } from '../pipeline/events.js';
import type { AuthResult } from '../protocol/auth-results.js';
import { DomainList } from '../protocol/match.js';
import { domainList, echo } from './shared.js';

const settings = z.strictObject({
  /** What `p=quarantine` does to a message that fails DMARC. */
  quarantine: z.enum(['tag', 'reject', 'tempfail', 'pass']).default('tag'),
  /** A DNS failure while evaluating DMARC: pass (fail open) or tempfail. */
  temperror: z.enum(['pass', 'tempfail']).default('pass'),
  /** Refuse our localDomains in the header From from outsiders, with or without a DMARC record. */
  ownDomains: z.boolean().default(true),
  /** ARC sealers (domains; `*.example` for subdomains) whose passing chain overrides a DMARC fail. */
  trustedSealers: domainList.default([]),
  /** RSA keys shorter than this give dkim=policy. */
  minKeyBits: z.number().int().min(512).max(8192).default(1024),
  /** The header block held for the verifier at most (bytes); a longer one is not verified. */
  maxHeaderBytes: z
    .number()
    .int()
    .min(1024)
    .default(1 << 20),
});

type Policy = 'none' | 'quarantine' | 'reject';

/** A DMARC record (RFC 7489 §6.3), the tags doorman uses. */
export interface DmarcRecord {
  readonly p: Policy;
  readonly sp: Policy;
  readonly adkim: 'r' | 's';
  readonly aspf: 'r' | 's';
  readonly pct: number;
}

/** Parses one TXT record; null when it is not a valid DMARC1 record. */
export function parseDmarcRecord(txt: string): DmarcRecord | null {
  const tags = new Map<string, string>();
  for (const part of txt.split(';')) {
    const eq = part.indexOf('=');
    if (eq < 0) continue;
    tags.set(part.slice(0, eq).trim().toLowerCase(), part.slice(eq + 1).trim());
  }
  if (!/^v\s*=\s*DMARC1\s*(;|$)/.test(txt.trim())) return null;
  const policy = (v: string | undefined): Policy | null => (v === 'none' || v === 'quarantine' || v === 'reject' ? v : null);
  const p = policy(tags.get('p')?.toLowerCase());
  // RFC 7489 §6.6.3: no valid p= (with a rua=) is p=none; without one, no record.
  if (!p && !tags.has('rua')) return null;
  const pct = Number(tags.get('pct') ?? '100');
  return {
    p: p ?? 'none',
    sp: policy(tags.get('sp')?.toLowerCase()) ?? p ?? 'none',
    adkim: tags.get('adkim')?.toLowerCase() === 's' ? 's' : 'r',
    aspf: tags.get('aspf')?.toLowerCase() === 's' ? 's' : 'r',
    pct: Number.isInteger(pct) && pct >= 0 && pct <= 100 ? pct : 100,
  };
}

/** The organisational domain (RFC 7489 §3.2) by the Public Suffix List (ICANN and private sections). */
export function orgDomain(domain: string): string {
  const d = domain.toLowerCase().replace(/\.$/, '');
  return getDomain(d, { allowPrivateDomains: true }) ?? d;
}

export function aligned(a: string, from: string, mode: 'r' | 's'): boolean {
  const x = a.toLowerCase().replace(/\.$/, '');
  const y = from.toLowerCase().replace(/\.$/, '');
  return mode === 's' ? x === y : orgDomain(x) === orgDomain(y);
}

/** Domains of the header From field(s): addr-specs in angle brackets, else bare ones; comments and quoted strings ignored. */
export function fromDomains(headers: Buffer | string): { addresses: string[]; domains: string[] } {
  const text = (typeof headers === 'string' ? headers : headers.toString('latin1')).replace(/\r?\n[ \t]/g, ' ');
  const addresses: string[] = [];
  for (const line of text.split(/\r?\n/)) {
    const m = /^from[ \t]*:(.*)$/i.exec(line);
    if (!m?.[1]) continue;
    const v = m[1].replace(/"(?:[^"\\]|\\.)*"/g, '""').replace(/\((?:[^()\\]|\\.)*\)/g, ' ');
    const angled = [...v.matchAll(/<([^<>]*)>/g)].map((x) => x[1] ?? '');
    const list = angled.length ? angled : v.split(/[,;]/).map((x) => x.replace(/^.*:/, '').trim());
    for (const a of list) if (a.includes('@')) addresses.push(a.trim());
  }
  const domains = [...new Set(addresses.map((a) => a.slice(a.lastIndexOf('@') + 1).trim().toLowerCase().replace(/\.$/, '')).filter(Boolean))];
  return { addresses, domains };
}

/** One message being read: its verifier's input and result. */
interface Reading {
  readonly input: PassThrough;
  readonly result: Promise<Awaited<ReturnType<typeof dkimVerify>> | Error>;
  /** Header bytes seen while the header block is not over (-1: it is over). */
  headerBytes: number;
  /** The last bytes seen, to find the empty line across chunks. */
  tail: string;
  tooLong: boolean;
}

interface State {
  reading: Reading | null;
}

export const dmarcRule = defineRuleType({
  type: 'dmarc',
  description: 'DKIM, DMARC (RFC 7489) and ARC (RFC 8617) for the header From; our own domains in it refused from outside',
  settings,
  create(name, s, deps) {
    const site = deps.site ?? NO_SITE;
    const sealers = new DomainList(s.trustedSealers);
    const resolver = (domain: string, rrtype: string) => deps.resolver.resolve(domain, rrtype);
    const ours = (session: SessionSnapshot) => session.auth !== null || inAnyCidr(session.client, site.relayNetworks);

    const start = (st: State): Reading => {
      const input = new PassThrough();
      const result = dkimVerify(input, { resolver, minBitLength: s.minKeyBits }).catch((e: unknown) => (e instanceof Error ? e : new Error(String(e))));
      const r: Reading = { input, result, headerBytes: 0, tail: '', tooLong: false };
      st.reading = r;
      return r;
    };

    const feed = (chunk: Buffer, st: State): Promise<unknown> | undefined => {
      const r = st.reading ?? start(st);
      if (r.tooLong) return undefined;
      if (r.headerBytes >= 0) {
        const seen = r.tail + chunk.toString('latin1', 0, Math.min(chunk.length, s.maxHeaderBytes + 4));
        if (/\r?\n\r?\n/.test(seen) || seen.startsWith('\r\n') || seen.startsWith('\n')) r.headerBytes = -1;
        else {
          r.headerBytes += chunk.length;
          r.tail = seen.slice(-3);
          if (r.headerBytes > s.maxHeaderBytes) {
            // The verifier would hold every byte until an empty line: stop feeding it.
            r.tooLong = true;
            r.input.destroy();
            return undefined;
          }
        }
      }
      if (r.input.write(chunk)) return undefined;
      // Back-pressure: the next chunk once the verifier drained (or gave up).
      return Promise.race([once(r.input, 'drain'), r.result]);
    };

    const evaluate = async (ev: EventOf<'data_end'>, st: State): Promise<Finding> => {
      const r = st.reading;
      st.reading = null;
      if (ours(ev.session)) {
        r?.input.destroy();
        return PASS;
      }
      if (!r) return PASS;
      if (r.tooLong) return { kind: 'pass', results: [{ method: 'dkim', result: 'permerror', reason: 'header block too long to verify', props: [] }] };
      r.input.end();
      const dk = await r.result;
      if (dk instanceof Error) throw dk;
      const results: AuthResult[] = [];
      const sigs = (dk.results ?? []).filter((x) => x.signingDomain);
      for (const x of sigs) results.push(dkimResult(x));
      if (sigs.length === 0) results.push({ method: 'dkim', result: 'none', props: [] });
      const spf = ev.session.authResults.find((x) => x.method === 'spf');
      if (spf) results.push(spf);
      // ARC (RFC 8617 §5.2): the chain, its newest seal's signer, what that sealer saw.
      let arcPass: { sealer: string; saw: string } | null = null;
      if (dk.arc) {
        const a = await arcVerify(dk.arc as unknown as ARCData, { resolver, minBitLength: s.minKeyBits });
        const sealer = sealerOf(dk.arc);
        if (a.status.result !== 'none') {
          results.push({ method: 'arc', result: a.status.result, ...(a.status.comment ? { reason: String(a.status.comment) } : {}), props: sealer ? [['header.d', sealer]] : [] });
        }
        const saw = a.status.result === 'pass' && sealer && sealers.has(sealer) ? aarPass(a.authenticationResults) : null;
        if (saw && sealer) arcPass = { sealer, saw };
      }
      const from = fromDomains(dk.headers ? headerText(dk.headers) : '');
      if (from.domains.length !== 1) {
        const why = from.domains.length === 0 ? 'no author domain' : 'several author domains';
        results.push({ method: 'dmarc', result: 'none', reason: why, props: [] });
        return { kind: 'pass', results };
      }
      const author = from.domains[0] as string;
      const found = await discover(author, resolver);
      const head: [string, string][] = [['header.from', author]];
      if (found === 'temperror') {
        results.push({ method: 'dmarc', result: 'temperror', props: head });
        if (s.temperror === 'pass') return { kind: 'pass', results };
        return { kind: 'tempfail', reason: `dmarc temperror for ${author}`, reply: { code: 451, enhanced: '4.7.1', text: `Message deferred: DMARC policy of ${echo(author)} could not be retrieved, try again later` }, results };
      }
      if (!found) {
        results.push({ method: 'dmarc', result: 'none', props: head });
        return { kind: 'pass', results };
      }
      const { record, at } = found;
      const dkimPassing = sigs.filter((x) => x.status?.result === 'pass').map((x) => x.signingDomain as string);
      const dkimAligned = dkimPassing.some((d) => aligned(d, author, record.adkim));
      const spfDomain = spf?.result === 'pass' ? spfMailfromDomain(spf) : null;
      const spfAligned = spfDomain !== null && aligned(spfDomain, author, record.aspf);
      let policy: Policy = at === author ? record.p : record.sp;
      const summary = `dkim=${dkimAligned ? 'pass' : dkimPassing.length ? 'unaligned' : (sigs[0]?.status?.result ?? 'none')} spf=${spfAligned ? 'pass' : spfDomain ? 'unaligned' : (spf?.result ?? 'none')}`;
      if (dkimAligned || spfAligned) {
        results.push({ method: 'dmarc', result: 'pass', props: [...head, ['policy.dmarc', policy]] });
        return { kind: 'pass', results };
      }
      // RFC 7489 §6.6.4: outside the pct sample, the next weaker policy.
      if (policy !== 'none' && record.pct < 100 && Math.random() * 100 >= record.pct) policy = policy === 'reject' ? 'quarantine' : 'none';
      if (arcPass) {
        results.push({ method: 'dmarc', result: 'pass', reason: `fail (${summary}) overridden: ARC sealed by trusted ${arcPass.sealer}, which saw ${arcPass.saw}`, props: [...head, ['policy.dmarc', policy]] });
        return { kind: 'pass', results };
      }
      results.push({ method: 'dmarc', result: 'fail', reason: summary, props: [...head, ['policy.dmarc', policy]] });
      const reason = `dmarc fail: policy of ${author} is ${policy} (${summary})`;
      const text = (p: string) => `Message rejected: DMARC policy of ${echo(author)} is ${p} (${summary})`;
      if (policy === 'reject') return { kind: 'reject', reason, reply: { code: 550, enhanced: '5.7.1', text: text('reject') }, results };
      if (policy === 'quarantine') {
        const act = s.quarantine;
        if (act === 'pass') return { kind: 'pass', results };
        if (act === 'tag') return { kind: 'tag', reason, results };
        const reply: ReplySpec = act === 'reject' ? { code: 550, enhanced: '5.7.1', text: text('quarantine') } : { code: 451, enhanced: '4.7.1', text: `${text('quarantine')}, try again later` };
        return { kind: act, reason, reply, results };
      }
      return { kind: 'pass', results };
    };

    return {
      name,
      type: 'dmarc',
      bypassable: true,
      session: (): State => ({ reading: null }),
      starts: {
        // A new transaction: a message read but never judged (refused before data_end) is dropped.
        mail(_ev, st: State): void {
          st.reading?.input.destroy();
          st.reading = null;
        },
      },
      checks: {
        data_headers(ev, _st: State): Finding {
          if (!s.ownDomains || ours(ev.session) || inAnyCidr(ev.session.client, site.trustedNetworks)) return PASS;
          const from = fromDomains(ev.headers);
          const i = from.addresses.findIndex((a) => site.localDomains.has(a.slice(a.lastIndexOf('@') + 1).replace(/\.$/, '')));
          if (i < 0) return PASS;
          const addr = from.addresses[i] as string;
          return { kind: 'reject', reason: 'header From in a local domain from outside', reply: { code: 550, enhanced: '5.7.1', text: `Message rejected: header From <${echo(addr)}> not owned by you` } };
        },
      },
      body: {
        chunk: (chunk, st: State) => feed(chunk, st),
        end: (ev, st: State) => evaluate(ev, st),
      },
    };
  },
});

/** RFC 7489 §6.6.3: the author domain's record, else the organisational domain's; false: none. */
async function discover(author: string, resolver: (d: string, t: string) => Promise<unknown>): Promise<{ record: DmarcRecord; at: string } | false | 'temperror'> {
  const org = orgDomain(author);
  for (const at of org === author ? [author] : [author, org]) {
    let txt: string[];
    try {
      txt = ((await resolver(`_dmarc.${at}`, 'TXT')) as string[][]).map((x) => x.join(''));
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (code === 'ENOTFOUND' || code === 'ENODATA' || code === 'NXDOMAIN') continue;
      return 'temperror';
    }
    const records = txt.filter((t) => /^v\s*=\s*DMARC1/i.test(t.trim())).map(parseDmarcRecord);
    // More than one record, or one that is not valid: no policy from this name (RFC 7489 §6.6.3).
    if (records.length === 1 && records[0]) return { record: records[0], at };
  }
  return false;
}

function dkimResult(x: DKIMResult): AuthResult {
  const d = x.signingDomain ?? '';
  const props: [string, string][] = [['header.d', d], ['header.i', `@${d}`]];
  if (x.selector) props.push(['header.s', x.selector]);
  if (x.algo) props.push(['header.a', x.algo]);
  if (x.signature) props.push(['header.b', x.signature.slice(0, 8)]);
  const comment = x.status?.comment;
  return { method: 'dkim', result: x.status?.result ?? 'neutral', ...(typeof comment === 'string' && comment ? { reason: comment } : {}), props };
}

function spfMailfromDomain(r: AuthResult): string | null {
  const v = r.props.find(([k]) => k === 'smtp.mailfrom')?.[1];
  return v ? v.slice(v.lastIndexOf('@') + 1) : null;
}

/** The newest ARC-Seal's d= (the forwarder that sealed last). */
function sealerOf(data: unknown): string | null {
  const last = (data as { lastEntry?: Record<string, { parsed?: { d?: { value?: unknown } } }> }).lastEntry;
  const d = last?.['arc-seal']?.parsed?.d?.value;
  return typeof d === 'string' ? d.toLowerCase() : null;
}

/** What a sealer's ARC-Authentication-Results saw pass: dmarc, else dkim, else spf; null for none. */
function aarPass(aar: Record<string, unknown> | undefined): string | null {
  if (!aar) return null;
  const res = (x: unknown) => (x as { result?: unknown } | undefined)?.result;
  if (res(aar.dmarc) === 'pass') return 'dmarc=pass';
  if (Array.isArray(aar.dkim) && aar.dkim.some((x) => res(x) === 'pass')) return 'dkim=pass';
  if (res(aar.spf) === 'pass') return 'spf=pass';
  return null;
}

/** The header block mailauth parsed, as text for fromDomains. */
function headerText(headers: unknown): string {
  const parsed = (headers as { parsed?: { line?: Buffer | string }[] }).parsed ?? [];
  return parsed.map((h) => String(h.line ?? '')).join('\r\n');
}
