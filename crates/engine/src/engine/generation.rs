//! A generation in progress: the caller's iterator drives the session's scheduler, a step per
//! delta.

use super::Session;
use crate::error::EngineError;
use crate::outcome::{FinishReason, GenerationStats};
use crate::stop::TOKEN_TEXT_CAPACITY;
use crate::token::{Token, TokenLogprobs};

/// A generation in progress: an iterator of text deltas, or, without an allocation per token,
/// [`Generation::next_text`].
pub struct Generation<'s, 'e> {
    session: &'s mut Session<'e>,
    /// The last step's text (keeps its allocation across steps).
    delta: String,
    /// Whether `delta` is still to be handed out.
    unsent: bool,
    /// Once the request has ended: how, what it measured, and its tokens.
    ended: Option<Finished>,
    /// The reply's parser, for a chat rendered by its Jinja template.
    parser: Option<crate::ReplyParser>,
}

/// What remains of an ended generation.
struct Finished {
    outcome: Result<FinishReason, EngineError>,
    /// Whether the error was handed out (it is, once).
    reported: bool,
    stats: GenerationStats,
    tokens: Vec<Token>,
    logprobs: Vec<TokenLogprobs>,
}

impl std::fmt::Debug for Generation<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation").field("stats", self.stats()).finish_non_exhaustive()
    }
}

impl<'s, 'e> Generation<'s, 'e> {
    /// Decodes the request's prompt (admitted into the session's slot) and draws its first token.
    /// A prompt that fails, or is cancelled before it is in, is the error.
    pub(super) fn start(session: &'s mut Session<'e>, parser: Option<crate::ReplyParser>) -> Result<Self, EngineError> {
        let mut generation = Generation { session, delta: String::with_capacity(TOKEN_TEXT_CAPACITY), unsent: false, ended: None, parser };
        while generation.ended.is_none() && generation.session.scheduler.is_prefilling(0) {
            generation.step();
        }
        match generation.ended.as_ref().map(|e| (&e.outcome, e.stats.completion_tokens)) {
            Some((Err(e), _)) => Err(e.clone()),
            // Cancelled before its first token (its prompt decoding): the prompt is what failed.
            Some((Ok(FinishReason::Cancelled), 0)) => Err(EngineError::Cancelled),
            _ => Ok(generation),
        }
    }

    /// The parser that reads this generation's text as its chat format says (content,
    /// reasoning, tool calls), for a chat rendered by the model's Jinja template; None otherwise
    /// and after the first call.
    pub fn take_reply_parser(&mut self) -> Option<crate::ReplyParser> {
        self.parser.take()
    }

    /// The measurements so far; complete once the iterator has returned None.
    pub fn stats(&self) -> &GenerationStats {
        match &self.ended {
            Some(ended) => &ended.stats,
            None => self.session.scheduler.running(0).map(|(_, stats, _)| stats).expect("a running generation has its request"),
        }
    }

    /// The tokens generated so far (an end-of-generation token is not listed).
    pub fn tokens(&self) -> &[Token] {
        match &self.ended {
            Some(ended) => &ended.tokens,
            None => self.session.scheduler.running(0).map(|(_, _, tokens)| tokens).expect("a running generation has its request"),
        }
    }

    /// The log-probabilities of the tokens drawn so far, where the request asked for them
    /// ([`crate::GenerateOptions::logprobs`]; empty otherwise): one entry per drawn token (the
    /// end-of-generation token included) with its `n` likeliest candidates, as
    /// [`crate::Completion::logprobs`] lists them.
    pub fn logprobs(&self) -> &[TokenLogprobs] {
        match &self.ended {
            Some(ended) => &ended.logprobs,
            None => self.session.scheduler.running_logprobs(0),
        }
    }

    /// The next text delta, lent until the next call: what the iterator yields, without
    /// allocating a `String` for it. None once the generation has finished.
    pub fn next_text(&mut self) -> Option<Result<&str, EngineError>> {
        loop {
            if std::mem::take(&mut self.unsent) && !self.delta.is_empty() {
                return Some(Ok(&self.delta));
            }
            if let Some(ended) = &mut self.ended {
                return match &ended.outcome {
                    Err(e) if !std::mem::replace(&mut ended.reported, true) => Some(Err(e.clone())),
                    _ => None,
                };
            }
            self.step();
        }
    }

    /// One step of the scheduler; its text (or the ended request's last text) becomes the delta.
    fn step(&mut self) {
        let scheduler = &mut self.session.scheduler;
        scheduler.step();
        self.delta.clear();
        self.unsent = true;
        if let Some(ended) = scheduler.take_ended().next() {
            self.delta.push_str(&ended.delta);
            self.ended =
                Some(Finished { outcome: ended.outcome, reported: false, stats: ended.stats, tokens: ended.tokens, logprobs: ended.logprobs });
        } else if let Some((delta, _, _)) = scheduler.running(0) {
            self.delta.push_str(delta);
        }
    }
}

/// A generation dropped before its end (the caller stopped reading) ends as cancelled, so that
/// the session's slot is free for the next request; what it decoded stays cached for reuse.
impl Drop for Generation<'_, '_> {
    fn drop(&mut self) {
        if self.ended.is_none() {
            self.session.scheduler.abandon(0);
        }
    }
}

impl Iterator for Generation<'_, '_> {
    type Item = Result<String, EngineError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_text().map(|delta| delta.map(str::to_owned))
    }
}
