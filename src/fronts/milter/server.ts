/**
 * server.ts — one milter connection: option negotiation, then the MTA's commands in order, each
 * handed to a `MilterHandler`, and a reply for exactly the steps negotiated to get one.
 *
 * The MTA (Postfix opens one milter connection per SMTP client) sends OPTNEG, then per SMTP
 * session CONNECT, HELO, and per message MAIL, RCPT…, DATA, HEADER…, EOH, BODY…, BODYEOB; ABORT
 * ends a message early (RSET, a refused message) and may come when none is open; QUIT ends the
 * connection, QUIT_NC ends the SMTP session but keeps the connection for the next one (a new
 * CONNECT follows, and a new handler serves it). Before each command the MTA may send MACRO with
 * the values of the macros asked for that stage (`DOORMAN_MACROS`).
 *
 * Replies: continue, accept, reject with the rule's code, enhanced code and text
 * (SMFIR_REPLYCODE), tempfail (SMFIR_TEMPFAIL, or SMFIR_REPLYCODE when it carries text); at end of
 * message the header changes first (SMFIR_INSHEADER for an index, SMFIR_ADDHEADER otherwise,
 * SMFIR_CHGHEADER to delete), then the verdict. No reply for header fields, body chunks and
 * unknown commands when the MTA agreed to NR_HDR / NR_BODY / NR_UNKN (it always does from
 * Postfix ≥ 2.6 and Sendmail ≥ 8.14); a reply `continue` otherwise.
 *
 * Failure is never silent and never a crash: a handler that throws or outlives its deadline gets
 * the step a tempfail (the MTA answers 451 4.7.1); a malformed packet, an unexpected command or
 * an idle connection closes the socket (the MTA then applies its `milter_default_action`).
 *
 * Limits (defaults in MILTER_DEFAULTS):
 *   idleTimeoutMs    — ms without a byte from the MTA before the connection is closed. Postfix
 *                      keeps the connection while its SMTP client is idle (smtpd_timeout, 300 s).
 *   stepTimeoutMs    — ms a handler has to answer one envelope step or end of header; under
 *                      Postfix's milter_command_timeout (30 s), so doorman's tempfail arrives first.
 *   eomTimeoutMs     — ms the handler has for end of message (content scans); under Postfix's
 *                      milter_content_timeout (300 s).
 *   maxPacket        — bytes in one packet (MILTER_MAX_PACKET).
 *   maxQueuedPackets — packets read ahead of the handler before the socket is paused.
 */
import type { Socket } from 'node:net';
import {
  DOORMAN_ACTIONS,
  DOORMAN_MACROS,
  DOORMAN_PROTOCOL,
  MILTER_MAX_PACKET,
  MilterFrameError,
  MilterParser,
  SMFIF,
  SMFIP,
  decodeCommand,
  encodeAccept,
  encodeAddHeader,
  encodeChgHeader,
  encodeContinue,
  encodeInsHeader,
  encodeOptNeg,
  encodeReplyCode,
  encodeTempfail,
  negotiate,
  type ConnectFamily,
  type MacroRequest,
  type MilterCommand,
  type OptNeg,
} from './codec.js';

/** A step's answer. `reject` and a `tempfail` with text go out as SMFIR_REPLYCODE. */
export type MilterVerdict =
  | { readonly kind: 'continue' }
  | { readonly kind: 'accept' }
  | { readonly kind: 'reject'; readonly code: number; readonly enhanced?: string; readonly text: string }
  | { readonly kind: 'tempfail'; readonly code?: number; readonly enhanced?: string; readonly text?: string };

/** A header field to add at end of message: with `index`, inserted there (0 = above all others). */
export interface HeaderAddition {
  readonly name: string;
  readonly value: string;
  readonly index?: number;
}

/** A header field to delete: the `index`-th (1 = first) field of that name. */
export interface HeaderDeletion {
  readonly name: string;
  readonly index: number;
}

export interface EomResult {
  readonly verdict: MilterVerdict;
  /** Sent only when the verdict lets the message through (continue, accept). */
  readonly addHeaders?: readonly HeaderAddition[];
  readonly deleteHeaders?: readonly HeaderDeletion[];
}

/** Macro values the MTA sent so far; names without braces (`client_addr`, `j`, `i`). */
export interface MilterMacros {
  get(name: string): string | undefined;
  /** Every macro known now, later stages over earlier ones. */
  all(): ReadonlyMap<string, string>;
}

