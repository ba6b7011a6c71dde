"""Writes small GGUF models with random weights, for tests and speed measurements of
architectures no GGUF of which can be downloaded here.

Run by `cargo xtask synth-models`, with the `gguf` package (PyPI) on PYTHONPATH. Speed depends
on shapes and quantisation types, not on weight values, and the engine's correctness checks
(prefix reuse equals a fresh decode, state restore equals the original run) hold for any
weights, so random ones serve both. Everything is deterministic: a model's weights come from a
seed derived from its name, and the tokenizer is copied from a given GGUF.

Usage: synth_models.py --tokenizer-from GGUF --out DIR MODEL...
"""

import argparse
import hashlib
import os
import sys

import numpy as np
import gguf

# The tokenizer keys copied from the source model. The chat template is left out on purpose:
# the engine picks one by architecture, as it would for a GGUF without one.
TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix",
)

# Shapes. The tiny models test the engine on each kind of memory: attention only (llama),
# short convolutions plus attention (LFM2, hybrid), a pure recurrent state (Mamba); the BERT ones
# test embeddings and reranking.
# `lfm2-1.2b-shape` is LiquidAI/LFM2-1.2B's published shape (config.json: 16 layers, attention
# at 2, 5, 8, 10, 12, 14, hidden 2048, 32 heads of 64, 8 KV heads, block_ff_dim 12288
# auto-adjusted to 8192, conv L_cache 3, 65,536 tokens, rope theta 1e6, tied embeddings),
# written in F16 for `quantize` to turn into Q4_K_M: for speed only. The tiny ones are F16 too,
# with an output matrix of their own (see write_model).
MODELS = {
    "llama-tiny": dict(arch="llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, n_vocab=None, dtype="f16"),
    # The same with the vocabulary cut to its first 32,768 tokens: a model that cannot draft for
    # the default one (the draft-model tests' mismatch).
    "llama-tiny-32k": dict(arch="llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, n_vocab=32768, dtype="f16"),
    # With LFM2's tool-call markers as control tokens (see LFM2_MARKERS): the tool-calling tests
    # render LFM2's own chat templates for it; and fill-in-the-middle tokens (FIM_MARKERS) for
    # the infill tests.
    "lfm2-tiny": dict(arch="lfm2", n_embd=64, n_layer=4, n_head=4, n_head_kv=2, n_ff=128, attn_layers=(1, 3), l_cache=3, n_vocab=None, dtype="f16",
                      markers=True),
    "mamba-tiny": dict(arch="mamba", n_embd=64, n_layer=2, d_inner=128, d_state=16, dt_rank=4, d_conv=4, n_vocab=None, dtype="f16"),
    "lfm2-1.2b-shape": dict(
        arch="lfm2",
        n_embd=2048,
        n_layer=16,
        n_head=32,
        n_head_kv=8,
        n_ff=8192,
        attn_layers=(2, 5, 8, 10, 12, 14),
        l_cache=3,
        n_vocab=65536,
        dtype="f16",
        tied=True,
    ),
    # BERT encoders (attention over the whole input, learned positions, post-norm, no memory across
    # calls), with BERT's 512 positions. The first pools the first token's state (CLS, pooling type
    # 2); the reranker feeds it to a classification head (`cls`, then `cls.output` to one label)
    # for a score per query and document, as bge-reranker does (rank, pooling type 4).
    "bert-tiny": dict(arch="bert", n_embd=64, n_layer=2, n_head=4, n_ff=128, n_ctx=512, n_vocab=None, dtype="f16", pooling=gguf.PoolingType.CLS),
    "bert-tiny-rerank": dict(arch="bert", n_embd=64, n_layer=2, n_head=4, n_ff=128, n_ctx=512, n_vocab=None, dtype="f16", pooling=gguf.PoolingType.RANK),
}


def read_tokenizer(path):
    reader = gguf.GGUFReader(path)
    fields = {}
    for key in TOKENIZER_KEYS:
        field = reader.get_field(key)
        if field is None:
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            item = field.types[1]
            if item == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = [field.parts[i][0].item() for i in field.data]
            fields[key] = (value, kind, item)
        elif kind == gguf.GGUFValueType.STRING:
            fields[key] = (bytes(field.parts[field.data[0]]).decode(), kind, None)
        else:
            fields[key] = (field.parts[field.data[0]][0].item(), kind, None)
    return fields


# LFM2's tool-call markers, written over the copied vocabulary's first unused control tokens
# (Gemma's `<unused0>`, ...), so that a model of LFM2's architecture has them as single special
# tokens as LFM2's tokenizer does. `<|im_end|>` is left out: llama.cpp would make it an
# end-of-generation token, which would change how the random model's replies end.
LFM2_MARKERS = ["<|tool_call_start|>", "<|tool_call_end|>", "<|tool_list_start|>", "<|tool_list_end|>"]

# Fill-in-the-middle tokens, written over the next unused control tokens (`<unused4>` ...) and
# named in the metadata as llama.cpp reads them, so that one model has what `/infill` needs.
FIM_MARKERS = [("<|fim_prefix|>", "fim_pre"), ("<|fim_suffix|>", "fim_suf"), ("<|fim_middle|>", "fim_mid")]

# BERT's separator, written over the unused control token after those: with it and EOS added,
# llama-server lays out a reranker's input as `[BOS] query [EOS] [SEP] document [EOS]`, and an
# embedding's as `[BOS] text [EOS]`, BERT's `[CLS] text [SEP]`.
SEP_MARKER = ("[SEP]", "<unused7>")


def write_tokenizer(writer, fields, n_vocab, markers=False, sep=False):
    """Copies the tokenizer, cut to the first `n_vocab` tokens when asked, with LFM2's markers and
    the fill-in-the-middle tokens in place of the first unused tokens when asked, and with BERT's
    separator, added with EOS after each text, when asked."""
    for key, (value, kind, item) in fields.items():
        if sep and key == "tokenizer.ggml.add_eos_token":
            continue  # true, below
        if kind == gguf.GGUFValueType.ARRAY:
            if n_vocab is not None and key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
                value = value[:n_vocab]
            if markers and key == "tokenizer.ggml.tokens":
                value = list(value)
                for marker, unused in zip(LFM2_MARKERS, range(len(LFM2_MARKERS))):
                    index = value.index(f"<unused{unused}>".encode())
                    value[index] = marker.encode()
                for (marker, name), unused in zip(FIM_MARKERS, range(len(LFM2_MARKERS), len(LFM2_MARKERS) + len(FIM_MARKERS))):
                    index = value.index(f"<unused{unused}>".encode())
                    value[index] = marker.encode()
                    writer.add_uint32(f"tokenizer.ggml.{name}_token_id", index)
            if sep and key == "tokenizer.ggml.tokens":
                value = list(value)
                index = value.index(SEP_MARKER[1].encode())
                value[index] = SEP_MARKER[0].encode()
                writer.add_sep_token_id(index)
            writer.add_array(key, value)
        elif kind == gguf.GGUFValueType.STRING:
            writer.add_string(key, value)
        elif kind == gguf.GGUFValueType.BOOL:
            writer.add_bool(key, bool(value))
        else:
            if n_vocab is not None and key.endswith("_token_id") and value >= n_vocab:
                sys.exit(f"{key} = {value} is outside the first {n_vocab} tokens")
            writer.add_uint32(key, int(value))
    if sep:
        writer.add_add_eos_token(True)
        writer.add_add_sep_token(True)


class Weights:
    """Random tensors from one seeded generator, added in a fixed order."""

    def __init__(self, writer, name, dtype):
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        self.rng = np.random.default_rng(seed)
        self.writer = writer
        self.dtype = np.float16 if dtype == "f16" else np.float32

    def normal(self, name, shape, std, f32=False):
        data = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        # 1-D tensors (norms, biases) stay F32, as converters write them, and so do the
        # convolution kernels, which ggml's ssm_conv reads as F32 only (it asserts otherwise).
        self.writer.add_tensor(name, data.astype(self.dtype) if len(shape) > 1 and not f32 else data)

    def const(self, name, data):
        self.writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))


