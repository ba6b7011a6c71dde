//! A running request's state and its rules: what a drawn token does (end of text, stop
//! sequences, max tokens, a full context), how drafts are verified, how much room there is for
//! drafts, and when each figure of its stats is measured. Single-stream generation and the server
//! run every request through this one piece.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::Counters;
use super::adapter_plan::AdapterPlan;
use super::slot::Sequence;
use crate::backend::{BackendModel, BackendSession};
use crate::config::{CancelToken, GenerateOptions, Speculation};
use crate::error::EngineError;
use crate::outcome::{FinishReason, GenerationStats, PromptProgress, ms};

use crate::speculative::DraftLength;
use crate::stop::TOKEN_TEXT_CAPACITY;
use crate::token::{Token, TokenLogprobs};
use crate::token_text::TokenText;

/// A request ready to run: its prompt tokens, options and sampler, made by the caller (on its
/// own thread, before the request is accepted: a grammar is parsed once, off the decode loop).
#[derive(Debug)]
pub(crate) struct Prepared<S> {
    pub(crate) tokens: Vec<Token>,
    pub(crate) options: GenerateOptions,
    pub(crate) sampler: S,
    /// When the request arrived: its time to first token counts from here.
    pub(crate) arrived: Instant,
}

/// Where a speculating request's drafts come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DraftSource {
    /// Prompt lookup ([`crate::speculative::draft`]).
    Lookup,
    /// The scheduler's draft model.
    Model,
}

/// A speculating request's drafting state.
#[derive(Debug)]
pub(crate) struct Drafting {
    pub(crate) source: DraftSource,
    length: DraftLength,
    /// This step's drafts, decoded after the pending token (reused from step to step).
    pub(crate) drafts: Vec<Token>,
    /// Tokens to decode again before the pending token: the kept part of a round whose rejected
    /// drafts a recurrent state could not drop, after it returned to where it stood before the
    /// round (see [`super::Sequence::mark_rollback`]).
    pub(crate) replay: Vec<Token>,
    /// This step's shadow draft: the token a lookup predicts next where drafts would not pay
    /// (see [`Request::draft_acceptance`]); checked against the draw, never decoded.
    pub(crate) shadow: Option<Token>,
    /// Shadow drafts checked so far, and those the draw matched.
    shadowed: usize,
    shadow_kept: usize,
}

/// How a verification ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verified {
    /// The request goes on; this token is the next to decode.
    Next(Token),
    /// The request ended with the last token drawn.
    Ended(FinishReason),
}

/// A request in a slot.
#[derive(Debug)]
/// What a request produced since its last delivery.
pub(crate) struct Output<'a> {
    pub(crate) text: &'a str,
    pub(crate) tokens: &'a [Token],
    pub(crate) logprobs: &'a [TokenLogprobs],
    /// The request's statistics so far (generation timed to now).
    pub(crate) stats: GenerationStats,
    /// The prompt's progress since the last delivery, when the request asked for it.
    pub(crate) progress: Vec<PromptProgress>,
}

pub(crate) struct Request<S, C> {
    /// Whoever waits for the request's output (the server's event channel; nothing for a
    /// single stream, which reads the scheduler directly).
    pub(crate) client: C,
    pub(crate) sampler: S,
    max_tokens: usize,
    cancel: CancelToken,
    /// With log-probabilities asked for: how many candidates per token.
    logprobs: Option<usize>,
    /// The log-probabilities are those the sampler drew from (see
    /// [`GenerateOptions::post_sampling`]).
    post_sampling: bool,
    text: TokenText,
    /// The text this step produced (cleared when a step starts).
    pub(crate) delta: String,
    tokens: Vec<Token>,
    drawn: Vec<TokenLogprobs>,
    /// How many of `tokens` and of `drawn` went out with a delivered text already.
    delivered: (usize, usize),
    pub(crate) drafting: Option<Drafting>,
    /// The scheduler's clock at admission (the oldest request goes first, the newest gives way).
    pub(crate) admitted: u64,
    /// The LoRA adapter scales it runs with, by position (its own, else the session's; an
    /// activated LoRA's from its invocation on).
    pub(crate) adapters: AdapterPlan,
    /// The last step whose batch was its group's (see `Scheduler::choose_group`); 0 before any.
    pub(crate) last_step: u64,
    arrived: Instant,
    /// When it got its slot: prompt processing is timed from here (not the queue before it).
    started: Instant,
    /// Its client has gone (the driver could not deliver to it): it ends at the next step. Its
    /// cancel token stays the caller's, who may share it with other requests.
    abandoned: bool,
    prompt_done: Option<Instant>,
    /// Whether a token was drawn yet (the first draw is the time to first token).
    drew: bool,
    stats: GenerationStats,
    /// This step's batch entries: the index of the first output, and the prompt tokens in it.
    pub(crate) output: Option<i32>,
    pub(crate) chunk: usize,
    /// Prompt progress reports not delivered yet (requests that asked for them).
    progress: Vec<PromptProgress>,
    reports_progress: bool,
}

