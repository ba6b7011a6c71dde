//! A GGUF header check in Rust, run before llama.cpp sees the file, so a bad file gets an error
//! that says what is wrong with it (llama.cpp answers all of them with a null pointer).
//!
//! It reads the header only: magic, version, key/value pairs, tensor infos. From the tensor
//! infos it computes the size the file must have, which is how truncation is caught.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// The longest string the header check reads into memory (GGUF keys are far shorter).
const MAX_STRING: u64 = 1 << 20;

use crate::error::{LoadError, LoadErrorKind};
use crate::sys;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
// Counts beyond these are corruption, not a large model: real files have a few hundred keys,
// tens of thousands of tensors and vocabularies of a few hundred thousand entries. Smaller
// counts that run past the end of the file are reported as truncation.
const MAX_KV: u64 = 1 << 20;
const MAX_TENSORS: u64 = 1 << 24;
const MAX_ARRAY_LEN: u64 = 1 << 32;
const MAX_DIMS: u32 = 4;

/// What the header says, for callers that want it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufSummary {
    /// GGUF format version (2 or 3).
    pub version: u32,
    /// Tensors in the file.
    pub n_tensors: u64,
    /// Metadata key/value pairs.
    pub n_kv: u64,
    /// The file size the tensor infos require.
    pub expected_size: u64,
}

