//! The misuses that lifetimes and auto traits rule out, proven by compile failures.

#[test]
fn misuse_does_not_compile() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
