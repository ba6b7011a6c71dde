//! llama-server's native `POST /completion` (also at `/completions`, as llama-server routes it):
//! its prompt forms (text, token ids, both mixed), its request fields, and its response shape
//! (`content`, `tokens`, `stop_type`, `generation_settings`, `timings`,
//! `completion_probabilities`; streamed as one object per delta, then the whole object with
//! `stop: true`, and no `[DONE]`).

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::AppState;
use super::error::ApiError;
use super::handlers::{Answering, Body, generate};
use super::log;
use super::models::Loaded;
use super::openai::{Kind, Sampling, prompts, timings};
use crate::config::{GenerateOptions, GenerateRequest, Prompt};
use crate::outcome::{Completion, FinishReason};
use crate::token::TokenLogprobs;
use crate::{SpecialText, Token, TokenizeOptions};

#[derive(Debug, Deserialize)]
pub struct NativeRequest {
    /// Text, token ids, or a list mixing both, or a list of such prompts. Required but for
    /// `/infill`, where it is text written after the prefix.
    #[serde(default)]
    pub prompt: Value,
    /// `/infill`: the text before the cursor (text, token ids or both mixed).
    pub input_prefix: Option<Value>,
    /// `/infill`: the text after the cursor.
    pub input_suffix: Option<Value>,
    /// `/infill`: files given as context, `[{"filename", "text"}]`.
    pub input_extra: Option<Value>,
    /// Most tokens to generate (-1: no limit but the context's).
    pub n_predict: Option<i64>,
    /// Candidates per generated token listed with their log-probabilities (0: none).
    pub n_probs: Option<u32>,
    /// List the generated token ids in `tokens` (streamed chunks always carry theirs).
    #[serde(default)]
    pub return_tokens: bool,
    /// Only these fields of the response (`a/b` reaches into an object; the key stays `a/b`).
    pub response_fields: Option<Vec<String>>,
    /// `[[token or text, bias or false], ...]` or `{"token or text": bias or false}`; `false` bans.
    pub logit_bias: Option<Value>,
    /// Probabilities after the sampler chain instead of the model's: not provided.
    pub post_sampling_probs: Option<bool>,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Every field not named above: see [`super::fields::check`].
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// What a native request asks of its response beyond the text.
#[derive(Clone, Debug, Default)]
pub struct NativeFields {
    return_tokens: bool,
    response_fields: Option<Vec<String>>,
    /// `n_predict` as the request gave it (-1: none given).
    n_predict: i64,
}

/// What the native response reports beside the text, fixed once the prompt is tokenized.
#[derive(Clone, Debug)]
pub struct Shape {
    fields: NativeFields,
    n_probs: usize,
    /// The probabilities listed are the sampler's, not the model's (`post_sampling_probs`).
    post_sampling: bool,
    /// The prompt's text (control tokens written out) and its token count.
    prompt: String,
    prompt_tokens: usize,
    generation_settings: Value,
}

pub(super) async fn completion(State(state): State<Arc<AppState>>, Body(body): Body<NativeRequest>) -> Response {
    native(state, body, false).await
}

/// llama-server's `POST /infill`: fill-in-the-middle for code models, answered as `/completion`.
pub(super) async fn infill(State(state): State<Arc<AppState>>, Body(body): Body<NativeRequest>) -> Response {
    native(state, body, true).await
}

async fn native(state: Arc<AppState>, body: NativeRequest, infill: bool) -> Response {
    let model = match state.models.get(body.sampling.model.as_deref()).await {
        Ok(model) => model,
        Err(e) => return log::refused(&state, e),
    };
    if let Err(e) = body.sampling.choices() {
        return log::refused(&state, e);
    }
    let mut answering = Answering::new(Kind::Native, &body.sampling, &state.config);
    // The native object reports everything already: no `__verbose` echo of it.
    answering.verbose = false;
    // Tokenizing the prompt and its bias texts can take a while: off the async workers.
    let built = {
        let (state, model) = (Arc::clone(&state), Arc::clone(&model));
        tokio::task::spawn_blocking(move || body.into_request(&state, &model, infill)).await
    };
    let (request, fields, extra_prompts) = match built {
        Ok(Ok(built)) => built,
        Ok(Err(e)) => return log::refused(&state, e),
        Err(e) => return log::refused(&state, ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string())),
    };
    answering.native = Some(fields);
    answering.extra_prompts = extra_prompts;
    let id = model.id.clone();
    generate(state, Some(&id), Ok(request), answering).await
}

