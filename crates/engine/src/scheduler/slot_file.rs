//! The token list a slot state file holds beside the cache, laid out as llama-server writes it,
//! so that either server restores the other's files: a marker (`LLAMA_TOKEN_NULL`), a format
//! version, the token count and the tokens, then the count of media chunks (none for text).
//! llama-server's older files, and llama.cpp's own sequence files, hold the plain token list:
//! read as well.

use crate::token::TokenId;

/// `LLAMA_TOKEN_NULL`, which no plain token list starts with.
const MARKER: TokenId = -1;
/// llama-server's `SERVER_TOKENS_STATE_VERSION`.
const VERSION: u32 = 1;
/// Words around the tokens: the marker, the version and the count before, the media count after.
pub(crate) const OVERHEAD: usize = 4;

/// The list to save with a cache holding `tokens`.
pub(crate) fn pack(tokens: &[TokenId]) -> Vec<TokenId> {
    let mut packed = Vec::with_capacity(tokens.len() + OVERHEAD);
    packed.push(MARKER);
    packed.push(VERSION as TokenId);
    packed.push(tokens.len() as TokenId);
    packed.extend_from_slice(tokens);
    packed.push(0);
    packed
}

/// The tokens of a list read from a file, packed or plain; why not, for a list this server cannot
/// use.
pub(crate) fn unpack(mut list: Vec<TokenId>) -> Result<Vec<TokenId>, String> {
    if list.first() != Some(&MARKER) {
        return Ok(list);
    }
    let word = |i: usize| list.get(i).map(|&w| w as u32);
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

    #[test]
    fn packed_lists_read_back_and_plain_ones_are_taken_as_they_are() {
        for tokens in [vec![], vec![2, 651, 6037], (0..300).collect::<Vec<_>>()] {
            let packed = pack(&tokens);
            assert_eq!(packed.len(), tokens.len() + OVERHEAD);
            assert_eq!(unpack(packed).unwrap(), tokens);
        }
        assert_eq!(unpack(vec![2, 651, 6037]).unwrap(), vec![2, 651, 6037]);
        assert_eq!(unpack(vec![]).unwrap(), Vec::<TokenId>::new());
    }

    #[test]
    fn a_damaged_or_unknown_packed_list_is_refused_with_the_reason() {
        let cases: [(Vec<TokenId>, &str); 6] = [
            (vec![-1], "ends after the marker"),
            (vec![-1, 2, 0, 0], "version 2"),
            (vec![-1, 1], "before its count"),
            (vec![-1, 1, 5, 7, 8], "shorter than its count"),
            (vec![-1, 1, 1, 7, 1, 0, 0], "images or audio"),
            (vec![-1, 1, 1, 7, 0, 9], "data after its end"),
        ];
        for (list, why) in cases {
            let e = unpack(list.clone()).unwrap_err();
            assert!(e.contains(why), "{list:?}: {e}");
        }
        // A count so large that the end overflows is refused, not a panic.
        assert!(unpack(vec![-1, 1, -1, 0]).is_err());
    }
}
