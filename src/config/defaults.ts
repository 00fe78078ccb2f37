/**
 * defaults.ts — every named limit and setting, with its default and unit.
 *
 * docs/configuration.md documents each key; test/unit/config-docs.test.ts checks that every
 * limit here is named there.
 */

export const LIMIT_DEFAULTS = {
  /** Concurrent client sessions in total; above it new clients get 421 4.7.0. */
  maxClients: 1000,
  /**
   * Concurrent connections from one client (address or IPv6 network); above it 421 4.7.0.
   * Postfix's smtpd_client_connection_count_limit (50): a sending Postfix opens up to 20 at once
   * (default_destination_concurrency_limit), and a connection it just closed still counts until
   * doorman sees the close, so a limit of 20 refused a good sender now and then.
   */
  maxClientsPerIp: 50,
  /**
   * IPv6 clients are counted for maxClientsPerIp per network of this many bits (a host usually
   * holds a whole /64); IPv4 clients per address. 128 = per IPv6 address.
   */
  clientIpv6Prefix: 64,
  /** Longest command line, octets including CRLF (RFC 5321 §4.5.3.1.4). */
  maxCommandLine: 512,
  /** Extra octets allowed on MAIL/RCPT lines for extension parameters (SIZE, BODY, ORCPT…). */
  extensionAllowance: 512,
  /** Longest AUTH command or SASL response line, octets including CRLF (RFC 4954 §4). */
  maxAuthLine: 12288,
  /** Longest text line in a message, octets including CRLF (RFC 5321 §4.5.3.1.6); 0 = no limit. */
  maxDataLine: 1000,
  /** Largest message, octets; the smaller of this and the backend's SIZE (less room for doorman's headers) is advertised. */
  maxMessageSize: 52_428_800, // 50 MiB
  /** Recipients per message; more get 452 4.5.3 (RFC 5321 §4.5.3.1.8 requires at least 100). */
  maxRecipients: 1000,
  /** Error replies (4xx/5xx) in one session before 421 4.7.0 and close. */
  maxErrors: 20,
  /** Unknown or unimplemented commands in one session before 421 4.7.0 and close. */
  maxUnknownCommands: 10,
  /** Commands in one session before 421 4.7.0 and close (a backstop: ~1000 messages of 50 recipients). */
  maxCommands: 100_000,
  /** NOOP, VRFY, RSET, HELO/EHLO, HELP, EXPN, ETRN between delivered messages before 421 4.7.0 (Postfix smtpd_junk_command_limit). */
  maxJunkCommands: 100,
  /** A client that reads none of its pending replies for this long is dropped, ms. */
  writeTimeout: 60_000,
  /** Waiting for a command, ms (RFC 5321 §4.5.3.2.7 server timeout: 5 minutes). */
  commandTimeout: 300_000,
  /** Waiting for the next DATA block, ms (RFC 5321 §4.5.3.2.5: 3 minutes). */
  dataTimeout: 180_000,
  /** Time open sessions get to finish after SIGTERM before they are sent 421, ms. */
  drainTimeout: 30_000,
  /** Bytes buffered from a client before doorman stops reading from it (back-pressure). */
  maxBuffered: 65_536, // 64 KiB
  /** Deadline for a trusted load balancer's PROXY header, ms (Postfix: 5 s). */
  proxyHeaderTimeout: 5_000,
  /** Deadline for the TLS handshake on an smtps (implicit TLS) listener, ms; counted in the connection limits meanwhile. */
  tlsHandshakeTimeout: 10_000,
  /** Largest header block held for data_headers rules, octets; past it rules see a prefix. */
  maxHeaderBytes: 65_536, // 64 KiB
  /**
   * A message held until its data_end verdict (rules that read the body: DKIM, content
   * scanners) keeps this many octets in memory; the rest is spooled to backend.spoolDir.
   */
  holdInMemory: 524_288, // 512 KiB
  /** Bare CR or LF in commands and data: `normalize` to CRLF (safely re-stuffed) or `reject`. */
  bareNewline: 'normalize' as 'normalize' | 'reject',
  /** Hold the final greeting this long after a `220-` teaser line, ms; 0 = greet at once (postscreen_greet_wait). */
  greetDelay: 0,
  /** A client that talks before the greeting: `drop` (521 5.5.1 and close) or `ignore` (count and log). */
  pregreetAction: 'drop' as 'drop' | 'ignore',
  /** Slowest DATA accepted after the first 10 s, octets per second (Postfix smtpd_min_data_rate). */
  minDataRate: 256,
  /** Failed AUTH attempts in one session before 421 4.7.0 and close. */
  maxAuthFailures: 3,
  /** Event-loop lag above which new connections get 421 4.3.2 (overload shedding), ms; 0 = off. */
  maxEventLoopLag: 500,
  /** Dry-run checks of one session still running (not awaited) before its next stage waits for them, count. */
  maxPendingDryRun: 16,
  /**
   * Policy front (fronts/policy/): a Postfix policy client connection that sends nothing for this
   * long is closed, ms. Longer than Postfix's smtpd_policy_service_max_idle (300 s), so Postfix
   * closes its idle connections first and never writes into one doorman just closed.
   */
  policyIdleTimeout: 330_000,
  /** Policy front: a transaction (Postfix `instance`) is forgotten this long after its last request, ms; its log line is written then. */
  policyInstanceTtl: 300_000,
  /** Policy front: transactions remembered at once (least recently used forgotten first), count. */
  policyMaxInstances: 10_000,
  /** Policy front: longest `name=value` line, octets (Postfix's longest attributes are addresses and certificate names). */
  policyMaxLine: 4_096,
  /** Policy front: attributes in one request, count (Postfix 3.7 sends about 30). */
  policyMaxAttributes: 100,
  /** Policy front: policy client connections open at once per listener, count (Postfix: one per smtpd process, default_process_limit 100). */
  policyMaxConnections: 500,
} as const;

