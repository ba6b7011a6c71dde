//! Stop sequences over streamed text: text that could still turn into a stop sequence is held
//! back until it cannot, so a stop sequence never reaches the caller, even split over tokens.

/// Bytes reserved up front for one token's text (the longest piece in common vocabularies is
/// well under this): the generation loop's buffers and the stop matcher's are sized with it.
pub(crate) const TOKEN_TEXT_CAPACITY: usize = 256;

/// Whether a stop sequence ended the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopScan {
    /// No stop sequence yet; keep going.
    Continue,
    /// A stop sequence was found; what came before it has been emitted.
    Stop,
}

/// Holds back streamed text that could still become a stop sequence. Text moves through one
/// buffer that keeps its allocation, so the per-token path allocates nothing.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        // What is held is at most a stop sequence plus one token's text.
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        let capacity = if longest == 0 { 0 } else { longest + TOKEN_TEXT_CAPACITY };
        StopMatcher { stops: stops.to_vec(), held: String::with_capacity(capacity) }
    }

    /// Adds decoded text and appends to `out` what may be emitted.
    pub fn push(&mut self, text: &str, out: &mut String) -> StopScan {
        if self.stops.is_empty() {
            out.push_str(text);
            return StopScan::Continue;
        }
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            out.push_str(&self.held[..at]);
            self.held.clear();
            return StopScan::Stop;
        }
        // Hold back the longest tail that is a prefix of some stop sequence.
        let keep = self.stops.iter().map(|s| longest_suffix_prefix(&self.held, s)).max().unwrap_or(0);
        let emit_to = self.held.len() - keep;
        out.push_str(&self.held[..emit_to]);
        self.held.drain(..emit_to);
        StopScan::Continue
    }

    /// The end of generation for another reason: whatever was held back is text after all.
    pub fn flush(&mut self, out: &mut String) {
        out.push_str(&self.held);
        self.held.clear();
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on char boundaries.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max).rev().find(|&n| text.is_char_boundary(text.len() - n) && stop.is_char_boundary(n) && text.ends_with(&stop[..n])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            if m.push(p, &mut out) == StopScan::Stop {
                return (out, true);
            }
        }
        m.flush(&mut out);
        (out, false)
    }

    #[test]
    fn what_is_emitted_leaves_as_soon_as_it_cannot_start_a_stop() {
        let mut m = StopMatcher::new(&["</s>".to_string()]);
        let mut out = String::new();
        assert_eq!(m.push("ab<", &mut out), StopScan::Continue);
        assert_eq!(out, "ab");
        assert_eq!(m.push("x", &mut out), StopScan::Continue);
        assert_eq!(out, "ab<x");
    }

    #[test]
    fn a_stop_split_across_pieces_is_caught_and_not_emitted() {
        assert_eq!(run(&["</end>"], &["hello </", "en", "d> more"]), ("hello ".into(), true));
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn held_text_is_released_when_it_cannot_be_a_stop() {
        assert_eq!(run(&["STOP"], &["ST", "ART"]), ("START".into(), false));
        assert_eq!(run(&["STOP"], &["abc ST"]), ("abc ST".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_is_safe() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
        assert_eq!(run(&["日本"], &["こんにちは日", "本語"]), ("こんにちは".into(), true));
        assert_eq!(run(&["é!"], &["caf", "é"]), ("café".into(), false));
        assert_eq!(run(&[], &["plain"]), ("plain".into(), false));
    }
}
