//! Sampler chains over llama.cpp's samplers.

use std::ffi::CString;
use std::ptr::NonNull;

use crate::context::Context;
use crate::error::{OutputError, SamplerError};
use crate::model::Model;
use crate::token::Token;
use crate::{backend, sys, top_k};

/// One stage of a chain, with its parameters, validated when the chain is built.
#[derive(Clone, Debug, PartialEq)]
enum Stage {
    Greedy,
    Dist {
        seed: u32,
    },
    Temp {
        t: f32,
    },
    TopK {
        k: i32,
    },
    TopP {
        p: f32,
        min_keep: usize,
    },
    MinP {
        p: f32,
        min_keep: usize,
    },
    Typical {
        p: f32,
        min_keep: usize,
    },
    Xtc {
        p: f32,
        t: f32,
        min_keep: usize,
        seed: u32,
    },
    Penalties {
        window: PenaltyWindow,
        repeat: f32,
        frequency: f32,
        presence: f32,
    },
    Dry {
        multiplier: f32,
        base: f32,
        allowed_length: u32,
        window: PenaltyWindow,
        breakers: Vec<String>,
    },
    Mirostat {
        seed: u32,
        tau: f32,
        eta: f32,
        m: i32,
    },
    MirostatV2 {
        seed: u32,
        tau: f32,
        eta: f32,
    },
    Grammar {
        grammar: String,
        root: String,
    },
    /// A grammar that applies from a trigger on (only as a constraint, see
    /// [`SamplerChain::constrain_lazy`]).
    LazyGrammar {
        grammar: String,
        root: String,
        triggers: GrammarTriggers,
    },
    LogitBias {
        biases: Vec<(Token, f32)>,
    },
}

impl Stage {
    fn name(&self) -> &'static str {
        match self {
            Stage::Greedy => "greedy",
            Stage::Dist { .. } => "dist",
            Stage::Temp { .. } => "temperature",
            Stage::TopK { .. } => "top-k",
            Stage::TopP { .. } => "top-p",
            Stage::MinP { .. } => "min-p",
            Stage::Typical { .. } => "typical",
            Stage::Xtc { .. } => "xtc",
            Stage::Penalties { .. } => "penalties",
            Stage::Dry { .. } => "dry",
            Stage::Mirostat { .. } => "mirostat",
            Stage::MirostatV2 { .. } => "mirostat-v2",
            Stage::Grammar { .. } => "grammar",
            Stage::LazyGrammar { .. } => "lazy grammar",
            Stage::LogitBias { .. } => "logit-bias",
        }
    }
}

/// Builds a [`Sampler`]: stages run in the order added; the last must pick a token
/// (`greedy`, `dist`, `mirostat`, `mirostat_v2`).
///
/// ```no_run
/// # fn f(model: &llama::Model) -> llama::Result<()> {
/// let sampler = llama::SamplerChain::new().top_k(40).top_p(0.95, 1).min_p(0.05, 1).temp(0.8).dist(42).build(model)?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerChain {
    stages: Vec<Stage>,
    preselect: bool,
    /// A grammar checked outside the chain: see [`SamplerChain::constrain`].
    constraint: Option<Constraint>,
}

/// The grammar of [`SamplerChain::constrain`] or [`SamplerChain::constrain_lazy`], and the
/// tokens it is fed before the first sample.
#[derive(Clone, Debug, PartialEq)]
struct Constraint {
    stage: Stage,
    prefill: Vec<Token>,
}

/// What wakes a lazy grammar ([`SamplerChain::constrain_lazy`]): until one of these, any token
/// is allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrammarTriggers {
    /// Regular expressions (ECMAScript syntax, as `std::regex` reads them) matched against the
    /// output from its start; the grammar then reads the output from the first match group on
    /// (from the match on, when the pattern has no group).
    pub patterns: Vec<String>,
    /// Tokens that wake the grammar when drawn; the grammar reads from that token on.
    pub tokens: Vec<Token>,
}

/// The tokens a penalty stage looks at ([`Penalties::window`], [`Dry::window`]): llama.cpp's
/// `last_n`. The tokens are those the chain accepted: sampled, or fed to [`Sampler::accept`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PenaltyWindow {
    /// No token: the stage does nothing (llama.cpp's 0).
    Off,
    /// The last `n` tokens (`Last(0)` is `Off`). At most `i32::MAX`: a larger window fails
    /// [`SamplerChain::build`] with [`SamplerError::InvalidParam`]. llama.cpp keeps a buffer of
    /// `n` tokens for it; a window longer than the model's training context is that context.
    Last(u32),
    /// The whole context: as many tokens as the model's training context, the most any context
    /// of it holds (llama.cpp's -1, counted as llama.cpp's own tools count it; its samplers take
    /// -1 itself as 0, off).
    WholeContext,
}

impl PenaltyWindow {
    /// From llama.cpp's `last_n`: 0 is [`Off`](Self::Off), -1
    /// [`WholeContext`](Self::WholeContext), `n > 0` [`Last(n)`](Self::Last); None below -1.
    pub fn from_last_n(last_n: i32) -> Option<Self> {
        match last_n {
            0 => Some(PenaltyWindow::Off),
            -1 => Some(PenaltyWindow::WholeContext),
            n => u32::try_from(n).ok().map(PenaltyWindow::Last),
        }
    }

    /// Whether llama.cpp can take the window (an `i32` count).
    fn fits(self) -> bool {
        !matches!(self, PenaltyWindow::Last(n) if i32::try_from(n).is_err())
    }

    /// llama.cpp's `last_n` for a stage of `model`'s chain: the whole context as a count, since
    /// llama.cpp's samplers clamp negative windows to 0, which would switch the stage off
    /// silently. No window is longer than the training context, the most tokens any context of
    /// the model holds: llama.cpp allocates the window's ring buffer up front, and a failed
    /// allocation of a huge one would throw across the FFI boundary.
    fn last_n(self, model: &Model) -> i32 {
        let whole = i32::try_from(model.n_ctx_train()).unwrap_or(i32::MAX);
        match self {
            PenaltyWindow::Off => 0,
            PenaltyWindow::Last(n) => i32::try_from(n).unwrap_or(i32::MAX).min(whole),
            PenaltyWindow::WholeContext => whole,
        }
    }
}