impl NativeRequest {
    /// The request for the first prompt, what its response reports, and the other prompts (a
    /// choice each).
    fn into_request(mut self, state: &AppState, model: &Loaded, infill: bool) -> Result<(GenerateRequest, NativeFields, Vec<Prompt>), ApiError> {
        super::fields::check(&self.other, super::fields::Endpoint::Native)?;
        match self.n_predict {
            Some(n) if n < -1 => return Err(ApiError::invalid("n_predict", "must be -1 (no limit) or more")),
            Some(n) if n >= 0 => self.sampling.max_tokens = Some(n.min(i64::from(u32::MAX)) as u32),
            _ => {}
        }
        let n_probs = self.n_probs.unwrap_or(0) as usize;
        if n_probs > crate::config::MAX_LOGPROBS {
            return Err(ApiError::invalid("n_probs", format!("at most {}", crate::config::MAX_LOGPROBS)));
        }
        let mut options = self.sampling.to_options(&state.config)?;
        options.logprobs = (n_probs > 0).then_some(n_probs);
        options.post_sampling = self.post_sampling_probs == Some(true);
        if let Some(bias) = &self.logit_bias {
            options.sampling.logit_bias = logit_bias(bias, model)?;
        }
        options.validate()?;
        let mut prompts = match infill {
            false => {
                let infill_fields = [("input_prefix", &self.input_prefix), ("input_suffix", &self.input_suffix), ("input_extra", &self.input_extra)];
                if let Some((field, _)) = infill_fields.iter().find(|(_, value)| value.is_some()) {
                    return Err(ApiError::invalid(*field, "is a field of /infill"));
                }
                if self.prompt.is_null() {
                    return Err(ApiError::invalid("prompt", "is required"));
                }
                prompts(&self.prompt, "prompt", |p| prompt_tokens(p, model, "prompt"))?
            }
            true => vec![self.infill_tokens(model, state.config.max_tokens)?],
        }
        .into_iter()
        .map(Prompt::Tokens);
        let first = prompts.next().ok_or_else(|| ApiError::invalid("prompt", "the list is empty"))?;
        let extra: Vec<Prompt> = prompts.collect();
        let fields = NativeFields {
            return_tokens: self.return_tokens,
            response_fields: self.response_fields.filter(|f| !f.is_empty()),
            n_predict: self.n_predict.or(state.config.max_tokens.map(|n| n as i64)).unwrap_or(-1),
        };
        Ok((GenerateRequest { prompt: first, options }, fields, extra))
    }
}

impl Shape {
    /// The shape of a response to `options` over the prompt `tokens` (as prepared for decoding).
    pub(super) fn new(model: &Loaded, tokens: &[Token], options: &GenerateOptions, stream: bool, fields: NativeFields) -> Result<Shape, ApiError> {
        let s = &options.sampling;
        let generation_settings = json!({
            "seed": s.seed, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p,
            "repeat_last_n": s.repeat_last_n, "repeat_penalty": s.repeat_penalty,
            "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
            // Samplers this server does not have, reported as llama-server reports them off.
            "adaptive_target": -1.0, "adaptive_decay": 0.0,
            "stop": options.stop, "n_predict": fields.n_predict,
            "ignore_eos": options.ignore_eos, "stream": stream, "n_probs": options.logprobs.unwrap_or(0),
            "grammar": s.grammar.clone().unwrap_or_default(),
            "logit_bias": s.logit_bias.iter().map(|&(token, bias)| json!({ "token": token, "bias": bias })).collect::<Vec<_>>(),
            // The request's own adapter scales (every adapter, the unlisted ones at 0); empty
            // when it set none and got the server's, as llama-server echoes them.
            "lora": super::lora::scale_entries(options.lora_scales.as_deref().unwrap_or_default()),
        });
        Ok(Shape {
            fields,
            n_probs: options.logprobs.unwrap_or(0),
            post_sampling: options.post_sampling,
            prompt: model.engine.tokens_to_text_with_specials(tokens)?,
            prompt_tokens: tokens.len(),
            generation_settings,
        })
    }
}

