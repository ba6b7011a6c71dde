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
    let ratio_of = |idx: &mut dyn Iterator<Item = usize>| {
        let (sv, sb) = idx.fold((0.0, 0.0), |(sv, sb), i| (sv + pairs[i].0, sb + pairs[i].1));
        sv / sb
    };
    let ratio = ratio_of(&mut (0..pairs.len()));
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    let mut boots: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let n = pairs.len();
            ratio_of(&mut (0..n).map(|_| (rng.next() % n as u64) as usize))
        })
        .collect();
    boots.sort_by(f64::total_cmp);
    let ci_low = boots[(RESAMPLES as f64 * 0.025) as usize];
    let ci_high = boots[(RESAMPLES as f64 * 0.975) as usize - 1];
    let verdict = if ci_low > 1.0 {
        Verdict::Faster
    } else if ci_high < 1.0 {
        Verdict::Slower
    } else {
        Verdict::NoSignificantDifference
    };
    Some(Ratio { ratio, ci_low, ci_high, pairs: pairs.len(), verdict })
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