/// Repetition, frequency and presence penalties ([`SamplerChain::penalties`]) on the tokens of a
/// window: `Penalties::default().repeat(1.1)`. The default penalises nothing (each strength
/// neutral: llama.cpp's defaults), over llama.cpp's default window of the last 64 tokens. Each
/// value is checked when the chain is built; a bad one is [`SamplerError::InvalidParam`] naming
/// the field. llama.cpp advises a cut (`top_k`, `top_p`) before this stage: it looks up every
/// candidate.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Penalties {
    /// The tokens penalised: those in this window ([`PenaltyWindow::Last`]`(64)` by default).
    pub window: PenaltyWindow,
    /// Repetition penalty: the logit of a token in the window is divided by it where positive,
    /// multiplied by it where not. Finite and > 0; 1.0 (the default) is off.
    pub repeat: f32,
    /// Frequency penalty: subtracted from a token's logit once per time it occurs in the window.
    /// Finite; 0.0 (the default) is off.
    pub frequency: f32,
    /// Presence penalty: subtracted once from the logit of each token that occurs in the window.
    /// Finite; 0.0 (the default) is off.
    pub presence: f32,
}

impl Default for Penalties {
    fn default() -> Self {
        Penalties { window: PenaltyWindow::Last(64), repeat: 1.0, frequency: 0.0, presence: 0.0 }
    }
}

impl Penalties {
    /// Sets [`Penalties::window`].
    #[must_use]
    pub fn window(mut self, window: PenaltyWindow) -> Self {
        self.window = window;
        self
    }

    /// Sets [`Penalties::repeat`].
    #[must_use]
    pub fn repeat(mut self, repeat: f32) -> Self {
        self.repeat = repeat;
        self
    }

    /// Sets [`Penalties::frequency`].
    #[must_use]
    pub fn frequency(mut self, frequency: f32) -> Self {
        self.frequency = frequency;
        self
    }

    /// Sets [`Penalties::presence`].
    #[must_use]
    pub fn presence(mut self, presence: f32) -> Self {
        self.presence = presence;
        self
    }
}

/// DRY ("don't repeat yourself", [`SamplerChain::dry`]): a token that would extend a sequence
/// already seen in the window, repeating `allowed_length` or more tokens, has
/// `multiplier * base^(length - allowed_length)` subtracted from its logit. No repeat is matched
/// across a sequence breaker. `Dry::default().multiplier(0.8)`: the default is off
/// (multiplier 0), with llama.cpp's defaults for the rest. Each value is checked when the chain
/// is built; a bad one is [`SamplerError::InvalidParam`] naming the field.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Dry {
    /// How strong the penalty is. Finite and >= 0; 0.0 (the default) is off.
    pub multiplier: f32,
    /// How fast the penalty grows with the sequence's length. Finite and >= 1; 1.75 by default.
    pub base: f32,
    /// The longest repeat that goes unpenalised: a token that would make a repeat longer (extend
    /// one of `allowed_length` tokens or more) is penalised. At most `i32::MAX`; 2 by default.
    pub allowed_length: u32,
    /// The tokens searched for repeats ([`PenaltyWindow::Last`]`(64)` by default).
    pub window: PenaltyWindow,
    /// Text that breaks a sequence, tokenized with the model's vocabulary (llama.cpp keeps 40
    /// bytes of each, and skips empty ones): by default a newline, `:`, `"` and `*`.
    pub breakers: Vec<String>,
}

impl Default for Dry {
    fn default() -> Self {
        Dry {
            multiplier: 0.0,
            base: 1.75,
            allowed_length: 2,
            window: PenaltyWindow::Last(64),
            breakers: ["\n", ":", "\"", "*"].map(String::from).to_vec(),
        }
    }
}

impl Dry {
    /// Sets [`Dry::multiplier`].
    #[must_use]
    pub fn multiplier(mut self, multiplier: f32) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Sets [`Dry::base`].
    #[must_use]
    pub fn base(mut self, base: f32) -> Self {
        self.base = base;
        self
    }

    /// Sets [`Dry::allowed_length`].
    #[must_use]
    pub fn allowed_length(mut self, allowed_length: u32) -> Self {
        self.allowed_length = allowed_length;
        self
    }

    /// Sets [`Dry::window`].
    #[must_use]
    pub fn window(mut self, window: PenaltyWindow) -> Self {
        self.window = window;
        self
    }

    /// Sets [`Dry::breakers`].
    #[must_use]
    pub fn breakers<S: Into<String>>(mut self, breakers: impl IntoIterator<Item = S>) -> Self {
        self.breakers = breakers.into_iter().map(Into::into).collect();
        self
    }
}

impl Default for SamplerChain {
    fn default() -> Self {
        SamplerChain { stages: Vec::new(), preselect: true, constraint: None }
    }
}

impl SamplerChain {
    /// An empty chain.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether [`Sampler::sample`] may select the candidates of a chain that starts with
    /// `top_k` (k up to 256), or is `greedy` alone, straight from the logits row (on by default).
    ///
    /// llama.cpp's `llama_sampler_sample` writes a candidate for every token of the vocabulary
    /// and then cuts them down; preselection hands the chain only the `k` best, sorted, which
    /// the top-k stage would have left. The rest of the chain, its random draws included, runs
    /// unchanged on them, so a seeded chain picks the same tokens either way. The one
    /// difference: where logits tie exactly, preselection orders the lower token id first,
    /// llama.cpp's partial sort in no defined order.
    pub fn preselect(mut self, on: bool) -> Self {
        self.preselect = on;
        self
    }

    fn with(mut self, stage: Stage) -> Self {
        self.stages.push(stage);
        self
    }

