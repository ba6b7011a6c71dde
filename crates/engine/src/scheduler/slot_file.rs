//! The token list a slot state file holds beside the cache, laid out as llama-server writes it,
//! so that either server restores the other's files: a marker (`LLAMA_TOKEN_NULL`), a format
//! version, the token count and the tokens, then the count of media chunks (none for text).
//! llama-server's older files, and llama.cpp's own sequence files, hold the plain token list:
//! read as well.

use crate::token::Token;

/// `LLAMA_TOKEN_NULL`, which no plain token list starts with.
const MARKER: Token = Token(-1);
/// llama-server's `SERVER_TOKENS_STATE_VERSION`.
const VERSION: u32 = 1;
/// Words around the tokens: the marker, the version and the count before, the media count after.
pub(crate) const OVERHEAD: usize = 4;

/// The list to save with a cache holding `tokens`.
pub(crate) fn pack(tokens: &[Token]) -> Vec<Token> {
    let mut packed = Vec::with_capacity(tokens.len() + OVERHEAD);
    packed.push(MARKER);
    packed.push(Token(VERSION as i32));
    packed.push(Token(tokens.len() as i32));
    packed.extend_from_slice(tokens);
    packed.push(Token(0));
    packed
}

/// The tokens of a list read from a file, packed or plain; why not, for a list this server cannot
/// use.
pub(crate) fn unpack(mut list: Vec<Token>) -> Result<Vec<Token>, String> {
    if list.first() != Some(&MARKER) {
        return Ok(list);
    }
    let word = |i: usize| list.get(i).map(|&w| w.0 as u32);
    match word(1) {
        Some(VERSION) => {}
        Some(v) => return Err(format!("its token list is in version {v} of llama-server's layout; this server reads version {VERSION}")),
        None => return Err("its token list ends after the marker".into()),
    }
    let count = word(2).ok_or("its token list ends before its count")? as usize;
    let end = 3usize.checked_add(count).filter(|&end| end < list.len()).ok_or("its token list is shorter than its count")?;
    match word(end) {
        Some(0) if list.len() == end + 1 => {}
        Some(0) => return Err("its token list has data after its end".into()),
        _ => return Err("it holds images or audio (a multimodal model's slot), which this server does not serve".into()),
    }
    list.truncate(end);
    list.drain(..3);
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(ids: &[i32]) -> Vec<Token> {
        ids.iter().copied().map(Token).collect()
    }

    #[test]
    fn packed_lists_read_back_and_plain_ones_are_taken_as_they_are() {
        for tokens in [vec![], toks(&[2, 651, 6037]), (0..300).map(Token).collect::<Vec<_>>()] {
            let packed = pack(&tokens);
            assert_eq!(packed.len(), tokens.len() + OVERHEAD);
            assert_eq!(unpack(packed).unwrap(), tokens);
        }
        assert_eq!(unpack(toks(&[2, 651, 6037])).unwrap(), toks(&[2, 651, 6037]));
        assert_eq!(unpack(vec![]).unwrap(), Vec::<Token>::new());
    }

    #[test]
    fn a_damaged_or_unknown_packed_list_is_refused_with_the_reason() {
        let cases: [(Vec<Token>, &str); 6] = [
            (toks(&[-1]), "ends after the marker"),
            (toks(&[-1, 2, 0, 0]), "version 2"),
            (toks(&[-1, 1]), "before its count"),
            (toks(&[-1, 1, 5, 7, 8]), "shorter than its count"),
            (toks(&[-1, 1, 1, 7, 1, 0, 0]), "images or audio"),
            (toks(&[-1, 1, 1, 7, 0, 9]), "data after its end"),
        ];
        for (list, why) in cases {
            let e = unpack(list.clone()).unwrap_err();
            assert!(e.contains(why), "{list:?}: {e}");
        }
        // A count so large that the end overflows is refused, not a panic.
        assert!(unpack(toks(&[-1, 1, -1, 0])).is_err());
    }
}
