//! The bench protocol: what `exsa bench` prints (one [`BenchReport`] as JSON on stdout) and
//! `cargo xtask bench-compare` / `tune` read back, and the near-tie rule that decides whether two
//! builds' greedy outputs differ for a real reason. The engine, xtask and the conformance tests
//! all use these definitions, so the writer and the reader cannot drift apart.

#![warn(missing_docs)]

use serde::{Deserialize, Serialize};

/// Below this top-1/top-2 logit margin, two correct builds may pick different greedy tokens:
/// kernels for different ISAs (AVX-512 against AVX2, say) sum in different orders.
pub const NEAR_TIE: f32 = 0.25;

/// One greedy step: the token, the runner-up and how far ahead the token was, and the third
/// candidate with its distance from the top.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct GreedyStep {
    /// The token picked (the most likely one).
    pub token: i32,
    /// The second most likely token.
    pub runner_up: i32,
    /// Top logit minus the second: near 0, a different kernel may swap the two.
    pub margin: f32,
    /// The third most likely token and the top logit minus its logit: in a three-way tie a
    /// different kernel may pick it. Absent in reports written before it was recorded.
    #[serde(default)]
    pub third: Option<(i32, f32)>,
}

impl GreedyStep {
    /// The step that picked `token`, from its three best candidates with their logits (or
    /// log-probabilities, which differ alike), best first.
    pub fn from_top3(token: i32, [first, second, third]: [(i32, f32); 3]) -> GreedyStep {
        GreedyStep { token, runner_up: second.0, margin: first.1 - second.1, third: Some((third.0, first.1 - third.1)) }
    }

    /// How far below this step's top `token` was, when it was among the top three.
    pub fn gap_to(&self, token: i32) -> Option<f32> {
        if token == self.token {
            Some(0.0)
        } else if token == self.runner_up {
            Some(self.margin)
        } else {
            self.third.filter(|&(t, _)| t == token).map(|(_, gap)| gap)
        }
    }

    /// Whether `other` (the same step in another build) picked differently only because the
    /// two builds ranked near-tied candidates differently: each picked one of the other's top
    /// three, and at least one of them saw the two picks within `near_tie` logits (strictly). A
    /// swap of the top two is the common case; a three-way tie, where the builds agree on the
    /// runner-up but not on the top, is the other.
    pub fn is_near_tie_swap(&self, other: &GreedyStep, near_tie: f32) -> bool {
        match (self.gap_to(other.token), other.gap_to(self.token)) {
            (Some(mine), Some(theirs)) => mine < near_tie || theirs < near_tie,
            _ => false,
        }
    }
}

/// How two greedy traces compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Equivalence {
    /// The same tokens, as many of them.
    Identical,
    /// They first differ at this step by a near-tie swap (later steps follow other text and
    /// are not comparable).
    NearTieSwap(usize),
    /// They first differ at this step, and not by a near-tie swap: a real difference.
    Differs(usize),
}

impl Equivalence {
    /// The first step where the tokens differ, if any.
    pub fn diverges_at(self) -> Option<usize> {
        match self {
            Equivalence::Identical => None,
            Equivalence::NearTieSwap(k) | Equivalence::Differs(k) => Some(k),
        }
    }
}

/// Compares `other` with `reference` step by step under the near-tie rule. Traces of different
/// lengths differ where the shorter one ends.
pub fn compare(reference: &[GreedyStep], other: &[GreedyStep], near_tie: f32) -> Equivalence {
    match reference.iter().zip(other).position(|(a, b)| a.token != b.token) {
        None if reference.len() == other.len() => Equivalence::Identical,
        None => Equivalence::Differs(reference.len().min(other.len())),
        Some(k) if reference[k].is_near_tie_swap(&other[k], near_tie) => Equivalence::NearTieSwap(k),
        Some(k) => Equivalence::Differs(k),
    }
}

/// One timed run of one test.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// The test, in llama-bench's terms (`pp512`, `tg128`, `pp512+tg128`) or `e2eN`.
    pub test: String,
    /// Tokens the rate counts (prompt + generated for ppN+tgM).
    pub tokens: usize,
    /// Wall-clock duration of the run, in seconds.
    pub seconds: f64,
    /// `tokens / seconds`.
    pub tokens_per_s: f64,
    /// e2e only: from the request to the first generated token.
    pub time_to_first_token_ms: Option<f64>,
    /// e2e only: the share of generation time spent outside decoding (sampling, detokenizing,
    /// stop checks, streaming), in percent.
    pub outside_decode_percent: Option<f64>,
    /// Speculative task tests only: generated tokens per decode, and the share of drafted tokens
    /// the model confirmed, in percent.
    #[serde(default)]
    pub tokens_per_decode: Option<f64>,
    /// Speculative task tests only: the share of drafted tokens the model confirmed, in percent.
    /// None elsewhere, and in reports written before it was recorded.
    #[serde(default)]
    pub draft_acceptance_percent: Option<f64>,
}

