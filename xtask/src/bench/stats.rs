//! Summaries and the paired comparison: mean ± sample standard deviation, median, and the
//! ratio of a variant to the baseline with a bootstrap confidence interval over paired rounds.

use serde::Serialize;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub sd: f64,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn summarize(xs: &[f64]) -> Option<Summary> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n as f64;
    let sd = if n > 1 { (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt() } else { 0.0 };
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(Summary { n, mean, sd, median: median_sorted(&sorted), min: sorted[0], max: sorted[n - 1] })
}

fn median_sorted(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Faster,
    Slower,
    NoSignificantDifference,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Faster => "faster",
            Verdict::Slower => "slower",
            Verdict::NoSignificantDifference => "no significant difference",
        })
    }
}

/// A variant's speed relative to the baseline.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Ratio {
    /// mean(variant) / mean(baseline) over the paired rounds.
    pub ratio: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub pairs: usize,
    pub verdict: Verdict,
}

const RESAMPLES: usize = 4000;

/// Ratio of means over rounds in which both ran, with a 95 % percentile bootstrap interval
/// that resamples whole rounds: pairing cancels the machine's drift between rounds.
pub fn paired_ratio(variant: &[Option<f64>], baseline: &[Option<f64>]) -> Option<Ratio> {
    let pairs: Vec<(f64, f64)> = variant.iter().zip(baseline).filter_map(|(v, b)| Some(((*v)?, (*b)?))).collect();
    if pairs.len() < 2 {
        return None;
    }
    let ratio = ratio_of_sums(&pairs, 0..pairs.len());
    let (ci_low, ci_high) = percentile_interval(&bootstrap(&pairs, RESAMPLES, SEED), 0.95);
    let verdict = if ci_low > 1.0 {
        Verdict::Faster
    } else if ci_high < 1.0 {
        Verdict::Slower
    } else {
        Verdict::NoSignificantDifference
    };
    Some(Ratio { ratio, ci_low, ci_high, pairs: pairs.len(), verdict })
}

const SEED: u64 = 0x2545_F491_4F6C_DD1D;

/// sum(variant) / sum(baseline) over the rounds `idx` (with repeats, for a resample).
fn ratio_of_sums(pairs: &[(f64, f64)], idx: impl Iterator<Item = usize>) -> f64 {
    let (sv, sb) = idx.fold((0.0, 0.0), |(sv, sb), i| (sv + pairs[i].0, sb + pairs[i].1));
    sv / sb
}

/// `resamples` bootstrap ratios, sorted: each draws as many whole rounds as there are, with
/// replacement, keeping each round's pair together.
fn bootstrap(pairs: &[(f64, f64)], resamples: usize, seed: u64) -> Vec<f64> {
    let mut rng = XorShift(seed);
    let n = pairs.len();
    let mut boots: Vec<f64> = (0..resamples).map(|_| ratio_of_sums(pairs, (0..n).map(|_| (rng.next() % n as u64) as usize))).collect();
    boots.sort_by(f64::total_cmp);
    boots
}

/// The central `level` interval of sorted values: the values at ranks floor(n·a) and
/// ceil(n·(1-a)) - 1, a = (1 - level) / 2 (for 4000 values at 95 %: ranks 100 and 3899, so that
/// 100 values lie below and 100 above).
fn percentile_interval(sorted: &[f64], level: f64) -> (f64, f64) {
    let n = sorted.len();
    let tail = (1.0 - level) / 2.0;
    let lo = ((n as f64 * tail).floor() as usize).min(n - 1);
    let hi = ((n as f64 * (1.0 - tail)).ceil() as usize).saturating_sub(1).clamp(lo, n - 1);
    (sorted[lo], sorted[hi])
}