impl NativeRequest {
    /// An infill prompt as llama-server builds it (repository-level FIM): the context files
    /// (`[FIM_REP]myproject\n[FIM_SEP]name\ntext...`, as much as the context leaves room for),
    /// then BOS where the model wants one, `[FIM_PRE]` prefix (at most 3/4 of a batch, its end)
    /// `prompt`, `[FIM_SUF]` suffix (what a quarter batch leaves room for, its start), `[FIM_MID]`.
    fn infill_tokens(&self, model: &Loaded, server_max_tokens: Option<usize>) -> Result<Vec<Token>, ApiError> {
        let fim = model.engine.fim_tokens();
        let (Some(pre), Some(suf), Some(mid)) = (fim.prefix, fim.suffix, fim.middle) else {
            return Err(ApiError::invalid("model", "this model has no fill-in-the-middle tokens (prefix, suffix and middle), so it cannot infill")
                .with_code("not_supported"));
        };
        let plain =
            |text: &str| model.engine.tokenize(text, TokenizeOptions { add_special: false, specials: SpecialText::Plain }).map_err(ApiError::from);
        let field = |name: &'static str, value: &Option<Value>| -> Result<Vec<Token>, ApiError> {
            match value {
                None => Err(ApiError::invalid(name, "is required")),
                Some(Value::String(text)) => plain(text),
                Some(Value::Array(items)) => mixed_tokens(items, model, name, |text, _| plain(text)),
                Some(_) => Err(ApiError::invalid(name, "must be text, or token ids and text")),
            }
        };
        let mut prefix = field("input_prefix", &self.input_prefix)?;
        let mut suffix = field("input_suffix", &self.input_suffix)?;
        let prompt = match &self.prompt {
            Value::Null => Vec::new(),
            Value::String(text) => plain(text)?,
            _ => return Err(ApiError::invalid("prompt", "must be text")),
        };
        let chunks = match &self.input_extra {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(chunks)) => chunks.clone(),
            Some(_) => return Err(ApiError::invalid("input_extra", "must be a list of {\"filename\": string, \"text\": string}")),
        };
        let mut extra = Vec::new();
        if let Some(rep) = fim.repository {
            extra.push(rep);
            extra.extend(plain("myproject\n")?);
        }
        for (i, chunk) in chunks.iter().enumerate() {
            let text =
                chunk.get("text").and_then(Value::as_str).ok_or_else(|| ApiError::invalid("input_extra", format!("input_extra[{i}] needs text")))?;
            let filename = match chunk.get("filename") {
                None => "tmp",
                Some(Value::String(name)) => name,
                Some(_) => return Err(ApiError::invalid("input_extra", format!("input_extra[{i}]: filename must be text"))),
            };
            match fim.separator {
                Some(sep) => {
                    extra.push(sep);
                    extra.extend(plain(&format!("{filename}\n"))?);
                }
                None => extra.extend(plain("\n\n--- snippet ---\n\n")?),
            }
            extra.extend(plain(text)?);
        }
        if let Some(sep) = fim.separator {
            extra.push(sep);
            extra.extend(plain("filename\n")?);
        }
        let n_batch = model.engine.session_config().n_batch as usize;
        let n_predict = self.n_predict.or(server_max_tokens.map(|n| n as i64)).unwrap_or(-1);
        // The prefix:suffix budget of a batch is 3:1, the prompt and two markers in the suffix's.
        let prefix_take = prefix.len().min(3 * (n_batch / 4));
        let suffix_take = suffix.len().min((n_batch / 4).saturating_sub(2 + prompt.len()));
        let extra_room = (model.n_ctx as i64 - n_batch as i64 - 2 * n_predict).max(0) as usize;
        let extra_take = extra.len().min(extra_room);
        prefix.drain(..prefix.len() - prefix_take);
        suffix.truncate(suffix_take);
        let mut tokens = extra[extra.len() - extra_take..].to_vec();
        // BOS where the model wants one (what tokenizing nothing with special tokens gives).
        tokens.extend(model.engine.tokenize("", TokenizeOptions { add_special: true, specials: SpecialText::Plain })?);
        tokens.push(pre);
        tokens.extend(prefix);
        tokens.extend(prompt);
        tokens.push(suf);
        tokens.extend(suffix);
        tokens.push(mid);
        Ok(tokens)
    }
}

