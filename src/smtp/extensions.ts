/**
 * extensions.ts — what doorman offers a client in its EHLO reply, and the MAIL/RCPT parameters
 * that follow from it.
 *
 * doorman advertises what it implements and the backend offers (PASSTHROUGH_CAPS), its own SIZE
 * (the backend's less the room for doorman's headers), STARTTLS when it has a certificate and AUTH
 * with the backend's mechanisms. A MAIL or RCPT parameter is let through only when its extension
 * was advertised. Pure functions of the backend's capabilities: the session decides when to ask.
 */
import type { Capabilities } from '../backend/connection.js';
import type { MailParam } from '../protocol/params.js';
import { R, type Reply } from '../protocol/reply.js';
import { TAG_HEADROOM } from './message.js';

/** EHLO keywords doorman passes through when the backend offers them. */
const PASSTHROUGH_CAPS = ['PIPELINING', '8BITMIME', 'SMTPUTF8', 'ENHANCEDSTATUSCODES', 'DSN', 'ETRN'];

/**
 * The EHLO keywords: what doorman implements ∩ what the backend offers, its SIZE, STARTTLS when
 * offered, and AUTH with `auth` mechanisms (null: not offered).
 */
export function ehloKeywords(caps: Capabilities, size: number, opts: { starttls: boolean; auth: string | null }): string[] {
  const ext = PASSTHROUGH_CAPS.filter((k) => caps.has(k));
  ext.splice(caps.has('PIPELINING') ? 1 : 0, 0, `SIZE ${size}`);
  if (opts.starttls) ext.push('STARTTLS');
  if (opts.auth) ext.push(`AUTH ${opts.auth}`);
  return ext;
}

/**
 * The SIZE doorman advertises and enforces: its own limit, and the backend's less the room for
 * the headers doorman adds (TAG_HEADROOM; the whole of a backend SIZE too small to spare it).
 */
export function sizeLimit(caps: Capabilities, own: number): number {
  const theirs = backendSize(caps);
  if (theirs === null) return own;
  return Math.min(own, theirs > 2 * TAG_HEADROOM ? theirs - TAG_HEADROOM : theirs);
}

/** The backend's SIZE (RFC 1870), null when it announces no limit. */
export function backendSize(caps: Capabilities): number | null {
  const theirs = Number.parseInt(caps.get('SIZE') ?? '', 10);
  return Number.isFinite(theirs) && theirs > 0 ? theirs : null;
}

/** The backend's SASL mechanisms, null when it offers no AUTH. */
export function authMechanisms(caps: Capabilities): string | null {
  const m = caps.get('AUTH');
  return m ? m.trim() : null;
}

/** MAIL/RCPT parameters doorman lets through: only those of advertised extensions. */
export function checkParams(verb: 'MAIL' | 'RCPT', params: readonly MailParam[], caps: Capabilities, size: number): Reply | null {
  for (const { key, value } of params) {
    if (verb === 'MAIL' && key === 'SIZE') {
      if (!value || !/^\d{1,20}$/.test(value)) return R.badParam('bad SIZE parameter');
      if (Number(value) > size) return R.tooBig();
      continue;
    }
    if (verb === 'MAIL' && key === 'BODY') {
      const v = (value ?? '').toUpperCase();
      if (v === '7BIT' || (v === '8BITMIME' && caps.has('8BITMIME'))) continue;
      return R.badParam(`unsupported BODY=${value ?? ''}`);
    }
    if (verb === 'MAIL' && key === 'SMTPUTF8' && value === null && caps.has('SMTPUTF8')) continue;
    if (verb === 'MAIL' && key === 'AUTH' && caps.has('AUTH')) continue;
    if (caps.has('DSN') && ((verb === 'MAIL' && (key === 'RET' || key === 'ENVID')) || (verb === 'RCPT' && (key === 'NOTIFY' || key === 'ORCPT')))) continue;
    return R.badParam(`unsupported option ${key}`);
  }
  return null;
}