/// A fixed-seed generator: the same samples always give the same interval.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_known_values() {
        let s = summarize(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
        assert_eq!((s.n, s.mean, s.median, s.min, s.max), (8, 5.0, 4.5, 2.0, 9.0));
        assert!((s.sd - 2.138).abs() < 1e-3, "{}", s.sd);
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn a_clear_speedup_is_faster_and_noise_is_not_significant() {
        let base: Vec<Option<f64>> = [60.0, 58.0, 62.0, 59.0, 61.0, 57.0].map(Some).to_vec();
        let fast: Vec<Option<f64>> = base.iter().map(|b| b.map(|x| x * 1.10)).collect();
        let r = paired_ratio(&fast, &base).unwrap();
        assert!((r.ratio - 1.10).abs() < 1e-9);
        assert_eq!(r.verdict, Verdict::Faster);
        assert!(r.ci_low <= 1.10 && r.ci_high >= 1.10);

        let noisy: Vec<Option<f64>> = [61.0, 57.0, 63.0, 58.0, 60.0, 58.0].map(Some).to_vec();
        assert_eq!(paired_ratio(&noisy, &base).unwrap().verdict, Verdict::NoSignificantDifference);
        let slow: Vec<Option<f64>> = base.iter().map(|b| b.map(|x| x * 0.9)).collect();
        assert_eq!(paired_ratio(&slow, &base).unwrap().verdict, Verdict::Slower);
    }

    /// Deterministic noise for the fixtures below (uniform in [-1, 1)).
    fn noise(rng: &mut XorShift) -> f64 {
        (rng.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    /// Rounds that drift together (the machine's load) with a little noise of each side's own,
    /// the variant `true_ratio` times the baseline on average.
    fn drifting_rounds(n: usize, true_ratio: f64, seed: u64) -> Vec<(f64, f64)> {
        let mut rng = XorShift(seed);
        (0..n)
            .map(|_| {
                let load = 60.0 * (1.0 + 0.15 * noise(&mut rng));
                (true_ratio * load * (1.0 + 0.02 * noise(&mut rng)), load * (1.0 + 0.02 * noise(&mut rng)))
            })
            .collect()
    }

    #[test]
    fn interval_ranks_at_the_edges() {
        let sorted: Vec<f64> = (0..4000).map(f64::from).collect();
        assert_eq!(percentile_interval(&sorted, 0.95), (100.0, 3899.0));
        let forty: Vec<f64> = (0..40).map(f64::from).collect();
        assert_eq!(percentile_interval(&forty, 0.95), (1.0, 38.0));
        assert_eq!(percentile_interval(&forty, 0.5), (10.0, 29.0));
        // Tiny inputs stay in bounds and ordered.
        assert_eq!(percentile_interval(&[7.0], 0.95), (7.0, 7.0));
        assert_eq!(percentile_interval(&[1.0, 2.0], 0.95), (1.0, 2.0));
    }

    #[test]
    fn the_interval_matches_the_delta_method_for_many_rounds() {
        // For n paired rounds the ratio of sums R = Σv/Σb is asymptotically normal with
        // sd = sqrt(Var(v - R·b) / n) / mean(b); the bootstrap interval must agree with
        // R ± 1.96·sd. Drift common to both sides cancels in v - R·b: an interval that forgot
        // the pairing (resampling the sides independently) would be about 7 times wider here.
        let pairs = drifting_rounds(400, 1.05, 7);
        let n = pairs.len() as f64;
        let r = ratio_of_sums(&pairs, 0..pairs.len());
        let mean_b = pairs.iter().map(|p| p.1).sum::<f64>() / n;
        let resid: Vec<f64> = pairs.iter().map(|(v, b)| v - r * b).collect();
        let mean_resid = resid.iter().sum::<f64>() / n;
        let var = resid.iter().map(|e| (e - mean_resid).powi(2)).sum::<f64>() / (n - 1.0);
        let sd = (var / n).sqrt() / mean_b;
        let (lo, hi) = percentile_interval(&bootstrap(&pairs, RESAMPLES, SEED), 0.95);
        let (want_lo, want_hi) = (r - 1.96 * sd, r + 1.96 * sd);
        let half = 1.96 * sd;
        assert!(
            (lo - want_lo).abs() < 0.15 * half && (hi - want_hi).abs() < 0.15 * half,
            "bootstrap [{lo}, {hi}], delta method [{want_lo}, {want_hi}]"
        );
    }

    #[test]
    fn the_interval_covers_the_true_ratio_about_95_times_in_100() {
        // 400 synthetic comparisons of 10 rounds with a known ratio: a percentile bootstrap of
        // 10 rounds under-covers a little (about 90-93 %); a broken one covers far less (zero
        // width, unpaired rounds mixed up) or always (an interval of everything).
        let runs = 400;
        let covered = (0..runs)
            .filter(|&k| {
                let pairs = drifting_rounds(10, 1.05, 1000 + k);
                let (lo, hi) = percentile_interval(&bootstrap(&pairs, 1000, SEED ^ k), 0.95);
                lo <= 1.05 && 1.05 <= hi
            })
            .count();
        let rate = covered as f64 / runs as f64;
        assert!((0.85..=0.99).contains(&rate), "coverage {rate}");
    }

    #[test]
    fn rounds_missing_either_side_are_left_out() {
        let v = [Some(10.0), None, Some(10.0), Some(10.0)];
        let b = [Some(5.0), Some(5.0), None, Some(5.0)];
        let r = paired_ratio(&v, &b).unwrap();
        assert_eq!(r.pairs, 2);
        assert_eq!(r.ratio, 2.0);
        assert!(paired_ratio(&[Some(1.0)], &[Some(1.0)]).is_none());
    }
}