/// Checks `path` is a complete, well-formed GGUF file as far as its header can tell.
pub fn check(path: &Path) -> Result<GgufSummary, LoadError> {
    // Named for what it is, before the system's "invalid input" for the NUL could hide it.
    if crate::c_string::path(path).is_none() {
        return Err(LoadError::new(path, LoadErrorKind::InvalidPath));
    }
    let file = File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => LoadError::new(path, LoadErrorKind::NotFound),
        _ => LoadError::new(path, LoadErrorKind::Io(source)),
    })?;
    let size = file.metadata().map_err(|source| LoadError::new(path, LoadErrorKind::Io(source)))?.len();
    let mut r = Reader { inner: BufReader::with_capacity(1 << 16, file), pos: 0, size, path };

    let magic = r.bytes(4, "the magic bytes").map_err(|e| match e.kind {
        LoadErrorKind::TruncatedHeader { .. } => LoadError::new(path, LoadErrorKind::NotGguf { magic: Vec::new() }),
        _ => e,
    })?;
    if magic != MAGIC {
        return Err(LoadError::new(path, LoadErrorKind::NotGguf { magic }));
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(LoadError::new(path, LoadErrorKind::UnsupportedVersion { version }));
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.u64("the key/value count")?;
    if n_kv > MAX_KV || n_tensors > MAX_TENSORS {
        return Err(r.corrupt(format!(
            "it claims {n_kv} key/value pairs and {n_tensors} tensors, more than any model has (at most {MAX_KV} and {MAX_TENSORS})"
        )));
    }

    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..n_kv {
        let key = r.string(&format!("the key of pair {i}"))?;
        let ty = r.u32(&format!("the type of {key}"))?;
        if key == "general.alignment" {
            if ty != 4 {
                return Err(r.corrupt(format!("general.alignment has type {ty}, not uint32")));
            }
            let a = u64::from(r.u32("general.alignment")?);
            if a == 0 || !a.is_power_of_two() {
                return Err(r.corrupt(format!("general.alignment is {a}, not a power of two")));
            }
            alignment = a;
        } else {
            r.skip_value(ty, &key, 0)?;
        }
    }

    let mut data_size = 0u64;
    for i in 0..n_tensors {
        let name = r.string(&format!("the name of tensor {i}"))?;
        let n_dims = r.u32(&format!("the rank of {name}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(r.corrupt(format!("tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")));
        }
        let mut ne = [1u64; 4];
        for d in ne.iter_mut().take(n_dims as usize) {
            *d = r.u64(&format!("the shape of {name}"))?;
        }
        let ty = r.u32(&format!("the type of {name}"))?;
        let offset = r.u64(&format!("the offset of {name}"))?;
        let bytes = tensor_bytes(ty, &ne).ok_or_else(|| r.corrupt(format!("tensor {name} has type {ty} or shape {ne:?} that no file can hold")))?;
        if let Some(kernel) = F32_ONLY.iter().find(|k| name.ends_with(*k)).filter(|_| ty != sys::GGML_TYPE_F32) {
            return Err(r.corrupt(format!("tensor {name} has ggml type {ty}, but ggml reads a {kernel} as F32 only (its ssm_conv aborts otherwise)")));
        }
        if !offset.is_multiple_of(alignment) {
            return Err(r.corrupt(format!("tensor {name} starts at offset {offset}, not a multiple of {alignment}")));
        }
        let end = offset.checked_add(bytes).ok_or_else(|| r.corrupt(format!("tensor {name} ends past 2^64")))?;
        data_size = data_size.max(end);
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    let expected_size = data_start + data_size;
    if size < expected_size {
        return Err(LoadError::new(path, LoadErrorKind::Truncated { expected: expected_size, actual: size }));
    }
    Ok(GgufSummary { version, n_tensors, n_kv, expected_size })
}

/// Weights that the pinned ggml reads as F32 whatever the file says: the convolution kernels of
/// recurrent blocks (`ssm_conv` asserts F32). llama.cpp's loader takes other types for them and
/// the first decode then aborts; converters always write them as F32.
const F32_ONLY: [&str; 2] = ["ssm_conv1d.weight", "shortconv.conv.weight"];

/// Bytes of a tensor of ggml type `ty` and shape `ne`, or None for an unknown type, a row that
/// is not a whole number of blocks, or an overflow.
fn tensor_bytes(ty: u32, ne: &[u64; 4]) -> Option<u64> {
    if ty >= sys::GGML_TYPE_COUNT {
        return None;
    }
    // SAFETY: pure table look-ups, valid for any type id below GGML_TYPE_COUNT.
    let (type_size, block) = unsafe { (sys::ggml_type_size(ty) as u64, sys::ggml_blck_size(ty) as u64) };
    if type_size == 0 || block == 0 || !ne[0].is_multiple_of(block) {
        return None;
    }
    let row = (ne[0] / block).checked_mul(type_size)?;
    row.checked_mul(ne[1])?.checked_mul(ne[2])?.checked_mul(ne[3])
}

struct Reader<'p> {
    inner: BufReader<File>,
    pos: u64,
    size: u64,
    path: &'p Path,
}

impl Reader<'_> {
    fn corrupt(&self, detail: String) -> LoadError {
        LoadError::new(self.path, LoadErrorKind::CorruptHeader { detail: format!("{detail} (at byte {})", self.pos) })
    }

    fn need(&self, n: u64, what: &str) -> Result<(), LoadError> {
        if self.pos.checked_add(n).is_none_or(|end| end > self.size) {
            return Err(LoadError::new(self.path, LoadErrorKind::TruncatedHeader { actual: self.size, what: what.to_string() }));
        }
        Ok(())
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>, LoadError> {
        self.need(n, what)?;
        let mut buf = vec![0u8; n as usize];
        self.inner.read_exact(&mut buf).map_err(|source| LoadError::new(self.path, LoadErrorKind::Io(source)))?;
        self.pos += n;
        Ok(buf)
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), LoadError> {
        self.need(n, what)?;
        let copied = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|source| LoadError::new(self.path, LoadErrorKind::Io(source)))?;
        self.pos += copied;
        Ok(())
    }

    fn u32(&mut self, what: &str) -> Result<u32, LoadError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: &str) -> Result<u64, LoadError> {
        let b = self.bytes(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn string(&mut self, what: &str) -> Result<String, LoadError> {
        let len = self.u64(what)?;
        // The strings read (keys, the architecture) are short; a corrupt length must not make
        // the check allocate up to the file's size.
        if len > MAX_STRING || len > self.size {
            return Err(self.corrupt(format!("{what} claims a length of {len} bytes")));
        }
        let b = self.bytes(len, what)?;
        String::from_utf8(b).map_err(|_| self.corrupt(format!("{what} is not UTF-8")))
    }

    /// Skips one value of GGUF type `ty`; arrays recurse once (GGUF forbids deeper nesting).
    fn skip_value(&mut self, ty: u32, key: &str, depth: u32) -> Result<(), LoadError> {
        let fixed = match ty {
            0 | 1 | 7 => Some(1), // u8, i8, bool
            2 | 3 => Some(2),     // u16, i16
            4..=6 => Some(4),     // u32, i32, f32
            10..=12 => Some(8),   // u64, i64, f64
            _ => None,
        };
        if let Some(n) = fixed {
            return self.skip(n, key);
        }
        match ty {
            8 => {
                let len = self.u64(key)?;
                self.skip(len, key)
            }
            9 if depth == 0 => {
                let elem = self.u32(key)?;
                let count = self.u64(key)?;
                let elem_size = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 | 9 => 0,
                    other => return Err(self.corrupt(format!("{key} is an array of unknown type {other}"))),
                };
                if elem_size > 0 {
                    let total = count.checked_mul(elem_size).ok_or_else(|| self.corrupt(format!("{key} claims {count} elements")))?;
                    return self.skip(total, key);
                }
                if count > MAX_ARRAY_LEN {
                    return Err(self.corrupt(format!("{key} claims {count} elements, more than any model has")));
                }
                for _ in 0..count {
                    self.skip_value(elem, key, depth + 1)?;
                }
                Ok(())
            }
            other => Err(self.corrupt(format!("{key} has unknown value type {other}"))),
        }
    }
}
