//! What the engine says about the loaded model and about its own build, the same for every
//! backend.

/// A loaded model's file, architecture, size and shape ([`Engine::model_info`](crate::Engine::model_info)).
///
/// Serialized with these field names by `exsa info` and the server's `/props`-style answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ModelInfo {
    /// The model file's path, as given.
    pub path: String,
    /// A one-line description of the model: llama.cpp's model description (architecture, size
    /// and file type) or, for the crate baseline, the GGUF's `general.name`; empty when unknown.
    pub description: String,
    /// The GGUF's `general.architecture` (`gemma3`, `llama`, ...); empty when unknown.
    pub architecture: String,
    /// Number of parameters.
    pub n_params: u64,
    /// Size of the weights in bytes.
    pub size_bytes: u64,
    /// Number of tokens in the vocabulary: every [`Token`](crate::Token) of the model is below it.
    pub n_vocab: i32,
    /// The context length the model was trained with, in tokens.
    pub n_ctx_train: u32,
    /// Width of the model's embeddings (hidden size): the length of each embedding vector.
    pub n_embd: usize,
    /// Whether the model file carries a chat template.
    pub has_chat_template: bool,
    /// Where the weights went, as llama.cpp logged it at load (layers offloaded, each device's
    /// model buffer: local CPU, GPUs, rpc-servers); empty where the backend does not say.
    pub placement: Vec<String>,
}

/// How llama.cpp was built for this program ([`Engine::build_info`](crate::Engine::build_info)):
/// what `exsa info` prints under `build_info`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct BuildInfo {
    /// The backend compiled in: `source`, `raw` or `crate`.
    pub backend: &'static str,
    /// Which llama.cpp tree: the pinned package and version it came from, `unpinned` for a tree
    /// of one's own (`LLAMA_CPP_DIR`), or the crate baseline's crates.
    pub llama_cpp: String,
    /// llama.cpp's build number, where the tree records one.
    pub build_number: Option<u32>,
    /// Everything else the backend records: compile flags, build switches, compilers, and for a
    /// dynamic-backend build the folder of its modules and the CPU variant it chose. The keys
    /// follow the backend and are outside the stability promise (README, "Stability").
    #[serde(flatten)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl BuildInfo {
    /// `backend`'s record from the JSON object llama-sys writes (`llama_cpp`, `build_number` and
    /// the rest become details); an empty record for anything else.
    // Backends source and raw read llama-sys' record; tested on every build.
    #[cfg_attr(not(any(feature = "source", feature = "raw")), allow(dead_code))]
    pub(crate) fn from_json(backend: &'static str, json: &str) -> BuildInfo {
        BuildInfo::from_record(backend, serde_json::from_str(json).unwrap_or_default())
    }

    /// `backend`'s record as a JSON object (anything else: an empty record).
    pub(crate) fn from_record(backend: &'static str, record: serde_json::Value) -> BuildInfo {
        let mut details = match record {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        let llama_cpp = match details.remove("llama_cpp") {
            Some(serde_json::Value::String(tree)) => tree,
            _ => String::new(),
        };
        // llama-sys writes 0 for a tree without a build number (a crate package's).
        let build_number = details.remove("build_number").and_then(|n| n.as_u64()).and_then(|n| u32::try_from(n).ok()).filter(|&n| n != 0);
        BuildInfo { backend, llama_cpp, build_number, details }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_record_keeps_every_key_and_serializes_as_one_object() {
        let info = BuildInfo::from_json("raw", r#"{"llama_cpp":"llama-cpp-sys-2 0.1.161","build_number":7,"c_flags":"-O3"}"#);
        assert_eq!((info.backend, info.llama_cpp.as_str(), info.build_number), ("raw", "llama-cpp-sys-2 0.1.161", Some(7)));
        assert_eq!(info.details.keys().collect::<Vec<_>>(), ["c_flags"]);
        // `exsa info` prints the record as llama-sys wrote it, with the backend beside it.
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json, serde_json::json!({"backend": "raw", "llama_cpp": "llama-cpp-sys-2 0.1.161", "build_number": 7, "c_flags": "-O3"}));
        // A record without a build number, or no record at all.
        assert_eq!(BuildInfo::from_json("crate", r#"{"llama_cpp":"x"}"#).build_number, None);
        assert_eq!(BuildInfo::from_json("source", r#"{"llama_cpp":"x","build_number":0}"#).build_number, None);
        assert!(BuildInfo::from_json("crate", "not json").details.is_empty());
    }
}