    /// Picks the most likely token.
    pub fn greedy(self) -> Self {
        self.with(Stage::Greedy)
    }
    /// Draws from the distribution with a seeded RNG.
    pub fn dist(self, seed: u32) -> Self {
        self.with(Stage::Dist { seed })
    }
    /// Scales logits by 1/`t` (0: the most likely token).
    pub fn temp(self, t: f32) -> Self {
        self.with(Stage::Temp { t })
    }
    /// Keeps the `k` most likely tokens (`k <= 0`: all).
    pub fn top_k(self, k: i32) -> Self {
        self.with(Stage::TopK { k })
    }
    /// Keeps the smallest set of tokens whose probabilities sum to `p` (at least `min_keep`).
    pub fn top_p(self, p: f32, min_keep: usize) -> Self {
        self.with(Stage::TopP { p, min_keep })
    }
    /// Drops tokens less likely than `p` times the most likely one (at least `min_keep` stay).
    pub fn min_p(self, p: f32, min_keep: usize) -> Self {
        self.with(Stage::MinP { p, min_keep })
    }
    /// Locally typical sampling with mass `p` (at least `min_keep` stay).
    pub fn typical(self, p: f32, min_keep: usize) -> Self {
        self.with(Stage::Typical { p, min_keep })
    }
    /// Exclude Top Choices: with probability `p`, drops tokens above threshold `t` but the least of them.
    pub fn xtc(self, p: f32, t: f32, min_keep: usize, seed: u32) -> Self {
        self.with(Stage::Xtc { p, t, min_keep, seed })
    }
    /// Repetition, frequency and presence penalties on the tokens of a window (see
    /// [`Penalties`]): `.penalties(Penalties::default().repeat(1.1))`.
    pub fn penalties(self, penalties: Penalties) -> Self {
        let Penalties { window, repeat, frequency, presence } = penalties;
        self.with(Stage::Penalties { window, repeat, frequency, presence })
    }
    /// DRY ("don't repeat yourself"): penalises tokens that would extend a repeated sequence
    /// (see [`Dry`]): `.dry(Dry::default().multiplier(0.8))`.
    pub fn dry(self, dry: Dry) -> Self {
        let Dry { multiplier, base, allowed_length, window, breakers } = dry;
        self.with(Stage::Dry { multiplier, base, allowed_length, window, breakers })
    }
    /// Mirostat 1.0 with target surprise `tau`, learning rate `eta` and `m` tokens for its estimate.
    pub fn mirostat(self, seed: u32, tau: f32, eta: f32, m: i32) -> Self {
        self.with(Stage::Mirostat { seed, tau, eta, m })
    }
    /// Mirostat 2.0 with target surprise `tau` and learning rate `eta`.
    pub fn mirostat_v2(self, seed: u32, tau: f32, eta: f32) -> Self {
        self.with(Stage::MirostatV2 { seed, tau, eta })
    }
    /// Constrains output to a GBNF grammar starting at rule `root`.
    pub fn grammar(self, grammar: &str, root: &str) -> Self {
        self.with(Stage::Grammar { grammar: grammar.to_string(), root: root.to_string() })
    }
    /// Constrains every sampled token to a GBNF grammar starting at rule `root`, the way
    /// llama.cpp's server does it: the chain samples as it would without the grammar, and only
    /// when the grammar cannot take that token is the whole vocabulary masked by the grammar and
    /// the chain run again on what is left.
    ///
    /// A [`grammar`](Self::grammar) stage inside the chain instead masks the whole vocabulary
    /// every step (tens of milliseconds with a vocabulary of 262k tokens), and after a `top_k`
    /// stage it sees only the k best. For a deterministic chain (greedy, with or without
    /// penalties or biases) both give the same tokens; a random chain draws from the grammar's
    /// tokens only when its first draw was refused.
    pub fn constrain(mut self, grammar: &str, root: &str) -> Self {
        let stage = Stage::Grammar { grammar: grammar.to_string(), root: root.to_string() };
        self.constraint = Some(Constraint { stage, prefill: Vec::new() });
        self
    }

    /// [`constrain`](Self::constrain), with a grammar that applies only once the output
    /// matches one of `triggers` (a tool call starting, in llama.cpp's chat formats): before
    /// that, the chain samples freely.
    pub fn constrain_lazy(mut self, grammar: &str, root: &str, triggers: GrammarTriggers) -> Self {
        let stage = Stage::LazyGrammar { grammar: grammar.to_string(), root: root.to_string(), triggers };
        self.constraint = Some(Constraint { stage, prefill: Vec::new() });
        self
    }

    /// Tokens the constraint's grammar reads before the first sample (and again after a
    /// [`Sampler::reset`]): text the prompt already ends with that the grammar starts with,
    /// such as the opening of the assistant's turn in a chat format's grammar. A grammar that
    /// cannot read them fails the build with [`SamplerError::Grammar`]. No effect without a
    /// constraint.
    pub fn prefill_constraint(mut self, tokens: &[Token]) -> Self {
        if let Some(constraint) = &mut self.constraint {
            constraint.prefill = tokens.to_vec();
        }
        self
    }

    /// Adds a bias to the logits of the given tokens (-inf bans a token).
    pub fn logit_bias(self, biases: &[(Token, f32)]) -> Self {
        self.with(Stage::LogitBias { biases: biases.to_vec() })
    }