impl<S, C> Request<S, C> {
    /// A request admitted at `admitted` whose prompt reuses `reused` cached tokens, and its
    /// prompt; `n_ctx` bounds what it can generate (its buffers are sized once, here); it runs
    /// with adapter `adapters`.
    pub(crate) fn new(prepared: Prepared<S>, client: C, reused: usize, admitted: u64, n_ctx: usize, adapters: AdapterPlan) -> (Self, Vec<Token>) {
        let Prepared { tokens, options, sampler, arrived } = prepared;
        // The sampler was built from `sampling` and `ignore_eos` already.
        let GenerateOptions {
            max_tokens,
            stop,
            cancel,
            speculation,
            logprobs,
            post_sampling,
            preserved_tokens,
            sampling: _,
            ignore_eos: _,
            prompt_progress,
            // The scheduler placed it already, and resolved its scales.
            slot: _,
            lora_scales: _,
        } = options;
        let room = max_tokens.min(n_ctx);
        let drafting = match speculation {
            Speculation::Off => None,
            Speculation::Ngram { max_draft } | Speculation::Draft { max_draft } => Some(Drafting {
                source: if matches!(speculation, Speculation::Draft { .. }) { DraftSource::Model } else { DraftSource::Lookup },
                length: DraftLength::new(max_draft as usize),
                drafts: Vec::with_capacity(max_draft as usize),
                replay: Vec::with_capacity(max_draft as usize + 1),
                shadow: None,
                shadowed: 0,
                shadow_kept: 0,
            }),
        };
        let request = Request {
            client,
            sampler,
            max_tokens,
            cancel: cancel.unwrap_or_default(),
            logprobs,
            post_sampling,
            text: TokenText::new(&stop, preserved_tokens),
            delta: String::with_capacity(TOKEN_TEXT_CAPACITY),
            tokens: Vec::with_capacity(room),
            drawn: Vec::with_capacity(if logprobs.is_some() { room + 1 } else { 0 }),
            delivered: (0, 0),
            drafting,
            admitted,
            adapters,
            last_step: 0,
            arrived,
            started: Instant::now(),
            abandoned: false,
            prompt_done: None,
            drew: false,
            stats: GenerationStats { prompt_tokens: tokens.len(), prompt_tokens_reused: reused, ..Default::default() },
            output: None,
            chunk: 0,
            // The first report: what the cache had, before any chunk.
            progress: if prompt_progress {
                vec![PromptProgress { total: tokens.len(), cache: reused, processed: reused, time_ms: 0.0 }]
            } else {
                Vec::new()
            },
            reports_progress: prompt_progress,
        };
        (request, tokens)
    }