export const BACKEND_DEFAULTS = {
  address: '127.0.0.1:25',
  /** How long a backend that failed (refused, timed out, 421) is skipped, ms. */
  backoff: 30_000,
  /**
   * Idle backend connections kept per backend for the next client sessions: spares, and connections
   * never told a client (one bound by XCLIENT serves its client only).
   */
  poolSize: 32,
  /** An idle pooled backend connection is closed after this long, ms (Postfix's smtpd_timeout is 300 s). */
  poolIdleTimeout: 10_000,
  /**
   * Connections per backend, busy + idle + being opened, per doorman instance (divided among
   * cluster workers); well under Postfix's default_process_limit of 100, so that doorman never
   * takes every smtpd process of its backend.
   */
  maxConnections: 50,
  /** Prepared connections (greeted, EHLO'd, ready for XCLIENT) kept idle per backend while sessions come. */
  spares: 2,
  /** How long a client's HELO/EHLO waits for a backend connection when all are in use, ms; then 421 4.3.2. */
  acquireTimeout: 5_000,
  /** TCP connect deadline, ms. */
  connectTimeout: 10_000,
  /** Deadline for the backend's 220 greeting, ms. */
  greetingTimeout: 30_000,
  /** Deadline for the reply to each command, ms. */
  commandTimeout: 60_000,
  /** Deadline for the reply to the end of data, ms (RFC 5321 §4.5.3.2.6 allows 10 min). */
  dataTimeout: 300_000,
  /** STARTTLS towards the backend: `auto` (when offered), `off`, `require`. */
  starttls: 'auto' as 'auto' | 'off' | 'require',
  /** Verify the backend's TLS certificate. */
  tlsVerify: false,
  /** Pass the real client with XCLIENT when the backend offers it. */
  xclient: true,
  /**
   * Send the client's HELO name and protocol inside XCLIENT (HELO=, PROTO=) instead of its EHLO
   * after XCLIENT: one backend round trip less per session. Postfix then checks
   * smtpd_helo_restrictions at RCPT (smtpd_delay_reject = yes, its default); set false when
   * Postfix runs with smtpd_delay_reject = no and must see the HELO command itself.
   */
  xclientHelo: true,
  /**
   * Relay a client's DATA as BDAT (RFC 3030) to a backend that offers CHUNKING and PIPELINING
   * (Postfix does): the message goes out with its size and no DATA/354 round trip.
   */
  chunking: true,
  /**
   * Answer MAIL here (after doorman's own checks) and send it to a backend that offers PIPELINING
   * together with the first RCPT the rules let through: one backend round trip less per message.
   * The backend's refusal of the sender becomes the answer to that RCPT (as Postfix's own
   * smtpd_delay_reject = yes does). false: MAIL goes to the backend at once and its reply is the
   * client's.
   */
  deferMail: true,
  /** Send a PROXY protocol header to the backend: `off`, `v1`, `v2`. */
  proxyProtocol: 'off' as 'off' | 'v1' | 'v2',
  /**
   * A Received: trace field on each message: `auto` when the backend cannot be told the real
   * client (no XCLIENT with ADDR, no PROXY header), `always`, or `never`.
   */
  traceHeader: 'auto' as 'auto' | 'always' | 'never',
  /** One Authentication-Results field on each message the rules authenticated; incoming ones claiming doorman's name removed. */
  authResults: true,
  /** Folder for messages held past limits.holdInMemory until their data_end verdict; '' = the system's temporary folder. */
  spoolDir: '',
};