    /// Validates every stage and creates the chain for `model`.
    pub fn build(self, model: &Model) -> Result<Sampler<'_>, SamplerError> {
        backend::init();
        for stage in &self.stages {
            validate(stage, model.vocab().n_tokens())?;
        }
        // llama.cpp aborts the process when a chain leaves no token selected.
        if !matches!(self.stages.last(), Some(Stage::Greedy | Stage::Dist { .. } | Stage::Mirostat { .. } | Stage::MirostatV2 { .. })) {
            return Err(SamplerError::NoSelector { last: self.stages.last().map(Stage::name) });
        }
        // SAFETY: returns a struct by value.
        let params = unsafe { sys::llama_sampler_chain_default_params() };
        // SAFETY: creates an empty chain, owned by the Sampler below (freed on drop even if a
        // later stage fails).
        let chain = NonNull::new(unsafe { sys::llama_sampler_chain_init(params) }).ok_or(SamplerError::Llama("chain"))?;
        let n_vocab = usize::try_from(model.vocab().n_tokens()).unwrap_or(0);
        let preselect = if self.preselect { preselection(&self.stages, n_vocab) } else { None };
        let mut sampler = Sampler {
            raw: chain,
            model,
            preselect,
            candidates: Vec::new(),
            grammars: Vec::new(),
            constraint: None,
            prefill: Vec::new(),
            poisoned: false,
        };
        if let Some(Constraint { stage, prefill }) = &self.constraint {
            validate(stage, model.vocab().n_tokens())?;
            if let Some(bad) = prefill.iter().find(|t| !(0..model.vocab().n_tokens()).contains(&t.0)) {
                return Err(SamplerError::InvalidParam {
                    sampler: "grammar",
                    name: "prefill",
                    value: bad.0.to_string(),
                    reason: "is outside the vocabulary",
                });
            }
            // Owned by the Sampler from here (freed on drop), not by the chain.
            sampler.constraint = Some(create(stage, model)?);
            sampler.prefill = prefill.clone();
            sampler.feed_prefill().map_err(|e| SamplerError::Grammar { messages: crate::error::LlamaMessages(vec![e.to_string()]) })?;
        }
        for stage in &self.stages {
            let raw = create(stage, model)?;
            // SAFETY: the chain takes ownership of the stage, which lives as long as the chain.
            unsafe { sys::llama_sampler_chain_add(sampler.raw.as_ptr(), raw.as_ptr()) };
            if matches!(stage, Stage::Grammar { .. }) {
                sampler.grammars.push(raw);
            }
        }
        Ok(sampler)
    }
}

/// The `k` best candidates of a logits row. An all-NaN row leaves nothing to choose from, and
/// llama.cpp's stages assert on an empty array: that is an error here.
fn preselect_row(logits: &[f32], k: usize, out: &mut Vec<sys::llama_token_data>) -> Result<(), SamplerError> {
    top_k::select(logits, k, out);
    if out.is_empty() { Err(SamplerError::NothingSelected { candidates: 0 }) } else { Ok(()) }
}

/// A token drawn by [`Sampler::sample_listing`] and what the chain drew it from.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledFrom {
    /// The token drawn (and accepted into the chain).
    pub token: Token,
    /// The chain's probability for `token`.
    pub p: f32,
    /// The likeliest candidates the chain left and their probabilities, likeliest first (ties:
    /// the lower token id first); none of probability 0.
    pub top: Vec<(Token, f32)>,
}

impl SampledFrom {
    /// From the candidates a chain left (their logits as its stages left them): probabilities
    /// by softmax over those.
    fn of(token: Token, left: &[sys::llama_token_data], n: usize) -> SampledFrom {
        let max = left.iter().map(|c| c.logit).fold(f32::NEG_INFINITY, f32::max);
        let weight = |logit: f32| if max.is_finite() { (logit - max).exp() } else { 0.0 };
        let sum: f32 = left.iter().map(|c| weight(c.logit)).sum();
        let p = |logit: f32| if sum > 0.0 { weight(logit) / sum } else { 0.0 };
        let mut top: Vec<(Token, f32)> = left.iter().map(|c| (Token(c.id), p(c.logit))).filter(|&(_, p)| p > 0.0).collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.0.cmp(&b.0.0)));
        let p_token = top.iter().find(|(t, _)| *t == token).map_or(0.0, |&(_, p)| p);
        top.truncate(n);
        SampledFrom { token, p: p_token, top }
    }
}

/// Every token of a logits row as a candidate, in token order (what `llama_sampler_sample`
/// hands a chain).
fn whole_row(logits: &[f32], out: &mut Vec<sys::llama_token_data>) {
    out.clear();
    out.extend(logits.iter().zip(0..).map(|(&logit, id)| sys::llama_token_data { id, logit, p: 0.0 }));
}

/// How many candidates the chain needs to see, where that is fewer than the whole vocabulary
/// and they can be selected from the logits row without changing what the chain does.
fn preselection(stages: &[Stage], n_vocab: usize) -> Option<usize> {
    let k = match stages {
        [Stage::Greedy] => 1,
        [Stage::TopK { k }, ..] => usize::try_from(*k).ok()?,
        _ => return None,
    };
    (k > 0 && k <= top_k::MAX_K && k < n_vocab).then_some(k)
}

fn validate(stage: &Stage, n_vocab: i32) -> Result<(), SamplerError> {
    let sampler = stage.name();
    let check = |ok: bool, name, value: &dyn std::fmt::Debug, reason| {
        if ok { Ok(()) } else { Err(SamplerError::InvalidParam { sampler, name, value: format!("{value:?}"), reason }) }
    };
    let unit = |x: f32| x.is_finite() && (0.0..=1.0).contains(&x);
    match stage {
        Stage::Greedy | Stage::Dist { .. } | Stage::TopK { .. } | Stage::Grammar { .. } => Ok(()),
        Stage::LazyGrammar { triggers, .. } => {
            for token in &triggers.tokens {
                check((0..n_vocab).contains(&token.0), "trigger token", token, "is outside the vocabulary")?;
            }
            check(!triggers.patterns.is_empty() || !triggers.tokens.is_empty(), "triggers", &triggers, "a lazy grammar needs a trigger")
        }
        Stage::Temp { t } => check(t.is_finite() && *t >= 0.0, "t", t, "must be finite and >= 0"),
        Stage::TopP { p, .. } => check(unit(*p), "p", p, "must be within 0..=1"),
        Stage::MinP { p, .. } => check(unit(*p), "p", p, "must be within 0..=1"),
        Stage::Typical { p, .. } => check(unit(*p), "p", p, "must be within 0..=1"),
        Stage::Xtc { p, t, .. } => {
            check(unit(*p), "p", p, "must be within 0..=1")?;
            check(unit(*t), "t", t, "must be within 0..=1")
        }
        Stage::Penalties { window, repeat, frequency, presence } => {
            check(window.fits(), "window", window, "must be at most i32::MAX tokens")?;
            check(repeat.is_finite() && *repeat > 0.0, "repeat", repeat, "must be finite and > 0 (1 = off)")?;
            check(frequency.is_finite(), "frequency", frequency, "must be finite")?;
            check(presence.is_finite(), "presence", presence, "must be finite")
        }
        Stage::Dry { multiplier, base, allowed_length, window, .. } => {
            check(multiplier.is_finite() && *multiplier >= 0.0, "multiplier", multiplier, "must be finite and >= 0")?;
            check(base.is_finite() && *base >= 1.0, "base", base, "must be finite and >= 1")?;
            check(i32::try_from(*allowed_length).is_ok(), "allowed_length", allowed_length, "must be at most i32::MAX")?;
            check(window.fits(), "window", window, "must be at most i32::MAX tokens")
        }
        Stage::Mirostat { tau, eta, m, .. } => {
            check(tau.is_finite() && *tau > 0.0, "tau", tau, "must be finite and > 0")?;
            check(eta.is_finite() && *eta > 0.0, "eta", eta, "must be finite and > 0")?;
            check(*m > 0, "m", m, "must be > 0")
        }
        Stage::MirostatV2 { tau, eta, .. } => {
            check(tau.is_finite() && *tau > 0.0, "tau", tau, "must be finite and > 0")?;
            check(eta.is_finite() && *eta > 0.0, "eta", eta, "must be finite and > 0")
        }
        Stage::LogitBias { biases } => {
            for (token, bias) in biases {
                check((0..n_vocab).contains(&token.0), "token", token, "is outside the vocabulary")?;
                check(bias.is_finite() || *bias == f32::NEG_INFINITY, "bias", bias, "must be finite or -inf")?;
            }
            Ok(())
        }
    }
}

