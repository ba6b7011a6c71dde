// Logits borrow the context: the next decode, which overwrites them, cannot run while they live.
use llama::{Batch, Context};

fn step(ctx: &mut Context<'_>, batch: &Batch) {
    let logits = ctx.last_logits().unwrap();
    ctx.decode(batch).unwrap();
    println!("{}", logits[0]);
}

fn main() {}
