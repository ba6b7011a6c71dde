//! Whether drafts pay at a step's occupancy. A decode costs a fixed part (reading every weight
//! once, whatever the batch) and a part per token in the batch (the matrix work, the output
//! layer for each token with logits). One stream leaves the per-token part idle, so drafts cost
//! little beside the fixed part and any accepted draft is a token almost for free; with many
//! streams the batch is compute-bound and a draft costs as much as a sequence's own token. The
//! decode loop learns both parts from its own generation steps and lets a request draft only
//! where the tokens its drafts are expected to bring are worth more than they cost.

/// Weight of the older observations against a new one (about the last 50 steps count).
const FORGET: f64 = 0.98;

/// The fixed part in per-token units until the steps have told otherwise: measured with
/// llama.cpp's `llama-batched-bench` on the default model, 2-core Xeon, where one sequence's
/// step takes about 22 ms and each further sequence about 3.5 ms more (about 5.4 tokens' worth).
const PRIOR_FIXED_IN_TOKENS: f64 = 5.0;

/// Decodes faster than this (in ms) tell nothing about the cost (a fake backend's, or one whose
/// work is queued on a device).
const SHORTEST_TIMED_MS: f64 = 0.05;

/// A least-squares fit of decode time against tokens over recent generation steps, with older
/// steps weighing less (exponentially decayed sums).
#[derive(Debug, Default, Clone)]
pub(crate) struct DecodeCost {
    weight: f64,
    tokens: f64,
    ms: f64,
    tokens_sq: f64,
    tokens_ms: f64,
}

impl DecodeCost {
    /// Notes a generation step (no prompt chunk in it) of `tokens` tokens that took `ms`.
    pub(crate) fn observe(&mut self, tokens: usize, ms: f64) {
        if tokens == 0 || !ms.is_finite() || ms < SHORTEST_TIMED_MS {
            return;
        }
        let n = tokens as f64;
        self.weight = self.weight * FORGET + 1.0;
        self.tokens = self.tokens * FORGET + n;
        self.ms = self.ms * FORGET + ms;
        self.tokens_sq = self.tokens_sq * FORGET + n * n;
        self.tokens_ms = self.tokens_ms * FORGET + n * ms;
    }

    /// The fixed part of a decode in units of one token's part. From the fit where the steps
    /// varied enough in size and it makes sense (both parts positive), else the prior.
    pub(crate) fn fixed_in_tokens(&self) -> f64 {
        if self.weight < 1.0 {
            return PRIOR_FIXED_IN_TOKENS;
        }
        let (n, t) = (self.tokens / self.weight, self.ms / self.weight);
        let variance = self.tokens_sq / self.weight - n * n;
        let covariance = self.tokens_ms / self.weight - n * t;
        // Sizes within about a token of each other cannot tell the parts apart.
        if variance < 0.25 {
            return PRIOR_FIXED_IN_TOKENS;
        }
        let per_token = covariance / variance;
        let fixed = t - per_token * n;
        if per_token <= 0.0 || fixed <= 0.0 { PRIOR_FIXED_IN_TOKENS } else { fixed / per_token }
    }

    /// Whether a draft token pays in a step whose batch carries `generating` tokens before any
    /// draft (one per generating slot; a token decoded again after a rejection is counted against
    /// the acceptance instead): it costs one token's part and brings `acceptance` tokens (the share of its
    /// request's drafts that held), each worth what a token of this step costs,
    /// (fixed + generating) / generating token parts.
    pub(crate) fn drafts_pay(&self, generating: usize, acceptance: f64) -> bool {
        let b = generating.max(1) as f64;
        acceptance * (self.fixed_in_tokens() + b) > b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps of 1 to 16 tokens on a machine where a decode costs `fixed` + `per_token` per token.
    fn learned(fixed: f64, per_token: f64) -> DecodeCost {
        let mut cost = DecodeCost::default();
        for round in 0..10 {
            for n in [1, 2, 4, 8, 16] {
                cost.observe(n, fixed + per_token * n as f64 + 0.01 * round as f64);
            }
        }
        cost
    }

    #[test]
    fn the_fit_finds_the_fixed_part_in_tokens() {
        assert!((learned(20.0, 4.0).fixed_in_tokens() - 5.0).abs() < 0.1);
        assert!((learned(100.0, 1.0).fixed_in_tokens() - 100.0).abs() < 2.0, "a device: the weights dominate");
    }

    #[test]
    fn without_spread_or_with_nonsense_the_prior_holds() {
        assert_eq!(DecodeCost::default().fixed_in_tokens(), PRIOR_FIXED_IN_TOKENS);
        let mut steady = DecodeCost::default();
        (0..50).for_each(|_| steady.observe(8, 50.0));
        assert_eq!(steady.fixed_in_tokens(), PRIOR_FIXED_IN_TOKENS, "every step 8 tokens: no slope to fit");
        let mut falling = DecodeCost::default();
        (0..50).for_each(|i| falling.observe(1 + i % 8, 50.0 - (i % 8) as f64));
        assert_eq!(falling.fixed_in_tokens(), PRIOR_FIXED_IN_TOKENS, "time falling with size is noise");
        let mut instant = DecodeCost::default();
        (0..50).for_each(|i| instant.observe(1 + i % 8, 0.001));
        assert_eq!(instant.fixed_in_tokens(), PRIOR_FIXED_IN_TOKENS, "untimeable decodes are not observed");
    }

    #[test]
    fn drafts_pay_at_low_occupancy_and_not_when_the_batch_is_full() {
        let cpu = learned(20.0, 4.0);
        // Half the drafts held: worth it for 1 to 4 streams, not for 8 or 16.
        assert!(cpu.drafts_pay(1, 0.5) && cpu.drafts_pay(4, 0.5));
        assert!(!cpu.drafts_pay(8, 0.5) && !cpu.drafts_pay(16, 0.5));
        // Nearly every draft held (a rewrite): worth it at 8 streams too, not at 16 below 0.8.
        assert!(cpu.drafts_pay(8, 0.95) && !cpu.drafts_pay(16, 0.75));
        // Where the weights dominate (a GPU), drafts pay at any occupancy a server has.
        assert!(learned(100.0, 1.0).drafts_pay(16, 0.3));
        assert!(!cpu.drafts_pay(1, 0.0), "drafts that never hold never pay");
    }
}