fn create(stage: &Stage, model: &Model) -> Result<NonNull<sys::llama_sampler>, SamplerError> {
    let vocab = model.vocab();
    let n_vocab = vocab.n_tokens();
    // SAFETY: every arm calls a constructor that copies its arguments; the pointers passed are
    // valid for the call (CStrings and slices owned here, out-parameters on this stack), and the
    // vocab outlives the sampler, which borrows the model. Constructors that can throw (DRY
    // tokenizes its breakers, the grammar parses) go through llama-sys' exception guards.
    let (raw, messages) = unsafe {
        match stage {
            Stage::Greedy => (sys::llama_sampler_init_greedy(), None),
            Stage::Dist { seed } => (sys::llama_sampler_init_dist(*seed), None),
            Stage::Temp { t } => (sys::llama_sampler_init_temp(*t), None),
            Stage::TopK { k } => (sys::llama_sampler_init_top_k(*k), None),
            Stage::TopP { p, min_keep } => (sys::llama_sampler_init_top_p(*p, *min_keep), None),
            Stage::MinP { p, min_keep } => (sys::llama_sampler_init_min_p(*p, *min_keep), None),
            Stage::Typical { p, min_keep } => (sys::llama_sampler_init_typical(*p, *min_keep), None),
            Stage::Xtc { p, t, min_keep, seed } => (sys::llama_sampler_init_xtc(*p, *t, *min_keep, *seed), None),
            Stage::Penalties { window, repeat, frequency, presence } => {
                (sys::llama_sampler_init_penalties(n_vocab, window.last_n(model), *repeat, *frequency, *presence), None)
            }
            Stage::Dry { multiplier, base, allowed_length, window, breakers } => {
                let owned: Vec<CString> = breakers
                    .iter()
                    .map(|b| CString::new(b.as_str()))
                    .collect::<Result<_, _>>()
                    .map_err(|_| SamplerError::Nul("a DRY sequence breaker"))?;
                let mut ptrs: Vec<*const std::ffi::c_char> = owned.iter().map(|c| c.as_ptr()).collect();
                let mut raw = std::ptr::null_mut();
                let last_n = window.last_n(model);
                // Validated to fit.
                let allowed_length = i32::try_from(*allowed_length).unwrap_or(i32::MAX);
                crate::cpp::guard("llama_sampler_init_dry", |err| {
                    sys::exsa_sampler_init_dry(
                        vocab.as_ptr(),
                        *multiplier,
                        *base,
                        allowed_length,
                        last_n,
                        ptrs.as_mut_ptr(),
                        ptrs.len(),
                        &mut raw,
                        err,
                    )
                })?;
                (raw, None)
            }
            Stage::Mirostat { seed, tau, eta, m } => (sys::llama_sampler_init_mirostat(n_vocab, *seed, *tau, *eta, *m), None),
            Stage::MirostatV2 { seed, tau, eta } => (sys::llama_sampler_init_mirostat_v2(*seed, *tau, *eta), None),
            Stage::Grammar { grammar, root } => {
                let g = CString::new(grammar.as_str()).map_err(|_| SamplerError::Nul("the grammar"))?;
                let r = CString::new(root.as_str()).map_err(|_| SamplerError::Nul("the grammar root"))?;
                let mut raw = std::ptr::null_mut();
                let (guarded, messages) = backend::capture(|| {
                    crate::cpp::guard("llama_sampler_init_grammar", |err| {
                        sys::exsa_sampler_init_grammar(vocab.as_ptr(), g.as_ptr(), r.as_ptr(), &mut raw, err)
                    })
                });
                guarded.map_err(|e| SamplerError::Grammar { messages: crate::error::LlamaMessages(vec![e.what]) })?;
                (raw, Some(messages))
            }
            Stage::LazyGrammar { grammar, root, triggers } => {
                let g = CString::new(grammar.as_str()).map_err(|_| SamplerError::Nul("the grammar"))?;
                let r = CString::new(root.as_str()).map_err(|_| SamplerError::Nul("the grammar root"))?;
                let patterns = triggers
                    .patterns
                    .iter()
                    .map(|p| CString::new(p.as_str()).map_err(|_| SamplerError::Nul("a grammar trigger")))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut pattern_ptrs: Vec<*const std::ffi::c_char> = patterns.iter().map(|p| p.as_ptr()).collect();
                let tokens: Vec<sys::llama_token> = triggers.tokens.iter().map(|t| t.0).collect();
                let mut raw = std::ptr::null_mut();
                let (guarded, messages) = backend::capture(|| {
                    crate::cpp::guard("llama_sampler_init_grammar_lazy_patterns", |err| {
                        sys::exsa_sampler_init_grammar_lazy(
                            vocab.as_ptr(),
                            g.as_ptr(),
                            r.as_ptr(),
                            pattern_ptrs.as_mut_ptr(),
                            pattern_ptrs.len(),
                            tokens.as_ptr(),
                            tokens.len(),
                            &mut raw,
                            err,
                        )
                    })
                });
                guarded.map_err(|e| SamplerError::Grammar { messages: crate::error::LlamaMessages(vec![e.what]) })?;
                (raw, Some(messages))
            }
            Stage::LogitBias { biases } => {
                let raw: Vec<sys::llama_logit_bias> = biases.iter().map(|(t, b)| sys::llama_logit_bias { token: t.0, bias: *b }).collect();
                (sys::llama_sampler_init_logit_bias(n_vocab, raw.len() as i32, raw.as_ptr()), None)
            }
        }
    };
    match (NonNull::new(raw), messages) {
        (Some(raw), _) => Ok(raw),
        (None, Some(messages)) => Err(SamplerError::Grammar { messages }),
        (None, None) => Err(SamplerError::Llama(stage.name())),
    }
}