/// One prompt's tokens (of the request's `field`): text is tokenized with control tokens
/// parsed and BOS added (as llama-server does); in a list, BOS only when it starts with text.
pub(super) fn prompt_tokens(prompt: &Value, model: &Loaded, field: &'static str) -> Result<Vec<Token>, ApiError> {
    let bad = |reason: &str| ApiError::invalid(field, reason);
    let text =
        |t: &str, first: bool| model.engine.tokenize(t, TokenizeOptions { add_special: first, specials: SpecialText::Parse }).map_err(ApiError::from);
    match prompt {
        Value::String(t) => text(t, true),
        Value::Object(o) => {
            if o.get("multimodal_data").is_some_and(|m| !m.is_null()) {
                return Err(ApiError::invalid(field, "multimodal_data: this server takes text only"));
            }
            match o.get("prompt_string") {
                Some(inner @ (Value::String(_) | Value::Array(_))) => prompt_tokens(inner, model, field),
                _ => Err(bad("an object prompt needs prompt_string")),
            }
        }
        // Token ids, perhaps mixed with text.
        Value::Array(items) => mixed_tokens(items, model, field, |t, i| text(t, i == 0)),
        _ => Err(bad("must be text, token ids, a list mixing both, or a list of those")),
    }
}

/// A token id of this model, given as a JSON number; a 400 naming `field` otherwise.
fn token_id(value: &Value, model: &Loaded, field: &'static str) -> Result<Token, ApiError> {
    let n_vocab = model.engine.model_info().n_vocab;
    value
        .as_i64()
        .filter(|t| (0..i64::from(n_vocab)).contains(t))
        .map(|t| Token(t as i32))
        .ok_or_else(|| ApiError::invalid(field, format!("{value} is not a token of this model (0..{n_vocab})")))
}

/// Token ids mixed with text, in order (llama-server's mixed prompts); `text` tokenizes the text
/// at position `i` of the list.
fn mixed_tokens(
    items: &[Value],
    model: &Loaded,
    field: &'static str,
    text: impl Fn(&str, usize) -> Result<Vec<Token>, ApiError>,
) -> Result<Vec<Token>, ApiError> {
    let mut tokens = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item {
            Value::String(t) => tokens.extend(text(t, i)?),
            other => tokens.push(token_id(other, model, field)?),
        }
    }
    Ok(tokens)
}

/// llama-server's `logit_bias` forms, as token ids and biases (text keys bias each of their tokens).
fn logit_bias(value: &Value, model: &Loaded) -> Result<Vec<(Token, f32)>, ApiError> {
    let bad = |reason: String| ApiError::invalid("logit_bias", reason);
    let pairs: Vec<(Value, &Value)> = match value {
        Value::Object(map) => map.iter().map(|(k, v)| (Value::String(k.clone()), v)).collect(),
        Value::Array(items) => items
            .iter()
            .map(|pair| match pair.as_array().map(Vec::as_slice) {
                Some([key, bias]) => Ok((key.clone(), bias)),
                _ => Err(bad(format!("{pair} is not a [token or text, bias] pair"))),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad("must be a list of pairs or an object".into())),
    };
    if pairs.len() > 1024 {
        return Err(bad("at most 1024 entries".into()));
    }
    let mut out = Vec::new();
    for (key, bias) in pairs {
        let bias = match bias {
            Value::Bool(false) => f32::NEG_INFINITY,
            Value::Number(n) => n.as_f64().unwrap_or(0.0) as f32,
            other => return Err(bad(format!("the bias {other} is not a number or false"))),
        };
        let tokens = match &key {
            Value::Number(_) => vec![token_id(&key, model, "logit_bias")?],
            // A key that reads as a number is a token id, any other a text.
            Value::String(s) => match s.parse::<i64>() {
                Ok(t) => vec![token_id(&t.into(), model, "logit_bias")?],
                Err(_) => model.engine.tokenize(s, TokenizeOptions { add_special: false, specials: SpecialText::Plain })?,
            },
            other => return Err(bad(format!("{other} is not a token id or a text"))),
        };
        out.extend(tokens.into_iter().map(|t| (t, bias)));
    }
    Ok(out)
}

fn stop_type(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::EndOfText => "eos",
        FinishReason::StopSequence => "word",
        FinishReason::MaxTokens | FinishReason::ContextFull => "limit",
        FinishReason::Cancelled => "none",
    }
}