impl Sample {
    /// `tokens` in `seconds`, with nothing else measured.
    pub fn timed(test: impl Into<String>, tokens: usize, seconds: f64) -> Sample {
        Sample {
            test: test.into(),
            tokens,
            seconds,
            tokens_per_s: tokens as f64 / seconds,
            time_to_first_token_ms: None,
            outside_decode_percent: None,
            tokens_per_decode: None,
            draft_acceptance_percent: None,
        }
    }
}

/// What a task test runs (`exsa bench --task-setup`), so that a reference program (llama.cpp's
/// `llama-lookup`) can run the same request: the chat prompt as rendered by the model's
/// template, and the sampling.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TaskSetup {
    /// `task-NAME` or `task-NAME-spec`.
    pub test: String,
    /// The chat prompt with the template applied (control-token text to be parsed, BOS to be
    /// added by the tokenizer).
    pub prompt: String,
    /// Tokens generated at most.
    pub max_tokens: usize,
    /// Most tokens drafted per round (prompt lookup); 0 without speculation.
    pub max_draft: u32,
    /// 0: greedy.
    pub temperature: f32,
    /// Top-k cut-off; 0: off.
    pub top_k: i32,
    /// Top-p (nucleus) cut-off; 1: off.
    pub top_p: f32,
    /// Min-p cut-off; 0: off.
    pub min_p: f32,
    /// 1: off.
    pub repeat_penalty: f32,
    /// Tokens the penalties look back over (-1: the whole context).
    pub repeat_last_n: i32,
    /// Seed of the sampler's random number generator.
    pub seed: u32,
}

/// What the engine reports about a model, the same for every backend.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModelInfo {
    /// The model file's path, as given.
    pub path: String,
    /// A one-line description of the model: llama.cpp's model description (architecture, size
    /// and file type) or, for the crate baseline, the GGUF's `general.name`; empty when unknown.
    pub description: String,
    /// The GGUF's `general.architecture` (`gemma3`, `llama`, ...); empty when unknown.
    pub architecture: String,
    /// Number of parameters.
    pub n_params: u64,
    /// Size of the weights in bytes.
    pub size_bytes: u64,
    /// Number of tokens in the vocabulary.
    pub n_vocab: i32,
    /// The context length the model was trained with, in tokens.
    pub n_ctx_train: u32,
    /// Width of the model's embeddings (hidden size).
    pub n_embd: usize,
    /// Whether the model file carries a chat template.
    pub has_chat_template: bool,
    /// Where the weights went, as llama.cpp logged it at load (layers offloaded, each device's
    /// model buffer: local CPU, GPUs, rpc-servers); empty where the backend does not say.
    #[serde(default)]
    pub placement: Vec<String>,
}

/// The whole output of one `exsa bench` process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BenchReport {
    /// `source`, `crate` or `raw`.
    pub backend: String,
    /// The model benchmarked.
    pub model: ModelInfo,
    /// Threads used for generation (the session's `n_threads`).
    pub threads: i32,
    /// Logical batch size: the most tokens submitted to one decode.
    pub n_batch: u32,
    /// Physical batch size: the most tokens computed at once within a decode.
    pub n_ubatch: u32,
    /// Flash attention as asked for: `on`, `off` or `auto`.
    pub flash_attn: String,
    /// Every timed run, in the order run.
    pub samples: Vec<Sample>,
    /// The greedy trace of the equivalence prompt, when asked for.
    pub greedy: Option<Vec<GreedyStep>>,
    /// llama.cpp's `llama_print_system_info`.
    pub system_info: String,
    /// The backend's build description (llama-sys' `BUILD_INFO` as JSON, or the crate's).
    pub build_info: serde_json::Value,
}

impl BenchReport {
    /// Parses what `exsa bench` printed.
    pub fn parse(stdout: &str) -> serde_json::Result<BenchReport> {
        serde_json::from_str(stdout.trim())
    }
}