/// A sampler chain, tied to the model whose vocabulary it was built for.
#[derive(Debug)]
pub struct Sampler<'m> {
    raw: NonNull<sys::llama_sampler>,
    model: &'m Model,
    /// The chain's candidates are the top this-many of the logits row (see
    /// [`SamplerChain::preselect`]).
    preselect: Option<usize>,
    /// Reused by every preselected sample: no allocation per token.
    candidates: Vec<sys::llama_token_data>,
    /// The chain's grammar stages (owned by the chain): asked before a token is accepted,
    /// because llama.cpp's grammar aborts on an end-of-generation token it cannot take and
    /// throws on other tokens it cannot take, leaving itself broken.
    grammars: Vec<NonNull<sys::llama_sampler>>,
    /// The grammar of [`SamplerChain::constrain`], owned here (not by the chain).
    constraint: Option<NonNull<sys::llama_sampler>>,
    /// What the constraint reads first ([`SamplerChain::prefill_constraint`]).
    prefill: Vec<Token>,
    /// Set when llama.cpp threw inside the chain: its state (a grammar's stacks) may be broken,
    /// and using it again could abort. Cleared by a successful [`Sampler::reset`].
    poisoned: bool,
}

// SAFETY: the chain owns its state outright and every method that touches it takes &mut self.
unsafe impl Send for Sampler<'_> {}