export interface ConnectInfo {
  /** The client's host name as the MTA resolved it, `[address]` when it did not. */
  readonly hostname: string;
  readonly family: ConnectFamily;
  /** IP address ('4', '6'), socket path ('L'), '' ('U'). */
  readonly address: string;
  readonly port: number;
}

/**
 * What a front plugs into a milter connection: one handler per SMTP session (a new one after
 * QUIT_NC). Envelope steps and end of header answer with a verdict; header fields and body chunks
 * are read without one (the verdict on them comes at eoh and eom). `eom` ends the message: the
 * next MAIL starts another, with or without an ABORT between. `abort` ends the message early
 * (possibly none is open); `close` ends the session and is called exactly once per handler.
 */
export interface MilterHandler {
  connect(info: ConnectInfo, macros: MilterMacros): Promise<MilterVerdict>;
  helo(name: string, macros: MilterMacros): Promise<MilterVerdict>;
  /** `sender` with its angle brackets as the client gave it ("<a@b>", "<>"); `args` the ESMTP parameters. */
  mail(sender: string, args: readonly string[], macros: MilterMacros): Promise<MilterVerdict>;
  rcpt(recipient: string, args: readonly string[], macros: MilterMacros): Promise<MilterVerdict>;
  data(macros: MilterMacros): Promise<MilterVerdict>;
  header(name: string, value: string): void | Promise<void>;
  eoh(macros: MilterMacros): Promise<MilterVerdict>;
  body(chunk: Buffer): void | Promise<void>;
  eom(macros: MilterMacros): Promise<EomResult>;
  abort(): void;
  close(): void;
}

export interface MilterLog {
  warn(obj: object, msg: string): void;
}

export interface MilterServerOptions {
  idleTimeoutMs: number;
  stepTimeoutMs: number;
  eomTimeoutMs: number;
  maxPacket: number;
  maxQueuedPackets: number;
  /** Macros asked per stage in the OPTNEG reply. */
  macros: MacroRequest;
  /**
   * The protocol flags doorman asks for (SMFIP_*: the steps it wants no reply for or not at all),
   * read at each OPTNEG; the MTA grants those it knows.
   */
  protocol: () => number;
}

export const MILTER_DEFAULTS: MilterServerOptions = {
  idleTimeoutMs: 600_000,
  stepTimeoutMs: 25_000,
  eomTimeoutMs: 280_000,
  maxPacket: MILTER_MAX_PACKET,
  maxQueuedPackets: 64,
  macros: DOORMAN_MACROS,
  protocol: () => DOORMAN_PROTOCOL,
};

/** Why a connection ended, for the caller's log and metrics. */
export type MilterEnd = 'quit' | 'closed' | 'idle' | 'protocol' | 'error';

export interface MilterConnection {
  /** Resolves when the socket is closed, with the reason. */
  readonly done: Promise<MilterEnd>;
}

class StepTimeout extends Error {}

/** Macro stages, in SMTP order; a lookup reads the latest stage first. */
const STAGE_ORDER = ['C', 'H', 'M', 'R', 'T', 'L', 'N', 'B', 'E'];
/** Stages that belong to one message: forgotten at ABORT and after end of message. */
const MESSAGE_STAGES = ['M', 'R', 'T', 'L', 'N', 'B', 'E'];

class Macros implements MilterMacros {
  private readonly stages = new Map<string, ReadonlyMap<string, string>>();

  set(stage: string, values: ReadonlyMap<string, string>): void {
    this.stages.set(stage, values);
  }

  forgetMessage(): void {
    for (const s of MESSAGE_STAGES) this.stages.delete(s);
  }

  get(name: string): string | undefined {
    const bare = name.length > 2 && name.startsWith('{') && name.endsWith('}') ? name.slice(1, -1) : name;
    for (let i = STAGE_ORDER.length - 1; i >= 0; i--) {
      const v = this.stages.get(STAGE_ORDER[i]!)?.get(bare);
      if (v !== undefined) return v;
    }
    return undefined;
  }

  all(): ReadonlyMap<string, string> {
    const out = new Map<string, string>();
    for (const s of STAGE_ORDER) for (const [k, v] of this.stages.get(s) ?? []) out.set(k, v);
    return out;
  }
}

const TEMPFAIL: MilterVerdict = { kind: 'tempfail' };