def add_common(writer, arch, spec, n_vocab, name):
    writer.add_name(name)
    writer.add_context_length(spec.get("n_ctx", 4096))
    writer.add_embedding_length(spec["n_embd"])
    writer.add_block_count(spec["n_layer"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if spec.get("dtype") == "f16" else gguf.LlamaFileType.ALL_F32)


def attention(w, i, n_embd, n_head, n_head_kv, head_dim, qk_norm):
    std = n_embd**-0.5
    w.normal(f"blk.{i}.attn_q.weight", (n_head * head_dim, n_embd), std)
    w.normal(f"blk.{i}.attn_k.weight", (n_head_kv * head_dim, n_embd), std)
    w.normal(f"blk.{i}.attn_v.weight", (n_head_kv * head_dim, n_embd), std)
    w.normal(f"blk.{i}.attn_output.weight", (n_embd, n_head * head_dim), (n_head * head_dim) ** -0.5)
    if qk_norm:
        w.const(f"blk.{i}.attn_q_norm.weight", np.ones(head_dim))
        w.const(f"blk.{i}.attn_k_norm.weight", np.ones(head_dim))


def feed_forward(w, i, n_embd, n_ff):
    w.const(f"blk.{i}.ffn_norm.weight", np.ones(n_embd))
    w.normal(f"blk.{i}.ffn_gate.weight", (n_ff, n_embd), n_embd**-0.5)
    w.normal(f"blk.{i}.ffn_up.weight", (n_ff, n_embd), n_embd**-0.5)
    w.normal(f"blk.{i}.ffn_down.weight", (n_embd, n_ff), n_ff**-0.5)


# LoRA adapters, random and large enough to change the logits, since no published adapter fits a
# model downloadable here. `llama-tiny-lora` (rank 4 on every attention query and output
# projection of llama-tiny) is the adapter tests' only adapter. `default-lora` fits the model the
# tokenizer is copied from (the default model): rank 16 on every attention query and value
# projection, as fine-tunes commonly target, for bench-serve's `lora` scenario (speed only).
# `llama-tiny-lora` declares a task name and a prompt prefix (llama-server lists them);
# `llama-tiny-alora` is the same adapter made an activated LoRA (aLoRA) by invocation tokens,
# which the engine refuses.
ADAPTERS = {
    "llama-tiny-lora": dict(
        base="llama-tiny", rank=4, alpha=8.0, targets=("attn_q", "attn_output"), task_name="tiny-story", prompt_prefix="Story: "
    ),
    "llama-tiny-alora": dict(base="llama-tiny", rank=4, alpha=8.0, targets=("attn_q", "attn_output"), invocation_tokens=[106, 2364]),
    "default-lora": dict(base=None, rank=16, alpha=16.0, targets=("attn_q", "attn_v")),
}


def adapted_shapes(spec, model_file):
    """The base model's architecture and, for each layer, the (n_in, n_out) of each target
    weight: from MODELS, or (base None) read from the GGUF at `model_file`."""
    if spec["base"] is not None:
        base = MODELS[spec["base"]]
        n_embd, width = base["n_embd"], base["n_head"] * (base["n_embd"] // base["n_head"])
        dims = {"attn_q": (n_embd, width), "attn_output": (width, n_embd)}
        return base["arch"], [{t: dims[t] for t in spec["targets"]} for _ in range(base["n_layer"])]
    reader = gguf.GGUFReader(model_file)
    field = reader.get_field("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode()
    # The reader gives ggml's order: ne[0] is the input width, ne[1] the output's.
    weights = {t.name: (int(t.shape[0]), int(t.shape[1])) for t in reader.tensors if len(t.shape) == 2}
    layers = []
    while all(f"blk.{len(layers)}.{t}.weight" in weights for t in spec["targets"]):
        layers.append({t: weights[f"blk.{len(layers)}.{t}.weight"] for t in spec["targets"]})
    if not layers:
        sys.exit(f"{model_file} has no {', '.join(spec['targets'])} weights to adapt")
    return arch, layers


def write_adapter(name, spec, model_file, out_dir):
    arch, layers = adapted_shapes(spec, model_file)
    rank = spec["rank"]
    path = os.path.join(out_dir, f"{name}.gguf")
    writer = gguf.GGUFWriter(path + ".partial", arch)
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", spec["alpha"])
    for key in ("task_name", "prompt_prefix"):
        if key in spec:
            writer.add_string(f"adapter.lora.{key}", spec[key])
    if "invocation_tokens" in spec:
        # llama.cpp reads them as an array of uint32 only (the writer's default for ints is int32).
        writer.add_key_value(
            "adapter.alora.invocation_tokens", spec["invocation_tokens"], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32
        )
    w = Weights(writer, name, "f32")
    for i, targets in enumerate(layers):
        for target, (n_in, n_out) in targets.items():
            # In ggml's order the base weight is [n_in, n_out]; A is [n_in, rank], B [rank, n_out]:
            # numpy shapes are the reverse.
            w.normal(f"blk.{i}.{target}.weight.lora_a", (rank, n_in), n_in**-0.5)
            w.normal(f"blk.{i}.{target}.weight.lora_b", (n_out, rank), 1.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(path + ".partial", path)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")


def write_model(name, spec, tokenizer, out_dir):
    arch = spec["arch"]
    n_vocab = spec["n_vocab"] or len(tokenizer["tokenizer.ggml.tokens"][0])
    n_embd = spec["n_embd"]
    path = os.path.join(out_dir, f"{name}.gguf")
    writer = gguf.GGUFWriter(path + ".partial", arch)
    add_common(writer, arch, spec, n_vocab, name)
    write_tokenizer(writer, tokenizer, spec["n_vocab"], spec.get("markers", False), sep=arch == "bert")
    w = Weights(writer, name, spec.get("dtype", "f32"))
    w.normal("token_embd.weight", (n_vocab, n_embd), 1.0)
    # An output matrix of its own: tied to the embeddings, random weights make each token its
    # own likeliest successor. Scaled so that logits spread out (a standard deviation of about
    # sqrt(n_embd)): greedy choices are far from ties, and two decodes of the same tokens that
    # differ show it. BERT has none: it embeds, it does not predict tokens.
    if not spec.get("tied") and arch != "bert":
        w.normal("output.weight", (n_vocab, n_embd), 1.0)

    if arch == "llama":
        head_dim = n_embd // spec["n_head"]
        writer.add_head_count(spec["n_head"])
        writer.add_head_count_kv(spec["n_head_kv"])
        writer.add_feed_forward_length(spec["n_ff"])
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(10000.0)
        for i in range(spec["n_layer"]):
            w.const(f"blk.{i}.attn_norm.weight", np.ones(n_embd))
            attention(w, i, n_embd, spec["n_head"], spec["n_head_kv"], head_dim, qk_norm=False)
            feed_forward(w, i, n_embd, spec["n_ff"])
        w.const("output_norm.weight", np.ones(n_embd))
    elif arch == "lfm2":
        head_dim = n_embd // spec["n_head"]
        attn = set(spec["attn_layers"])
        writer.add_head_count(spec["n_head"])
        # Per layer: the convolution blocks have no KV heads, which is how llama.cpp tells them apart.
        writer.add_head_count_kv([spec["n_head_kv"] if i in attn else 0 for i in range(spec["n_layer"])])
        writer.add_feed_forward_length(spec["n_ff"])
        writer.add_rope_freq_base(1_000_000.0)
        writer.add_shortconv_l_cache(spec["l_cache"])
        for i in range(spec["n_layer"]):
            w.const(f"blk.{i}.attn_norm.weight", np.ones(n_embd))
            if i in attn:
                attention(w, i, n_embd, spec["n_head"], spec["n_head_kv"], head_dim, qk_norm=True)
            else:
                w.normal(f"blk.{i}.shortconv.conv.weight", (n_embd, spec["l_cache"]), spec["l_cache"] ** -0.5, f32=True)
                w.normal(f"blk.{i}.shortconv.in_proj.weight", (3 * n_embd, n_embd), n_embd**-0.5)
                w.normal(f"blk.{i}.shortconv.out_proj.weight", (n_embd, n_embd), n_embd**-0.5)
            feed_forward(w, i, n_embd, spec["n_ff"])
        # LFM2's final norm has this name in llama.cpp.
        w.const("token_embd_norm.weight", np.ones(n_embd))
    elif arch == "mamba":
        d_inner, d_state, dt_rank, d_conv = spec["d_inner"], spec["d_state"], spec["dt_rank"], spec["d_conv"]
        writer.add_head_count(0)
        writer.add_feed_forward_length(0)
        writer.add_ssm_conv_kernel(d_conv)
        writer.add_ssm_inner_size(d_inner)
        writer.add_ssm_state_size(d_state)
        writer.add_ssm_time_step_rank(dt_rank)
        for i in range(spec["n_layer"]):
            w.const(f"blk.{i}.attn_norm.weight", np.ones(n_embd))
            w.normal(f"blk.{i}.ssm_in.weight", (2 * d_inner, n_embd), n_embd**-0.5)
            w.normal(f"blk.{i}.ssm_conv1d.weight", (d_inner, d_conv), d_conv**-0.5, f32=True)
            w.const(f"blk.{i}.ssm_conv1d.bias", np.zeros(d_inner))
            w.normal(f"blk.{i}.ssm_x.weight", (dt_rank + 2 * d_state, d_inner), d_inner**-0.5)
            w.normal(f"blk.{i}.ssm_dt.weight", (d_inner, dt_rank), dt_rank**-0.5)
            # Mamba's initialisation: a time step near 0.01, and A = -[1..d_state] per channel, so
            # the state decays instead of growing without bound.
            w.const(f"blk.{i}.ssm_dt.bias", np.full(d_inner, np.log(np.expm1(0.01))))
            w.const(f"blk.{i}.ssm_a", -np.tile(np.arange(1, d_state + 1, dtype=np.float32), (d_inner, 1)))
            w.const(f"blk.{i}.ssm_d", np.ones(d_inner))
            w.normal(f"blk.{i}.ssm_out.weight", (n_embd, d_inner), d_inner**-0.5)
        w.const("output_norm.weight", np.ones(n_embd))
    elif arch == "bert":
        n_ctx, n_ff = spec["n_ctx"], spec["n_ff"]
        writer.add_head_count(spec["n_head"])
        writer.add_feed_forward_length(n_ff)
        writer.add_layer_norm_eps(1e-12)
        writer.add_causal_attention(False)
        writer.add_pooling_type(spec["pooling"])
        # Sentence A and B, as BERT's. llama.cpp adds A's row to every token, with an add that
        # ggml's CPU backend does not do in F16: hence F32.
        writer.add_token_type_count(2)
        w.normal("token_types.weight", (2, n_embd), 1.0, f32=True)
        w.normal("position_embd.weight", (n_ctx, n_embd), 1.0)
        w.const("token_embd_norm.weight", np.ones(n_embd))
        w.const("token_embd_norm.bias", np.zeros(n_embd))
        for i in range(spec["n_layer"]):
            attention(w, i, n_embd, spec["n_head"], spec["n_head"], n_embd // spec["n_head"], qk_norm=False)
            w.const(f"blk.{i}.attn_output_norm.weight", np.ones(n_embd))
            w.const(f"blk.{i}.attn_output_norm.bias", np.zeros(n_embd))
            w.normal(f"blk.{i}.ffn_up.weight", (n_ff, n_embd), n_embd**-0.5)
            w.normal(f"blk.{i}.ffn_down.weight", (n_embd, n_ff), n_ff**-0.5)
            w.const(f"blk.{i}.layer_output_norm.weight", np.ones(n_embd))
            w.const(f"blk.{i}.layer_output_norm.bias", np.zeros(n_embd))
        if spec["pooling"] == gguf.PoolingType.RANK:
            writer.add_classifier_output_labels(["LABEL_0"])
            w.normal("cls.weight", (n_embd, n_embd), n_embd**-0.5)
            w.normal("cls.output.weight", (1, n_embd), n_embd**-0.5)
    else:
        sys.exit(f"unknown architecture {arch}")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(path + ".partial", path)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-from", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--list", action="store_true", help="print the model names and exit")
    parser.add_argument("models", nargs="*")
    args = parser.parse_args()
    known = list(MODELS) + list(ADAPTERS)
    if args.list:
        print("\n".join(known))
        return
    unknown = [m for m in args.models if m not in known]
    if unknown:
        sys.exit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(known)}")
    os.makedirs(args.out, exist_ok=True)
    tokenizer = read_tokenizer(args.tokenizer_from)
    for name in args.models:
        if name in ADAPTERS:
            write_adapter(name, ADAPTERS[name], args.tokenizer_from, args.out)
        else:
            write_model(name, MODELS[name], tokenizer, args.out)


if __name__ == "__main__":
    main()
