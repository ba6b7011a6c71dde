//! Quantizes a GGUF: `cargo run -p exsa-llama --example quantize -- IN OUT [TYPE] [--allow-requantize]`,
//! TYPE one of f16, q8_0, q6_k, q5_k_m, q4_k_m (default), q4_0. `--allow-requantize` accepts an
//! input that is already quantized (the AMX measurements requantize the default Q4_K_M model to
//! Q8_0 and Q4_0). `cargo xtask synth-models` uses it for the LFM2-1.2B-shaped speed model.

use std::path::PathBuf;

use llama::{QuantType, QuantizeOptions, Requantize};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (flags, args): (Vec<_>, Vec<_>) = std::env::args_os().skip(1).partition(|a| a.to_string_lossy().starts_with("--"));
    let usage = "usage: quantize IN OUT [f16|q8_0|q6_k|q5_k_m|q4_k_m|q4_0] [--allow-requantize]";
    let mut requantize = Requantize::Refuse;
    for flag in &flags {
        match flag.to_str() {
            Some("--allow-requantize") => requantize = Requantize::Allow,
            _ => return Err(format!("unknown option {flag:?}; {usage}").into()),
        }
    }
    let mut args = args.into_iter();
    let input = PathBuf::from(args.next().ok_or(usage)?);
    let output = PathBuf::from(args.next().ok_or(usage)?);
    let ty = match args.next().map(|t| t.to_string_lossy().to_ascii_lowercase()).as_deref() {
        None | Some("q4_k_m") => QuantType::Q4KM,
        Some("f16") => QuantType::F16,
        Some("q8_0") => QuantType::Q8_0,
        Some("q6_k") => QuantType::Q6K,
        Some("q5_k_m") => QuantType::Q5KM,
        Some("q4_0") => QuantType::Q4_0,
        Some(other) => return Err(format!("unknown type {other:?}; {usage}").into()),
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    llama::quantize(&input, &output, &QuantizeOptions::new(ty).threads(threads).requantize(requantize))?;
    println!("{}", output.display());
    Ok(())
}