function verdictBytes(v: MilterVerdict): Buffer {
  switch (v.kind) {
    case 'continue':
      return encodeContinue();
    case 'accept':
      return encodeAccept();
    case 'reject':
      return encodeReplyCode(v.code, v.enhanced, v.text);
    case 'tempfail':
      return v.text !== undefined ? encodeReplyCode(v.code ?? 451, v.enhanced, v.text) : encodeTempfail();
  }
}

/**
 * Serves one accepted socket until QUIT, close, a protocol error or the idle timeout.
 * `createHandler` is called at each CONNECT (once per SMTP session).
 */
export function serveMilter(
  socket: Socket,
  createHandler: () => MilterHandler,
  opts: Partial<MilterServerOptions> = {},
  log?: MilterLog,
): MilterConnection {
  const o: MilterServerOptions = { ...MILTER_DEFAULTS, ...opts };
  const parser = new MilterParser(o.maxPacket);
  const queue: MilterCommand[] = [];
  let negotiated: OptNeg | null = null;
  let handler: MilterHandler | null = null;
  let macros = new Macros();
  let running = false;
  let ended: MilterEnd | null = null;
  let resolveDone!: (e: MilterEnd) => void;
  const done = new Promise<MilterEnd>((r) => (resolveDone = r));

  const closeHandler = () => {
    if (!handler) return;
    const h = handler;
    handler = null;
    try {
      h.close();
    } catch (err) {
      log?.warn({ err }, 'milter handler close failed');
    }
  };

  const end = (why: MilterEnd, err?: unknown) => {
    if (ended) return;
    ended = why;
    if (err) log?.warn({ err: err instanceof Error ? err.message : String(err), end: why }, 'milter connection closed');
    queue.length = 0;
    closeHandler();
    socket.destroy();
  };

  const send = (b: Buffer) => {
    if (!ended && !socket.destroyed) socket.write(b);
  };

  const noReply = (flag: number) => negotiated !== null && (negotiated.protocol & flag) !== 0;

  /** Runs a handler step under its deadline; a throw or timeout becomes a tempfail. */
  async function step<T>(what: string, ms: number, fn: () => Promise<T>, fallback: T): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    try {
      return await Promise.race([
        fn(),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new StepTimeout(`${what}: no answer within ${ms} ms`)), ms);
        }),
      ]);
    } catch (err) {
      log?.warn({ step: what, err: err instanceof Error ? err.message : String(err), timeout: err instanceof StepTimeout }, 'milter step failed: tempfail');
      return fallback;
    } finally {
      clearTimeout(timer);
    }
  }

  function reply(v: MilterVerdict, nrFlag: number): void {
    if (noReply(nrFlag)) return;
    let bytes: Buffer;
    try {
      bytes = verdictBytes(v);
    } catch (err) {
      // A reply the protocol cannot carry (a 2xx code, CR in the text): fail safe.
      log?.warn({ err: err instanceof Error ? err.message : String(err) }, 'milter verdict not encodable: tempfail');
      bytes = encodeTempfail();
    }
    send(bytes);
  }

  function need(): MilterHandler {
    if (!handler) throw new MilterFrameError('command before CONNECT');
    return handler;
  }

  async function handle(cmd: MilterCommand): Promise<void> {
    if (cmd.type !== 'optneg' && negotiated === null) throw new MilterFrameError(`${cmd.type} before OPTNEG`);
    const s = o.stepTimeoutMs;
    switch (cmd.type) {
      case 'optneg': {
        if (negotiated !== null && handler !== null) throw new MilterFrameError('OPTNEG inside a session');
        negotiated = negotiate(cmd, { actions: DOORMAN_ACTIONS, protocol: o.protocol() });
        send(encodeOptNeg(negotiated, o.macros));
        return;
      }
      case 'macro':
        macros.set(cmd.stage, cmd.macros);
        return;
      case 'connect': {
        if (handler) throw new MilterFrameError('second CONNECT without QUIT_NC');
        handler = createHandler();
        const h = handler;
        const info: ConnectInfo = { hostname: cmd.hostname, family: cmd.family, address: cmd.address, port: cmd.port };
        reply(await step('connect', s, () => h.connect(info, macros), TEMPFAIL), SMFIP.NR_CONN);
        return;
      }
      case 'helo': {
        const h = need();
        reply(await step('helo', s, () => h.helo(cmd.name, macros), TEMPFAIL), SMFIP.NR_HELO);
        return;
      }
      case 'mail': {
        const h = need();
        reply(await step('mail', s, () => h.mail(cmd.args[0]!, cmd.args.slice(1), macros), TEMPFAIL), SMFIP.NR_MAIL);
        return;
      }
      case 'rcpt': {
        const h = need();
        reply(await step('rcpt', s, () => h.rcpt(cmd.args[0]!, cmd.args.slice(1), macros), TEMPFAIL), SMFIP.NR_RCPT);
        return;
      }
      case 'data': {
        const h = need();
        reply(await step('data', s, () => h.data(macros), TEMPFAIL), SMFIP.NR_DATA);
        return;
      }
      case 'header': {
        const h = need();
        // A failing header reader is the handler's to report at eoh; the step itself continues.
        await step('header', s, async () => h.header(cmd.name, cmd.value), undefined);
        if (!noReply(SMFIP.NR_HDR)) send(encodeContinue());
        return;
      }
      case 'eoh': {
        const h = need();
        reply(await step('eoh', s, () => h.eoh(macros), TEMPFAIL), SMFIP.NR_EOH);
        return;
      }
      case 'body': {
        const h = need();
        await step('body', s, async () => h.body(cmd.chunk), undefined);
        if (!noReply(SMFIP.NR_BODY)) send(encodeContinue());
        return;
      }
      case 'eob': {
        const h = need();
        if (cmd.chunk.length > 0) await step('body', s, async () => h.body(cmd.chunk), undefined);
        const r = await step<EomResult>('eom', o.eomTimeoutMs, () => h.eom(macros), { verdict: TEMPFAIL });
        // The header changes and the verdict leave in one write.
        socket.cork();
        if (r.verdict.kind === 'continue' || r.verdict.kind === 'accept') sendHeaderChanges(r);
        reply(r.verdict, 0);
        socket.uncork();
        macros.forgetMessage();
        return;
      }
      case 'abort': {
        macros.forgetMessage();
        if (handler) {
          try {
            handler.abort();
          } catch (err) {
            log?.warn({ err: err instanceof Error ? err.message : String(err) }, 'milter handler abort failed');
          }
        }
        return;
      }
      case 'unknown':
        if (!noReply(SMFIP.NR_UNKN)) send(encodeContinue());
        return;
      case 'quit_nc':
        closeHandler();
        macros = new Macros();
        return;
      case 'quit':
        end('quit');
        return;
    }
  }

  function sendHeaderChanges(r: EomResult): void {
    const actions = negotiated?.actions ?? 0;
    for (const d of r.deleteHeaders ?? []) {
      if ((actions & SMFIF.CHGHDRS) === 0) break;
      try {
        send(encodeChgHeader(d.index, d.name, ''));
      } catch (err) {
        log?.warn({ err: err instanceof Error ? err.message : String(err), header: d.name }, 'milter header deletion skipped');
      }
    }
    for (const a of r.addHeaders ?? []) {
      if ((actions & SMFIF.ADDHDRS) === 0) break;
      try {
        send(a.index === undefined ? encodeAddHeader(a.name, a.value) : encodeInsHeader(a.index, a.name, a.value));
      } catch (err) {
        log?.warn({ err: err instanceof Error ? err.message : String(err), header: a.name }, 'milter header addition skipped');
      }
    }
  }

  async function drain(): Promise<void> {
    if (running) return;
    running = true;
    try {
      while (queue.length > 0 && !ended) {
        const cmd = queue.shift()!;
        if (socket.isPaused() && queue.length < o.maxQueuedPackets / 2) socket.resume();
        await handle(cmd);
      }
    } catch (err) {
      end(err instanceof MilterFrameError ? 'protocol' : 'error', err);
    } finally {
      running = false;
    }
  }

  socket.setTimeout(o.idleTimeoutMs, () => end('idle', new Error(`no data for ${o.idleTimeoutMs} ms`)));
  socket.on('data', (chunk: Buffer) => {
    if (ended) return;
    try {
      for (const p of parser.push(chunk)) queue.push(decodeCommand(p));
    } catch (err) {
      end('protocol', err);
      return;
    }
    if (queue.length >= o.maxQueuedPackets) socket.pause();
    void drain();
  });
  socket.on('error', (err) => end('error', err));
  socket.on('close', () => {
    end('closed');
    resolveDone(ended ?? 'closed');
  });
  return { done };
}
