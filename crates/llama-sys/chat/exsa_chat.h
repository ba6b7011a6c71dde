// llama.cpp's chat layer (common/chat.cpp: Jinja chat templates with tools, tool-call grammars,
// parsing a reply back into content, reasoning and tool calls) behind a C surface with JSON text
// in and out (llama-sys feature `chat`, build/chat.rs). Every function is noexcept: exceptions and
// ggml's fatal errors on the calling thread come back as a code and a message.
#pragma once

#include "exsa_shim.h"

#ifdef __cplusplus
extern "C" {
#endif

// The error classes, besides EXSA_EXCEPTION (anything else).
#define EXSA_CHAT_TEMPLATE_PARSE (-10)   // the Jinja source does not parse
#define EXSA_CHAT_TEMPLATE_RENDER (-11)  // rendering failed (raise_exception, a missing variable, ...)
#define EXSA_CHAT_SCHEMA (-12)           // a tool's parameters (or the JSON schema) cannot become a grammar
#define EXSA_CHAT_BAD_REQUEST (-13)      // the request JSON is malformed or not OpenAI-shaped
#define EXSA_CHAT_OUTPUT_MISMATCH (-14)  // parse: the text does not match the format; diff: not a continuation

typedef struct exsa_chat_templates exsa_chat_templates;

// The model's own chat template, or `override_source` (Jinja source text; "chatml" for the
// built-in ChatML) when not NULL. `model` may be NULL only with an override.
int32_t exsa_chat_templates_init(const struct llama_model * model, const char * override_source, exsa_chat_templates ** out,
                                 exsa_error * err);
void exsa_chat_templates_free(exsa_chat_templates * templates);

// What the template can do, as llama.cpp's server reports it in /props: {"supports_tools": bool,
// "supports_tool_calls", "supports_system_role", "supports_parallel_tool_calls", ...}.
int32_t exsa_chat_templates_caps(const exsa_chat_templates * templates, char ** caps_json, exsa_error * err);

// The GBNF grammar (rule "root") of a JSON schema, by llama.cpp's converter (the one its server
// uses for response_format and tool parameters). EXSA_CHAT_SCHEMA when the schema cannot be one.
int32_t exsa_chat_json_schema_to_grammar(const char * schema_json, char ** grammar, exsa_error * err);

// Renders an OpenAI-shaped request:
//   {"messages": [...], "tools": [...], "tool_choice": "auto"|"none"|"required",
//    "parallel_tool_calls": bool (default: whether the template can), "add_generation_prompt": bool, "continue_final_message": true|"content"|"reasoning_content", "reasoning_format": "none"|"auto"|...,
//    "enable_thinking": bool, "chat_template_kwargs": {...}, "json_schema": {...}, "grammar": "...",
//    "now": seconds since the epoch (the time templates print; default: now)}
// (all but "messages" optional; what is left out takes llama-server's defaults: thinking where the
// template has it, "preserve_reasoning": true among the kwargs, whose "enable_thinking" switches
// thinking too) into
//   {"prompt", "format", "format_name", "grammar", "grammar_lazy", "generation_prompt",
//    "grammar_triggers": [{"type": "token"|"word"|"pattern"|"pattern_full", "value", "token"}],
//    "preserved_tokens": [...], "additional_stops": [...], "parser", "supports_thinking",
//    "thinking_start_tag", "thinking_end_tags": [...]}.
// *result is malloc'd: free it with exsa_chat_string_free.
int32_t exsa_chat_apply(const exsa_chat_templates * templates, const char * request_json, char ** result_json, exsa_error * err);

// Parses generated text under `params_json` ({"format", "parser", "generation_prompt"}: those
// fields of an apply result) into {"role", "content", "reasoning_content", "tool_calls": [...]}
// (OpenAI's message shape). `is_partial`: the text may stop mid-way.
int32_t exsa_chat_parse(const char * params_json, const char * text, size_t text_len, bool is_partial, char ** message_json,
                        exsa_error * err);

// The deltas from one parsed message to the next (as parse gives them):
//   [{"content_delta", "reasoning_content_delta", "tool_call_index" (or null), "tool_call": {"id", "name", "arguments"}}]
int32_t exsa_chat_diff(const char * previous_json, const char * next_json, char ** diffs_json, exsa_error * err);

void exsa_chat_string_free(char * s);

#ifdef __cplusplus
}
#endif
