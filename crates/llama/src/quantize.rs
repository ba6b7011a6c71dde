//! Quantizing a model file to another type.

use std::path::Path;

use crate::error::QuantizeError;
use crate::{backend, gguf, sys};

/// Target types for [`quantize`] (llama.cpp's `llama_ftype`s most used).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantType {
    /// 16-bit floats.
    F16,
    /// 8-bit blocks.
    Q8_0,
    /// 6-bit k-quants.
    Q6K,
    /// 5-bit k-quants, medium mix.
    Q5KM,
    /// 4-bit k-quants, medium mix (the default model's type).
    Q4KM,
    /// 4-bit blocks.
    Q4_0,
}

impl QuantType {
    fn ftype(self) -> sys::llama_ftype {
        match self {
            QuantType::F16 => sys::LLAMA_FTYPE_MOSTLY_F16,
            QuantType::Q8_0 => sys::LLAMA_FTYPE_MOSTLY_Q8_0,
            QuantType::Q6K => sys::LLAMA_FTYPE_MOSTLY_Q6_K,
            QuantType::Q5KM => sys::LLAMA_FTYPE_MOSTLY_Q5_K_M,
            QuantType::Q4KM => sys::LLAMA_FTYPE_MOSTLY_Q4_K_M,
            QuantType::Q4_0 => sys::LLAMA_FTYPE_MOSTLY_Q4_0,
        }
    }
}

/// Whether [`quantize`] takes an input whose tensors are already quantized
/// ([`QuantizeOptions::requantize`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Requantize {
    /// Fail ([`QuantizeError::Llama`]) at the first quantized tensor of the input that would
    /// change type (llama.cpp's default); a tensor already of its target type is copied either
    /// way.
    #[default]
    Refuse,
    /// Dequantize such tensors and quantize them again: the losses add up, so the result is worse
    /// than the same type made from the original F16 or F32 model.
    Allow,
}

/// What [`quantize`] writes and how: `QuantizeOptions::new(QuantType::Q8_0).threads(4)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuantizeOptions {
    /// The type the model is quantized to.
    pub ty: QuantType,
    /// Threads that quantize. 0 (the default) leaves the choice to llama.cpp, which then takes
    /// `std::thread::hardware_concurrency()`: every hardware thread of the machine, whatever this
    /// process' CPU affinity or a container's CPU quota allows. Counts above `i32::MAX` are
    /// taken as `i32::MAX`.
    pub threads: usize,
    /// Whether an input that is already quantized is accepted ([`Requantize::Refuse`] by
    /// default).
    pub requantize: Requantize,
}

impl QuantizeOptions {
    /// Quantizing to `ty`, with llama.cpp's thread count and no requantizing.
    pub fn new(ty: QuantType) -> Self {
        QuantizeOptions { ty, threads: 0, requantize: Requantize::Refuse }
    }

    /// Sets [`QuantizeOptions::ty`].
    #[must_use]
    pub fn ty(mut self, ty: QuantType) -> Self {
        self.ty = ty;
        self
    }

    /// Sets [`QuantizeOptions::threads`] (0: llama.cpp's default).
    #[must_use]
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Sets [`QuantizeOptions::requantize`].
    #[must_use]
    pub fn requantize(mut self, requantize: Requantize) -> Self {
        self.requantize = requantize;
        self
    }
}

/// Writes `input` quantized as `options` say to `output`.
///
/// llama.cpp writes the file as it goes; the model is written beside `output` and moved into
/// place when complete, so a failure leaves no partial model behind and an earlier file at
/// `output` as it was.
pub fn quantize(input: &Path, output: &Path, options: &QuantizeOptions) -> Result<(), QuantizeError> {
    backend::init();
    gguf::check(input).map_err(|e| QuantizeError::Input(Box::new(e)))?;
    if same_file(input, output) {
        return Err(QuantizeError::SameFile { output: output.to_path_buf() });
    }
    let c_in = crate::c_string::path(input).ok_or_else(|| QuantizeError::InvalidPath(input.to_path_buf()))?;
    let partial = partial_path(output);
    let c_out = crate::c_string::path(&partial).ok_or_else(|| QuantizeError::InvalidPath(output.to_path_buf()))?;
    // SAFETY: returns a struct by value.
    let mut params = unsafe { sys::llama_model_quantize_default_params() };
    // llama.cpp takes a count <= 0 as "its default".
    params.nthread = i32::try_from(options.threads).unwrap_or(i32::MAX);
    params.ftype = options.ty.ftype();
    params.allow_requantize = options.requantize == Requantize::Allow;
    // SAFETY: both paths NUL-terminated; params lives across the call.
    let (code, messages) = backend::capture(|| unsafe { sys::llama_model_quantize(c_in.as_ptr(), c_out.as_ptr(), &params) });
    if code != 0 {
        // Nothing to keep; it may not exist when llama.cpp failed before opening it.
        let _ = std::fs::remove_file(&partial);
        return Err(QuantizeError::Llama { input: input.to_path_buf(), output: output.to_path_buf(), messages });
    }
    std::fs::rename(&partial, output).map_err(|source| {
        let _ = std::fs::remove_file(&partial);
        QuantizeError::Rename { partial: partial.clone(), output: output.to_path_buf(), source }
    })
}

/// A file in the output's folder (a rename within one filesystem is atomic), named after it and
/// this process.
fn partial_path(output: &Path) -> std::path::PathBuf {
    let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".partial-{}", std::process::id()));
    output.with_file_name(name)
}

/// Whether `output` names `input`'s file, directly, through links, or by another spelling. The
/// output need not exist: its folder is resolved instead.
fn same_file(input: &Path, output: &Path) -> bool {
    let Ok(input) = input.canonicalize() else { return false };
    if let Ok(output) = output.canonicalize() {
        return output == input;
    }
    let (Some(dir), Some(name)) = (output.parent(), output.file_name()) else { return false };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    dir.canonicalize().is_ok_and(|d| d.join(name) == input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_setter_sets_its_own_field() {
        let built = QuantizeOptions::new(QuantType::F16).ty(QuantType::Q4_0).threads(3).requantize(Requantize::Allow);
        assert_eq!(built, QuantizeOptions { ty: QuantType::Q4_0, threads: 3, requantize: Requantize::Allow });
        assert_eq!(QuantizeOptions::new(QuantType::Q8_0), QuantizeOptions { ty: QuantType::Q8_0, threads: 0, requantize: Requantize::Refuse });
    }
}