/// The UTC date and time of `secs` seconds since 1970-01-01, as (year, month, day, hour,
/// minute, second): reports' and servers' timestamps without a date crate (Howard Hinnant's
/// civil-from-days).
pub fn utc_civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, (rem / 3600) as u32, (rem % 3600 / 60) as u32, (rem % 60) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(token: i32, runner_up: i32, margin: f32) -> GreedyStep {
        GreedyStep { token, runner_up, margin, third: None }
    }

    fn step3(token: i32, runner_up: i32, margin: f32, third: i32, gap: f32) -> GreedyStep {
        GreedyStep { token, runner_up, margin, third: Some((third, gap)) }
    }

    #[test]
    fn a_three_way_tie_is_a_near_tie_when_each_pick_is_among_the_others_top_three() {
        // Seen with AMX against AVX2 kernels (docs/amx.md): both builds ranked 12974 second,
        // each ranked the other's pick third.
        let a = step3(5464, 12974, 0.052, 4744, 0.06);
        let b = step3(4744, 12974, 0.041, 5464, 0.07);
        assert!(a.is_near_tie_swap(&b, NEAR_TIE) && b.is_near_tie_swap(&a, NEAR_TIE));
        assert!(!step3(5464, 12974, 0.4, 4744, 0.5).is_near_tie_swap(&step3(4744, 12974, 0.3, 5464, 0.6), NEAR_TIE), "too far apart on both sides");
        assert!(!a.is_near_tie_swap(&step3(4744, 12974, 0.041, 77, 0.07), NEAR_TIE), "5464 is not among the other's top three");
        assert!(!a.is_near_tie_swap(&step(4744, 12974, 0.041), NEAR_TIE), "an old report without the third candidate knows only swaps");
    }

    #[test]
    fn an_old_report_without_the_third_candidate_still_reads() {
        let old: GreedyStep = serde_json::from_str(r#"{"token":1,"runner_up":2,"margin":0.5}"#).unwrap();
        assert_eq!(old, step(1, 2, 0.5));
        let new = step3(1, 2, 0.5, 3, 0.75);
        assert_eq!(serde_json::from_str::<GreedyStep>(&serde_json::to_string(&new).unwrap()).unwrap(), new);
    }

    #[test]
    fn a_swap_is_near_tie_only_within_the_threshold_on_one_side() {
        let a = step(5, 7, 0.1);
        assert!(a.is_near_tie_swap(&step(7, 5, 0.4), NEAR_TIE));
        assert!(step(5, 7, 0.4).is_near_tie_swap(&step(7, 5, 0.1), NEAR_TIE), "either side's margin counts");
        assert!(!step(5, 7, NEAR_TIE).is_near_tie_swap(&step(7, 5, NEAR_TIE), NEAR_TIE), "exactly at the threshold is not below it");
        assert!(!a.is_near_tie_swap(&step(9, 5, 0.0), NEAR_TIE), "9 was not a's runner-up");
        assert!(!a.is_near_tie_swap(&step(7, 9, 0.0), NEAR_TIE), "5 was not the other's runner-up");
        assert!(!step(5, 7, 2.0).is_near_tie_swap(&step(7, 5, 1.5), NEAR_TIE));
    }

    #[test]
    fn traces_compare_at_their_first_difference() {
        let reference = [step(1, 2, 1.0), step(3, 4, 0.05), step(5, 6, 1.0)];
        assert_eq!(compare(&reference, &reference, NEAR_TIE), Equivalence::Identical);
        assert_eq!(compare(&reference, &reference[..2], NEAR_TIE), Equivalence::Differs(2), "a trace that stops short differs there");
        let swapped = [step(1, 2, 1.0), step(4, 3, 0.3), step(9, 9, 1.0)];
        assert_eq!(compare(&reference, &swapped, NEAR_TIE), Equivalence::NearTieSwap(1));
        let wrong = [step(1, 2, 1.0), step(3, 4, 0.05), step(8, 5, 1.0)];
        assert_eq!(compare(&reference, &wrong, NEAR_TIE), Equivalence::Differs(2));
        assert_eq!(Equivalence::Differs(2).diverges_at(), Some(2));
    }

    #[test]
    fn a_report_round_trips_and_a_foreign_one_is_refused() {
        let report = BenchReport {
            backend: "source".into(),
            model: ModelInfo { description: "gemma3 270M Q4_K - Medium".into(), n_vocab: 262_144, ..Default::default() },
            threads: 2,
            n_batch: 2048,
            n_ubatch: 512,
            flash_attn: "auto".into(),
            samples: vec![Sample {
                test: "e2e".into(),
                tokens: 128,
                seconds: 1.5,
                tokens_per_s: 85.3,
                time_to_first_token_ms: Some(50.0),
                outside_decode_percent: Some(0.3),
                tokens_per_decode: None,
                draft_acceptance_percent: None,
            }],
            greedy: Some(vec![step(1, 2, 0.5)]),
            system_info: "AVX2 = 1".into(),
            build_info: serde_json::json!({"hash": "abc"}),
        };
        let text = serde_json::to_string(&report).unwrap();
        assert_eq!(BenchReport::parse(&format!("{text}\n")).unwrap(), report);
        assert!(BenchReport::parse(r#"{"greedy_tokens": [1, 2]}"#).is_err(), "the old untyped layout is refused, not misread");
    }
}
