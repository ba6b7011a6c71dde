// A Context may move to another thread, but not be shared between two at once.
fn shared<T: Sync>(_: &T) {}

fn check(ctx: &llama::Context<'_>) {
    shared(ctx);
}

fn main() {}
