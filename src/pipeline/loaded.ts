/**
 * loaded.ts — what the runner is handed: a rule with its rule file's settings (built by
 * config/rules.ts), and the hooks a front passes to the pipeline (metrics, logging, dry-run and
 * body bounds). Types only; run.ts and outcome.ts both use them, so they live below both.
 */
import type { Metrics } from '../metrics/registry.js';
import type { SessionEvent } from './events.js';
import type { ReplySpec, Rule } from './rule.js';
import type { RuleScope } from './scope.js';
import type { Action, OnError, RuleOutcome } from './verdict.js';

/** A rule with the settings of its rule file. */
export interface LoadedRule {
  readonly rule: Rule;
  readonly action: Action;
  readonly onError: OnError;
  /** Evaluation deadline, ms. */
  readonly timeout: number;
  /** Reply that replaces the rule's own for refusals (rule file `reply`). */
  readonly reply?: ReplySpec;
  /** Source file, for logs. */
  readonly file: string;
  /** Where the rule applies (rule file `scope:`); absent: everywhere. */
  readonly scope?: RuleScope;
}

export interface PipelineHooks {
  metrics?: Metrics;
  /** Called for a rule that threw or timed out (the session logs it). */
  onRuleError?: (rule: string, kind: 'error' | 'timeout', err: unknown) => void;
  /**
   * The outcome of a dry-run rule that was not awaited, when it arrives (already counted in
   * metrics), with the event it answers (its `session.transaction` says which transaction its
   * authentication results belong to). Without this hook, dry-run rules are awaited like the others.
   */
  late?: (outcome: RuleOutcome, event: SessionEvent) => void;
  /** Dry-run checks of one session left running at most (limits.maxPendingDryRun); default 16. */
  maxPendingDryRun?: number;
  /** Body bytes a reader may have pending before the feed waits for it; default 1 MiB. */
  maxBodyLag?: number;
  /** The front's chunks as they are on the wire → the message's bytes (SMTP: dot-unstuffing), one function per message. */
  unstuff?: () => (chunks: readonly Buffer[]) => Buffer[];
}