export const DNS_DEFAULTS = {
  /** Per-try DNS timeout, ms (Haraka's 25 s outran its plugin timeouts: Haraka#2436). */
  timeout: 2_000,
  /** Tries per DNS query. */
  tries: 2,
  /** DNS answers kept for later sessions (net/dns-cache.ts); 0 = no cache. */
  cacheSize: 10_000,
  /**
   * Longest time a DNS answer is kept, seconds: A/AAAA for their TTL up to this; TXT, PTR, MX and
   * "no such name/record" (whose TTL Node's resolver does not report) for this long.
   */
  cacheMaxTtl: 60,
};

/** Session records (`record:`, docs/operations.md "Session records"): off until `dir` is set. */
export const RECORD_DEFAULTS = {
  /** Share of sessions recorded, 0..1 (decided once per session, at its start). */
  sampleRate: 1,
  /** Record each message's header block (never the body). */
  headers: false,
  /** A record file is closed and a new one started past this size, bytes (64 MiB). */
  maxFileBytes: 64 * 1024 * 1024,
  /** … or once it is this old, ms (1 h). */
  maxFileAge: 3_600_000,
  /** Record files in `dir` beyond this total are deleted, oldest first, bytes (1 GiB). */
  maxTotalBytes: 1024 * 1024 * 1024,
  /** Records waiting for the disk at most, bytes (4 MiB); past it new records are dropped and counted. */
  maxPendingBytes: 4 * 1024 * 1024,
};

export const REDIS_DEFAULTS = {
  /** Per-command Redis deadline, ms (a 1 s default broke rate limiting under load: mailcow#3095). */
  commandTimeout: 500,
};

export const RULE_DEFAULTS = {
  /** Per-rule evaluation deadline, ms; a rule that takes longer gets its onError action. */
  timeout: 5_000,
  /** What a rule that throws or times out does: `pass` (fail open) or `tempfail` (451 4.3.0). */
  onError: 'pass' as 'pass' | 'tempfail',
  /** What a rule's findings do: enforce, dry-run (log only), tempfail (5xx become 4xx), tag. */
  action: 'enforce' as 'enforce' | 'dry-run' | 'tempfail' | 'tag',
};

export const DEFAULT_LISTEN = '127.0.0.1:2525';
export const DEFAULT_RULES_DIR = 'rules';
export const DEFAULT_METRICS_LISTEN = '127.0.0.1:9725';

/** rules/site.yaml when the file or a key is missing (docs/rules.md#site). */
export const SITE_DEFAULTS = {
  /** Domains we receive mail for: none until you say (only relay clients can send anywhere). */
  localDomains: [] as string[],
  /** Clients with relay rights: this host only. */
  relayNetworks: ['127.0.0.0/8', '::1'],
  /** Clients not checked for forged local senders nor SPF (backup MX, forwarders): none. */
  trustedNetworks: [] as string[],
};

/** The site policy's file name in the rules folder: not a rule file. */
export const SITE_FILE = 'site.yaml';
