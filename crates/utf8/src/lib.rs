//! Streaming UTF-8: token pieces are bytes, and a character may span two or more tokens.

#![warn(missing_docs)]

/// Turns a stream of byte pieces into text without ever splitting a character: an incomplete
/// sequence at the end of a piece waits for the next one. Invalid bytes become U+FFFD, as in
/// `String::from_utf8_lossy`, so the output is always valid and nothing is silently dropped.
#[derive(Clone, Debug, Default)]
pub struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the text completed by `bytes` to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut String) {
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    // SAFETY: from_utf8 just validated pending[start..valid].
                    out.push_str(unsafe { std::str::from_utf8_unchecked(&self.pending[start..valid]) });
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + bad;
                        }
                        // An incomplete character at the end: keep it for the next piece.
                        None => {
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Ends the stream: an incomplete character left over becomes U+FFFD.
    pub fn finish(&mut self, out: &mut String) {
        if !self.pending.is_empty() {
            out.push_str(&String::from_utf8_lossy(&self.pending));
            self.pending.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(pieces: &[&[u8]]) -> Vec<String> {
        let mut d = Utf8Decoder::new();
        let mut outs = Vec::new();
        for p in pieces {
            let mut s = String::new();
            d.push(p, &mut s);
            outs.push(s);
        }
        let mut s = String::new();
        d.finish(&mut s);
        outs.push(s);
        outs
    }

    #[test]
    fn a_character_split_across_pieces_comes_out_whole() {
        let emoji = "🦀".as_bytes(); // 4 bytes
        assert_eq!(feed(&[&emoji[..1], &emoji[1..3], &emoji[3..]]), ["", "", "🦀", ""]);
        let cjk = "日本".as_bytes();
        assert_eq!(feed(&[&cjk[..2], &cjk[2..4], &cjk[4..]]), ["", "日", "本", ""]);
    }

    #[test]
    fn invalid_bytes_become_replacement_characters_and_the_rest_survives() {
        assert_eq!(feed(&[b"a\xffb"]), ["a\u{fffd}b", ""]);
        assert_eq!(feed(&[b"ok\xe6\x97"]), ["ok", "\u{fffd}"]);
    }

    #[test]
    fn every_split_of_a_mixed_string_reassembles_exactly() {
        let text = "héllo 🦀 日本語 ok";
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            let outs = feed(&[&bytes[..cut], &bytes[cut..]]);
            assert_eq!(outs.concat(), text, "cut at {cut}");
        }
    }
}