    pub(crate) fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    /// Cancelled through its token, or abandoned by its client.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.abandoned || self.cancel.is_cancelled()
    }

    /// Its client has gone: it ends at the next step.
    pub(crate) fn abandon(&mut self) {
        self.abandoned = true;
    }

    pub(crate) fn stats(&self) -> &GenerationStats {
        &self.stats
    }

    pub(crate) fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// The log-probabilities of its draws so far, where it asked for them.
    pub(crate) fn logprobs(&self) -> &[TokenLogprobs] {
        &self.drawn
    }

    /// `processed` of its `total` prompt tokens are in the cache: reported if it asked.
    pub(crate) fn prompt_processed(&mut self, processed: usize, total: usize) {
        if self.reports_progress {
            let cache = self.stats.prompt_tokens_reused;
            self.progress.push(PromptProgress { total, cache, processed, time_ms: ms(self.started.elapsed()) });
        }
    }

    /// Whether there is anything to deliver: text, or prompt progress.
    pub(crate) fn has_output(&self) -> bool {
        !self.delta.is_empty() || !self.progress.is_empty()
    }

    /// This step's text with the tokens and log-probabilities not delivered before it (the text of
    /// a token held back for a stop check goes out later, with that token), for the client;
    /// they count as delivered from now on.
    pub(crate) fn take_output(&mut self) -> (&mut C, Output<'_>) {
        let (tokens, drawn) = self.delivered;
        self.delivered = (self.tokens.len(), self.drawn.len());
        // The generation so far, timed to now.
        let mut stats = self.stats.clone();
        if let Some(done) = self.prompt_done {
            stats.generation_ms = ms(done.elapsed());
        }
        let progress = std::mem::take(&mut self.progress);
        (&mut self.client, Output { text: &self.delta, tokens: &self.tokens[tokens..], logprobs: &self.drawn[drawn..], stats, progress })
    }

    /// The one place prompt processing is timed: its prompt is in the cache.
    pub(crate) fn prompt_done(&mut self) {
        let now = Instant::now();
        self.prompt_done = Some(now);
        let prompt_ms = ms(now - self.started);
        let decoded = self.stats.prompt_tokens - self.stats.prompt_tokens_reused;
        self.stats.prompt_ms = prompt_ms;
        self.stats.prompt_tokens_per_s = if prompt_ms > 0.0 { decoded as f64 / (prompt_ms / 1000.0) } else { 0.0 };
    }

    /// A decode of `decode_ms` carried this request's next token.
    pub(crate) fn decoded(&mut self, decode_ms: f64) {
        self.stats.generation_decodes += 1;
        self.stats.decode_ms += decode_ms;
    }

    /// The share of the tokens this request decoded for speculation that brought a token: its
    /// drafts that held, of its drafts and the tokens it decoded again after rejections (see
    /// [`Request::replay`]: each bought nothing, like a rejected draft), with one held and one
    /// rejected assumed before any (a request that has not drafted yet may). Shadow drafts count
    /// as drafts: a request whose drafts stopped paying (its first rounds failed) starts again
    /// once its lookups come true (its text begins to repeat).
    pub(crate) fn draft_acceptance(&self) -> f64 {
        let (shadowed, shadow_kept) = self.drafting.as_ref().map_or((0, 0), |d| (d.shadowed, d.shadow_kept));
        let spent = self.stats.drafted_tokens + self.stats.replayed_tokens + shadowed;
        ((self.stats.accepted_tokens + shadow_kept) as f64 + 1.0) / (spent as f64 + 2.0)
    }

    /// The tokens to decode again before the pending token (see [`Drafting::replay`]).
    pub(crate) fn pending_replay(&self) -> &[Token] {
        self.drafting.as_ref().map_or(&[], |d| &d.replay)
    }

    /// Notes `tokens` (decoded already, then dropped with a rejected round) to decode again
    /// before its pending token. A speculating request only.
    pub(crate) fn replay(&mut self, tokens: &[Token], counters: &Counters) {
        let Some(drafting) = self.drafting.as_mut() else { return };
        drafting.replay.extend_from_slice(tokens);
        self.stats.replayed_tokens += tokens.len();
        counters.replayed_tokens.fetch_add(tokens.len() as u64, Ordering::Relaxed);
    }

    /// How many tokens may be drafted after the pending token at position `pos`: a position is
    /// kept for the token after the drafts, none past `max_tokens` (they would be cut anyway),
    /// at most `batch_room`, and no more than the draft length that recent rounds earned.
    pub(crate) fn draft_room(&self, pos: usize, n_ctx: usize, batch_room: usize) -> usize {
        let Some(drafting) = &self.drafting else { return 0 };
        n_ctx.saturating_sub(pos + 2).min(self.max_tokens.saturating_sub(self.stats.completion_tokens)).min(batch_room).min(drafting.length.get())
    }

    /// Draws the output at batch `index` with the request's sampler (its log-probabilities
    /// noted when asked for); the first draw is the one place time to first token is taken.
    fn draw<Sess: BackendSession<Sampler = S>>(&mut self, session: &mut Sess, index: i32) -> Result<Token, EngineError> {
        let token = match self.logprobs {
            Some(n) if self.post_sampling => {
                let listed = session.sample_listing(&mut self.sampler, index, n)?;
                let token = listed.token;
                self.drawn.push(listed);
                token
            }
            Some(n) => {
                let token = session.sample_with(&mut self.sampler, index)?;
                // llama.cpp's samplers work on a copy of the row, so it still holds the model's logits.
                self.drawn.push(TokenLogprobs::from_row(session.logits_at(index)?, token, n));
                token
            }
            None => session.sample_with(&mut self.sampler, index)?,
        };
        if !self.drew {
            self.drew = true;
            self.stats.time_to_first_token_ms = ms(self.arrived.elapsed());
        }
        Ok(token)
    }

    /// The end rules for a drawn token that would take position `pos`: end of generation, its
    /// text (stop sequences held back and cut), max tokens, and a context that has no position
    /// left after it. Its text goes to the step's delta. The reason when the request ends with it.
    fn accept(
        &mut self,
        model: &impl BackendModel,
        token: Token,
        pos: usize,
        n_ctx: usize,
        counters: &Counters,
    ) -> Result<Option<FinishReason>, EngineError> {
        if model.is_eog(token) {
            return Ok(Some(FinishReason::EndOfText));
        }
        self.stats.completion_tokens += 1;
        self.tokens.push(token);
        counters.generated_tokens.fetch_add(1, Ordering::Relaxed);
        Ok(if self.text.push(model, token, &mut self.delta)? {
            Some(FinishReason::StopSequence)
        } else if self.stats.completion_tokens >= self.max_tokens {
            Some(FinishReason::MaxTokens)
        } else if pos + 1 >= n_ctx {
            Some(FinishReason::ContextFull)
        } else {
            None
        })
    }

    /// The one verification of a step's outputs, from batch index `first` (the output of the
    /// token just decoded, followed by one per draft). Each position is drawn with the request's
    /// own sampler in turn; a draft is kept while it equals the draw, so every token is a draw
    /// from the distribution it has without speculation (see [`crate::speculative`]). Kept drafts
    /// join `seq` (they were decoded in this step); the first draw that differs from its draft is
    /// the next token. Without drafts this is one draw. The caller cuts the cache back to `seq`.
    pub(crate) fn verify<Sess: BackendSession<Sampler = S>>(
        &mut self,
        session: &mut Sess,
        model: &impl BackendModel,
        first: i32,
        seq: &mut Sequence<Sess::Checkpoint>,
        n_ctx: usize,
        counters: &Counters,
    ) -> Result<Verified, EngineError> {
        let drafts = self.drafting.as_mut().map_or(Vec::new(), |d| std::mem::take(&mut d.drafts));
        let (mut kept, mut outcome) = (0, Ok(Verified::Ended(FinishReason::EndOfText)));
        for i in 0..=drafts.len() {
            let token = match self.draw(session, first + i as i32) {
                Ok(token) => token,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
            if let Some(drafting) = self.drafting.as_mut()
                && let Some(shadow) = drafting.shadow.take()
            {
                drafting.shadowed += 1;
                drafting.shadow_kept += usize::from(shadow == token);
            }
            let is_draft = drafts.get(i) == Some(&token);
            kept += usize::from(is_draft);
            match self.accept(model, token, seq.len(), n_ctx, counters) {
                Ok(Some(reason)) => {
                    outcome = Ok(Verified::Ended(reason));
                    break;
                }
                Ok(None) if is_draft => seq.push(token),
                Ok(None) => {
                    outcome = Ok(Verified::Next(token));
                    break;
                }
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        if let Some(drafting) = self.drafting.as_mut() {
            if !drafts.is_empty() {
                self.stats.drafted_tokens += drafts.len();
                self.stats.accepted_tokens += kept;
                counters.drafted_tokens.fetch_add(drafts.len() as u64, Ordering::Relaxed);
                counters.accepted_tokens.fetch_add(kept as u64, Ordering::Relaxed);
                drafting.length.update(drafts.len(), kept);
            }
            // The buffer goes back: the next step drafts into it without allocating.
            drafting.drafts = drafts;
        }
        outcome
    }

    /// Ends the request with `reason`: held-back text joins the step's delta, generation time
    /// and speed are taken.
    pub(crate) fn finish(&mut self, reason: FinishReason) {
        self.text.finish(reason, &mut self.delta);
        self.stats.finish_reason = Some(reason);
        // Ended before its prompt was in: no generation to time.
        if let Some(done) = self.prompt_done {
            self.stats.generation_ms = ms(done.elapsed());
            if self.stats.generation_ms > 0.0 {
                self.stats.generation_tokens_per_s = self.stats.completion_tokens as f64 / (self.stats.generation_ms / 1000.0);
            }
        }
    }

    /// What the request produced: its client, last text, stats, tokens and log-probabilities, and
    /// how many of those two went out with earlier texts.
    pub(crate) fn into_parts(self) -> (C, String, GenerationStats, Vec<Token>, Vec<TokenLogprobs>, (usize, usize)) {
        (self.client, self.delta, self.stats, self.tokens, self.drawn, self.delivered)
    }
}