/// `completion_probabilities`: per token its id, text, bytes and log-probability, with the
/// likeliest candidates; after sampling (`post_sampling_probs`), probabilities (`prob`,
/// `top_probs`) as llama-server lists them.
fn probabilities(entries: &[TokenLogprobs], model: &Loaded, post_sampling: bool) -> Value {
    let (value, top) = if post_sampling { ("prob", "top_probs") } else { ("logprob", "top_logprobs") };
    let one = |t: Token, logprob: f32| {
        let bytes = model.engine.token_bytes(t).unwrap_or_default();
        // The text of the bytes' valid UTF-8 start (a token may end inside a character).
        let valid = std::str::from_utf8(&bytes).map_or_else(|e| e.valid_up_to(), str::len);
        let text = String::from_utf8_lossy(&bytes[..valid]).into_owned();
        let mut entry = json!({ "id": t, "token": text, "bytes": bytes });
        entry[value] = (if post_sampling { logprob.exp() } else { logprob }).into();
        entry
    };
    Value::Array(
        entries
            .iter()
            .map(|e| {
                let mut entry = one(e.token, e.logprob);
                entry[top] = Value::Array(e.top.iter().map(|&(t, lp)| one(t, lp)).collect());
                entry
            })
            .collect(),
    )
}

impl Shape {
    /// The whole response (the stream's last object, with empty `content` and `tokens`).
    pub(super) fn response(&self, model: &Loaded, text: &str, completion: &Completion, streamed: bool) -> Value {
        let stats = &completion.stats;
        let mut body = json!({
            "index": 0,
            "content": text,
            "tokens": if self.fields.return_tokens && !streamed { json!(completion.tokens) } else { json!([]) },
            "id_slot": -1,
            "stop": true,
            "model": model.id,
            "tokens_predicted": stats.completion_tokens,
            "tokens_evaluated": self.prompt_tokens,
            "generation_settings": self.generation_settings,
            "prompt": self.prompt,
            "has_new_line": text.contains('\n'),
            "truncated": false,
            "stop_type": stop_type(completion.finish_reason),
            "stopping_word": "",
            "tokens_cached": self.prompt_tokens + completion.tokens.len(),
            "timings": timings(stats),
        });
        if self.n_probs > 0 && !streamed {
            body["completion_probabilities"] = probabilities(&completion.logprobs, model, self.post_sampling);
        }
        match &self.fields.response_fields {
            None => body,
            Some(fields) => Value::Object(fields.iter().filter_map(|f| body.pointer(&format!("/{f}")).map(|v| (f.clone(), v.clone()))).collect()),
        }
    }

    /// A streamed chunk without text, for the prompt's progress.
    pub(super) fn progress_chunk(&self) -> Value {
        json!({ "index": 0, "content": "", "tokens": [], "stop": false, "id_slot": -1, "tokens_predicted": 0, "tokens_evaluated": self.prompt_tokens })
    }

    /// A streamed delta: its text and tokens, and the counts so far.
    pub(super) fn chunk(&self, model: &Loaded, delta: &crate::serving::Delta, predicted: usize) -> Value {
        let mut chunk = json!({
            "index": 0,
            "content": delta.text,
            "tokens": delta.tokens,
            "stop": false,
            "id_slot": -1,
            "tokens_predicted": predicted,
            "tokens_evaluated": self.prompt_tokens,
        });
        if self.n_probs > 0 {
            chunk["completion_probabilities"] = probabilities(&delta.logprobs, model, self.post_sampling);
        }
        chunk
    }
}