impl Sampler<'_> {
    /// The raw chain; it stays owned by the sampler.
    pub fn as_ptr(&self) -> *mut sys::llama_sampler {
        self.raw.as_ptr()
    }

    /// A guarded call into the chain: an exception poisons the sampler until it is reset.
    fn guarded(&mut self, function: &'static str, call: impl FnOnce(*mut sys::exsa_error) -> i32) -> Result<(), SamplerError> {
        if self.poisoned {
            return Err(SamplerError::Poisoned);
        }
        crate::cpp::guard(function, call).map_err(|e| {
            self.poisoned = true;
            SamplerError::Exception(e)
        })
    }

    /// Feeds the prefill to the constraint.
    fn feed_prefill(&mut self) -> Result<(), SamplerError> {
        let Some(constraint) = self.constraint else { return Ok(()) };
        for i in 0..self.prefill.len() {
            let token = self.prefill[i].0;
            // SAFETY: the constraint is live and owned by this sampler; the token is inside
            // the vocabulary (checked at build).
            self.guarded("llama_sampler_accept", |err| unsafe { sys::exsa_sampler_accept(constraint.as_ptr(), token, err) })?;
        }
        Ok(())
    }

    /// Whether every grammar stage of the chain can take `token` now: each is applied to a
    /// one-candidate array, which a grammar sets to -inf when it cannot take the token.
    fn grammars_accept(&mut self, token: i32) -> Result<bool, SamplerError> {
        for i in 0..self.grammars.len() + usize::from(self.constraint.is_some()) {
            let Some(grammar) = self.grammars.get(i).copied().or(self.constraint) else { break };
            let mut one = [sys::llama_token_data { id: token, logit: 0.0, p: 0.0 }];
            let mut array = sys::llama_token_data_array { data: one.as_mut_ptr(), size: 1, selected: -1, sorted: false };
            // SAFETY: the stage lives inside the chain we own; the array points to one live
            // candidate with a token id inside the vocabulary (checked by the callers).
            self.guarded("llama_sampler_apply", |err| unsafe { sys::exsa_sampler_apply(grammar.as_ptr(), &mut array, err) })?;
            if one[0].logit == f32::NEG_INFINITY {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Samples a token from the logits of batch entry `index` of the context's last decode,
    /// and accepts it into the chain's state (penalties, grammar, mirostat).
    pub fn sample(&mut self, ctx: &Context<'_>, index: i32) -> Result<Token, SamplerError> {
        self.check_output(ctx, index)?;
        if self.constraint.is_some() || self.preselect.is_some() {
            return self.draw_own(ctx, index).map(|(token, _)| token);
        }
        let mut token = 0;
        let chain = self.raw.as_ptr();
        // SAFETY: index is an output of the context's last decode, so llama.cpp has logits for
        // it (it aborts otherwise); the chain and context are alive. Context is not Sync, so
        // nothing else uses it meanwhile. A grammar's accept throws when the selected token
        // breaks it: the guard turns that into an error.
        self.guarded("llama_sampler_sample", |err| unsafe { sys::exsa_sampler_sample(chain, ctx.as_ptr(), index, &mut token, err) })?;
        Ok(Token(token))
    }

    /// [`Sampler::sample`], also saying what the chain drew from: its probability for the token
    /// drawn, and the `n` likeliest candidates it left with theirs, likeliest first. These are
    /// the probabilities after the chain's cuts and temperature, over the candidates it left
    /// (llama-server's `post_sampling_probs`): a greedy chain leaves one, certain; a candidate a
    /// grammar or bias ruled out (probability 0) is not listed. The chain runs on this sampler's
    /// own candidate array (as with preselection), which holds every token of the row unless
    /// preselection cuts it: the same token is drawn as by `sample`.
    pub fn sample_listing(&mut self, ctx: &Context<'_>, index: i32, n: usize) -> Result<SampledFrom, SamplerError> {
        self.check_output(ctx, index)?;
        let (token, left) = self.draw_own(ctx, index)?;
        Ok(SampledFrom::of(token, &self.candidates[..left], n))
    }

    /// A context of this sampler's model whose last decode has an output at `index`.
    fn check_output(&self, ctx: &Context<'_>, index: i32) -> Result<(), SamplerError> {
        if !std::ptr::eq(ctx.model(), self.model) {
            return Err(SamplerError::WrongModel);
        }
        if !ctx.outputs().contains(&index) {
            return Err(OutputError::NotAnOutput { index, outputs: ctx.outputs().to_vec() }.into());
        }
        Ok(())
    }

    /// Draws and accepts a token with the chain running on `self.candidates` (the top `k` of
    /// the row when preselecting: the chain's top-k stage finds the array sorted and already `k`
    /// long and leaves it be; else the whole row, as `llama_sampler_sample` hands it a chain).
    /// Returns the token and how many candidates the chain left.
    fn draw_own(&mut self, ctx: &Context<'_>, index: i32) -> Result<(Token, usize), SamplerError> {
        if let Some(constraint) = self.constraint {
            return self.sample_constrained(ctx, index, constraint);
        }
        let sorted = self.fill_candidates(ctx.logits(index)?)?;
        let (token, left) = self.select(sorted, None)?;
        self.accept_into(self.raw, token)?;
        Ok((Token(token), left))
    }

    /// The chain's candidates from a logits row: the top k (sorted: true) when preselecting,
    /// else every token.
    fn fill_candidates(&mut self, logits: &[f32]) -> Result<bool, SamplerError> {
        match self.preselect {
            Some(k) => {
                preselect_row(logits, k, &mut self.candidates)?;
                Ok(true)
            }
            None => {
                whole_row(logits, &mut self.candidates);
                Ok(false)
            }
        }
    }

    /// Samples from the last output of the context's last decode: the next token of a
    /// generation whose batch asked for one output, at its end.
    pub fn sample_last(&mut self, ctx: &Context<'_>) -> Result<Token, SamplerError> {
        let last = *ctx.outputs().last().ok_or(OutputError::NoOutputs)?;
        self.sample(ctx, last)
    }

    /// Samples with the [`SamplerChain::constrain`] grammar: the chain's own choice if the
    /// grammar takes it, else the chain's choice among the tokens the grammar allows.
    /// Also returns how many candidates the chain left (see [`Sampler::select`]).
    fn sample_constrained(&mut self, ctx: &Context<'_>, index: i32, constraint: NonNull<sys::llama_sampler>) -> Result<(Token, usize), SamplerError> {
        let logits = ctx.logits(index)?;
        let sorted = self.fill_candidates(logits)?;
        let first = self.select(sorted, None)?;
        let (token, left) = if self.grammars_accept(first.0)? {
            first
        } else {
            whole_row(logits, &mut self.candidates);
            self.select(false, Some(constraint))?
        };
        self.accept_into(constraint, token)?;
        self.accept_into(self.raw, token)?;
        Ok((Token(token), left))
    }

    /// Runs `mask` (a grammar), then the chain, over `self.candidates` without accepting
    /// anything, and returns the selected token. A token ruled out (-inf) is an error: accepting
    /// it would break a grammar.
    /// Also returns how many candidates the chain left: the first that many of
    /// `self.candidates`.
    fn select(&mut self, sorted: bool, mask: Option<NonNull<sys::llama_sampler>>) -> Result<(i32, usize), SamplerError> {
        if self.poisoned {
            return Err(SamplerError::Poisoned);
        }
        let mut array = sys::llama_token_data_array { data: self.candidates.as_mut_ptr(), size: self.candidates.len(), selected: -1, sorted };
        for stage in mask.into_iter().chain([self.raw]) {
            // SAFETY: the array points into our buffer, which lives and is not touched elsewhere
            // for the call; stages only shrink `size`, reorder and write within it. The stage is
            // the chain or the constraint, both owned by this sampler.
            self.guarded("llama_sampler_apply", |err| unsafe { sys::exsa_sampler_apply(stage.as_ptr(), &mut array, err) })?;
        }
        let selected = usize::try_from(array.selected).ok().filter(|&i| i < array.size.min(self.candidates.len()));
        let chosen = selected.and_then(|i| self.candidates.get(i)).ok_or(SamplerError::NothingSelected { candidates: array.size })?;
        // A stage (a grammar that fits none of the top k, a logit bias) ruled every candidate
        // out and the selector still picked one: accepting it would break the grammar.
        if chosen.logit == f32::NEG_INFINITY {
            return Err(SamplerError::AllRuledOut { candidates: array.size });
        }
        Ok((chosen.id, array.size.min(self.candidates.len())))
    }

    /// Accepts a token the chain or a grammar check has let through into `target` (the chain
    /// or the constraint).
    fn accept_into(&mut self, target: NonNull<sys::llama_sampler>, token: i32) -> Result<(), SamplerError> {
        // SAFETY: `target` is owned by this sampler and alive; the token comes from the logits
        // row, so it is in the vocabulary, and every grammar that sees it has taken it (a
        // grammar's accept aborts on an end-of-generation token it cannot take).
        self.guarded("llama_sampler_accept", |err| unsafe { sys::exsa_sampler_accept(target.as_ptr(), token, err) })
    }

    /// The number of candidates this sampler selects from the logits row before its chain runs,
    /// or None where the chain sees the whole vocabulary (see [`SamplerChain::preselect`]).
    pub fn preselected(&self) -> Option<usize> {
        self.preselect
    }

    /// Feeds a token chosen elsewhere into the chain's state. A token outside the vocabulary,
    /// or one a grammar stage cannot take now, is refused and leaves the chain as it was.
    pub fn accept(&mut self, token: Token) -> Result<(), SamplerError> {
        let n_vocab = self.model.vocab().n_tokens();
        if !(0..n_vocab).contains(&token.0) {
            return Err(SamplerError::TokenOutOfRange { token, n_vocab });
        }
        if !self.grammars_accept(token.0)? {
            return Err(SamplerError::GrammarRejects { token });
        }
        if let Some(constraint) = self.constraint {
            self.accept_into(constraint, token.0)?;
        }
        self.accept_into(self.raw, token.0)
    }

    /// Resets the chain's state (penalty history, grammar; the RNG stays seeded as built; the
    /// constraint reads its prefill again), and with it a sampler that
    /// [`SamplerError::Poisoned`] refused.
    pub fn reset(&mut self) -> Result<(), SamplerError> {
        self.poisoned = false;
        for stage in [Some(self.raw), self.constraint].into_iter().flatten() {
            // SAFETY: live chain or constraint, owned by this sampler.
            self.guarded("llama_sampler_reset", |err| unsafe { sys::exsa_sampler_reset(stage.as_ptr(), err) })?;
        }
        self.feed_prefill()
    }

    /// Number of stages.
    pub fn len(&self) -> usize {
        // SAFETY: live chain.
        unsafe { sys::llama_sampler_chain_n(self.raw.as_ptr()) }.max(0) as usize
    }

    /// Whether the chain has no stage.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Sampler<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the chain, which frees its stages, and the constraint, which is in no
        // chain; each is freed once.
        unsafe {
            sys::llama_sampler_free(self.raw.as_ptr());
            if let Some(constraint) = self.constraint {
                sys::llama_sampler_free(constraint.as_ptr());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_all_nan_row_selects_nothing_and_says_so() {
        let mut out = Vec::new();
        let err = preselect_row(&[f32::NAN; 1000], 40, &mut out).unwrap_err();
        assert!(matches!(err, SamplerError::NothingSelected { candidates: 0 }), "{err}");
        let mut row = vec![f32::NAN; 1000];
        row[7] = 1.0;
        preselect_row(&row, 40, &mut out).unwrap();
        assert_eq!(out.iter().map(|c| c.id).collect::<Vec<_>>(), vec![7]);
    }

    #[test]
    fn each_setter_sets_its_own_field() {
        let window = PenaltyWindow::Last(7);
        let penalties = Penalties::default().window(window).repeat(1.5).frequency(0.25).presence(0.5);
        assert_eq!(penalties, Penalties { window, repeat: 1.5, frequency: 0.25, presence: 0.5 });
        let dry = Dry::default().multiplier(0.8).base(2.0).allowed_length(3).window(window).breakers(["x", "y"]);
        assert_eq!(dry, Dry { multiplier: 0.8, base: 2.0, allowed_length: 3, window, breakers: vec!["x".into(), "y".into()] });
    }

    #[test]
    fn windows_map_llama_cpps_last_n_and_refuse_what_it_cannot_take() {
        assert_eq!(PenaltyWindow::from_last_n(0), Some(PenaltyWindow::Off));
        assert_eq!(PenaltyWindow::from_last_n(-1), Some(PenaltyWindow::WholeContext));
        assert_eq!(PenaltyWindow::from_last_n(64), Some(PenaltyWindow::Last(64)));
        assert_eq!(PenaltyWindow::from_last_n(-2), None);
        let name = |stage: &Stage| match validate(stage, 1000) {
            Err(SamplerError::InvalidParam { name, .. }) => Some(name),
            _ => None,
        };
        let penalties = |window| Stage::Penalties { window, repeat: 1.1, frequency: 0.0, presence: 0.0 };
        assert_eq!(name(&penalties(PenaltyWindow::Last(i32::MAX as u32))), None);
        assert_eq!(name(&penalties(PenaltyWindow::Last(i32::MAX as u32 + 1))), Some("window"));
        let dry = |dry: Dry| SamplerChain::new().dry(dry).stages.remove(0);
        assert_eq!(name(&dry(Dry::default().multiplier(0.8))), None);
        assert_eq!(name(&dry(Dry::default().allowed_length(u32::MAX))), Some("allowed_length"));
        assert_eq!(name(&dry(Dry::default().window(PenaltyWindow::Last(u32::MAX)))), Some("window"));
    }

    #[test]
    fn only_chains_that_start_by_cutting_to_a_small_top_k_are_preselected() {
        let n_vocab = 262_144;
        let top_k = |k| Stage::TopK { k };
        assert_eq!(preselection(&[Stage::Greedy], n_vocab), Some(1));
        assert_eq!(
            preselection(&[top_k(40), Stage::TopP { p: 0.95, min_keep: 1 }, Stage::Temp { t: 0.8 }, Stage::Dist { seed: 1 }], n_vocab),
            Some(40)
        );
        assert_eq!(preselection(&[top_k(top_k::MAX_K as i32), Stage::Dist { seed: 1 }], n_vocab), Some(top_k::MAX_K));
        // Off, too large for the insertion buffer, or the whole vocabulary: nothing to save.
        assert_eq!(preselection(&[top_k(0), Stage::Dist { seed: 1 }], n_vocab), None);
        assert_eq!(preselection(&[top_k(-3), Stage::Dist { seed: 1 }], n_vocab), None);
        assert_eq!(preselection(&[top_k(top_k::MAX_K as i32 + 1), Stage::Dist { seed: 1 }], n_vocab), None);
        assert_eq!(preselection(&[top_k(40), Stage::Dist { seed: 1 }], 40), None);
        // A stage before top-k changes logits, so the row is not what top-k would see.
        let penalties = Stage::Penalties { window: PenaltyWindow::Last(64), repeat: 1.1, frequency: 0.0, presence: 0.0 };
        assert_eq!(preselection(&[penalties, top_k(40), Stage::Dist { seed: 1 }], n_vocab), None);
        assert_eq!(preselection(&[Stage::LogitBias { biases: vec![] }, Stage::Greedy], n_vocab), None);
        assert_eq!(preselection(&[Stage::Temp { t: 0.8 }, Stage::Dist { seed: 1 }], n_vocab), None);
        assert_eq!(preselection(&[], n_vocab), None);
    }
}
