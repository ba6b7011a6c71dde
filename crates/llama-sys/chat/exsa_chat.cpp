// See exsa_chat.h. Each stage runs in its own guard so that its failure gets its own code: the
// request (BAD_REQUEST), the tools' schemas (SCHEMA), the template (TEMPLATE_PARSE,
// TEMPLATE_RENDER), the generated text (OUTPUT_MISMATCH).

#include "exsa_chat.h"
#include "exsa_guard.h"

#include "chat.h"
#include "json-schema-to-grammar.h"

#include <chrono>
#include <ctime>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

struct exsa_chat_templates {
    common_chat_templates_ptr templates;
    // llama-server's defaults for what a request leaves out, worked out once: thinking on where
    // the template has it, parallel calls where it can render them.
    bool thinking_by_default;
    bool parallel_by_default;
};

namespace {

// A malloc'd, NUL-terminated copy, for the caller to free with exsa_chat_string_free.
char * to_c_string(const std::string & s) {
    char * out = static_cast<char *>(std::malloc(s.size() + 1));
    if (out == nullptr) {
        throw std::bad_alloc();
    }
    std::memcpy(out, s.data(), s.size());
    out[s.size()] = '\0';
    return out;
}

// `code` when the guarded stage failed, EXSA_OK otherwise.
template <class F> int32_t stage(int32_t code, exsa_error * err, F && f) noexcept {
    return exsa::fatal_guarded(err, f) == EXSA_OK ? EXSA_OK : code;
}

const char * trigger_type_name(common_grammar_trigger_type type) {
    switch (type) {
        case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:
            return "token";
        case COMMON_GRAMMAR_TRIGGER_TYPE_WORD:
            return "word";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:
            return "pattern";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL:
            return "pattern_full";
    }
    return "unknown";
}

// What a request leaves out takes llama-server's defaults (`templates`'), so that a request renders
// as llama-server renders it.
common_chat_templates_inputs parse_request(const char * request_json, const exsa_chat_templates & templates) {
    const common_json request = common_json::parse(request_json);
    if (!request.is_object()) {
        throw std::invalid_argument("the request is not a JSON object");
    }
    if (!request.contains("messages")) {
        throw std::invalid_argument("the request has no \"messages\"");
    }
    common_chat_templates_inputs inputs;
    inputs.messages = common_chat_msgs_parse_oaicompat(request.at("messages"));
    if (request.contains("tools") && !request.at("tools").is_null()) {
        inputs.tools = common_chat_tools_parse_oaicompat(request.at("tools"));
    }
    if (request.contains("tool_choice")) {
        inputs.tool_choice = common_chat_tool_choice_parse_oaicompat(request.at("tool_choice").get<std::string>());
    }
    inputs.parallel_tool_calls   = request.value("parallel_tool_calls", templates.parallel_by_default);
    inputs.add_generation_prompt = request.value("add_generation_prompt", true);
    // true (or "content", "reasoning_content"): the last assistant message is a reply to continue.
    if (request.contains("continue_final_message")) {
        inputs.continue_final_message = common_chat_continuation_parse(request.at("continue_final_message"));
    }
    if (request.contains("reasoning_format")) {
        inputs.reasoning_format = common_reasoning_format_from_name(request.at("reasoning_format").get<std::string>());
    }
    inputs.enable_thinking = request.value("enable_thinking", templates.thinking_by_default);
    // llama-server keeps earlier turns' reasoning where the template can (its default).
    inputs.chat_template_kwargs["preserve_reasoning"] = "true";
    if (request.contains("chat_template_kwargs")) {
        const common_json & kwargs = request.at("chat_template_kwargs");
        if (!kwargs.is_object()) {
            throw std::invalid_argument("\"chat_template_kwargs\" is not an object");
        }
        for (const auto & [key, value] : kwargs.items()) {
            inputs.chat_template_kwargs[key] = value.dump();
        }
        // As llama-server reads it: the kwarg switches thinking too.
        if (kwargs.contains("enable_thinking")) {
            if (!kwargs.at("enable_thinking").is_boolean()) {
                throw std::invalid_argument("\"enable_thinking\" in chat_template_kwargs is not a boolean");
            }
            inputs.enable_thinking = kwargs.at("enable_thinking").get<bool>();
        }
    }
    if (request.contains("json_schema") && !request.at("json_schema").is_null()) {
        inputs.json_schema = request.at("json_schema").dump();
    }
    inputs.grammar = request.value("grammar", std::string());
    // The time templates print (strftime_now), in seconds since the epoch; now by default.
    if (request.contains("now")) {
        inputs.now = std::chrono::system_clock::from_time_t(static_cast<std::time_t>(request.at("now").get<int64_t>()));
    }
    return inputs;
}

// Each tool's parameters, converted on their own first, so that a schema error names its tool
// (inside apply it would read like any other failure).
void check_schemas(const common_chat_templates_inputs & inputs) {
    for (const auto & tool : inputs.tools) {
        try {
            json_schema_to_grammar(common_json::parse(tool.parameters.empty() ? "{}" : tool.parameters));
        } catch (const std::exception & e) {
            throw std::invalid_argument("tool \"" + tool.name + "\": " + e.what());
        }
    }
    if (!inputs.json_schema.empty()) {
        json_schema_to_grammar(common_json::parse(inputs.json_schema));
    }
}

std::string result_json(const common_chat_params & params) {
    common_json triggers = common_json::array();
    for (const auto & trigger : params.grammar_triggers) {
        common_json t = common_json::object();
        t["type"]  = trigger_type_name(trigger.type);
        t["value"] = trigger.value;
        t["token"] = static_cast<int64_t>(trigger.token);
        triggers.push_back(t);
    }
    common_json out = common_json::object();
    out["prompt"]             = params.prompt;
    out["format"]             = static_cast<int64_t>(params.format);
    out["format_name"]        = std::string(common_chat_format_name(params.format));
    out["grammar"]            = params.grammar;
    out["grammar_lazy"]       = params.grammar_lazy;
    out["generation_prompt"]  = params.generation_prompt;
    out["grammar_triggers"]   = triggers;
    out["preserved_tokens"]   = params.preserved_tokens;
    out["additional_stops"]   = params.additional_stops;
    out["parser"]             = params.parser;
    out["supports_thinking"]  = params.supports_thinking;
    out["thinking_start_tag"] = params.thinking_start_tag;
    out["thinking_end_tags"]  = params.thinking_end_tags;
    return out.dump();
}

// One message in OpenAI's shape, as parse writes it.
common_chat_msg message_from_json(const char * json) {
    common_json array = common_json::array();
    array.push_back(common_json::parse(json));
    auto messages = common_chat_msgs_parse_oaicompat(array);
    return messages.at(0);
}

}  // namespace

extern "C" {

int32_t exsa_chat_templates_init(const llama_model * model, const char * override_source, exsa_chat_templates ** out,
                                 exsa_error * err) {
    if (out == nullptr) {
        exsa::set_error(err, "exsa_chat_templates_init: out is null");
        return EXSA_CHAT_BAD_REQUEST;
    }
    *out = nullptr;
    const std::string override_text = override_source != nullptr ? override_source : "";
    if (model == nullptr && override_text.empty()) {
        exsa::set_error(err, "a chat template needs a model or a template source");
        return EXSA_CHAT_BAD_REQUEST;
    }
    // Parsed once on its own first: common_chat_templates_init reports a parse error as a bare
    // std::exception, without its message.
    int32_t code = stage(EXSA_CHAT_TEMPLATE_PARSE, err, [&] {
        std::string source = override_text;
        if (source.empty()) {
            const char * own = llama_model_chat_template(model, nullptr);
            source = own != nullptr ? own : "";
        }
        if (!source.empty() && source != "chatml") {
            common_chat_template parsed(source, "", "");
        }
    });
    if (code != EXSA_OK) {
        return code;
    }
    return stage(EXSA_CHAT_TEMPLATE_PARSE, err, [&] {
        auto templates = common_chat_templates_init(model, override_text);
        if (!templates) {
            throw std::runtime_error("llama.cpp gave no chat template");
        }
        const bool thinking = common_chat_templates_support_enable_thinking(templates.get());
        const bool parallel = common_chat_templates_get_caps(templates.get())["supports_parallel_tool_calls"];
        *out = new exsa_chat_templates{ std::move(templates), thinking, parallel };
    });
}

void exsa_chat_templates_free(exsa_chat_templates * templates) {
    delete templates;
}

int32_t exsa_chat_templates_caps(const exsa_chat_templates * templates, char ** caps_json, exsa_error * err) {
    if (templates == nullptr || caps_json == nullptr) {
        exsa::set_error(err, "exsa_chat_templates_caps: a null argument");
        return EXSA_CHAT_BAD_REQUEST;
    }
    *caps_json = nullptr;
    return exsa::fatal_guarded(err, [&] {
        common_json out = common_json::object();
        for (const auto & [name, value] : common_chat_templates_get_caps(templates->templates.get())) {
            out[name] = value;
        }
        *caps_json = to_c_string(out.dump());
    });
}

int32_t exsa_chat_json_schema_to_grammar(const char * schema_json, char ** grammar, exsa_error * err) {
    if (schema_json == nullptr || grammar == nullptr) {
        exsa::set_error(err, "exsa_chat_json_schema_to_grammar: a null argument");
        return EXSA_CHAT_BAD_REQUEST;
    }
    *grammar = nullptr;
    common_json schema;
    int32_t code = stage(EXSA_CHAT_BAD_REQUEST, err, [&] { schema = common_json::parse(schema_json); });
    if (code != EXSA_OK) {
        return code;
    }
    std::string text;
    code = stage(EXSA_CHAT_SCHEMA, err, [&] { text = json_schema_to_grammar(schema); });
    if (code != EXSA_OK) {
        return code;
    }
    return exsa::fatal_guarded(err, [&] { *grammar = to_c_string(text); });
}

int32_t exsa_chat_apply(const exsa_chat_templates * templates, const char * request_json, char ** result, exsa_error * err) {
    if (templates == nullptr || request_json == nullptr || result == nullptr) {
        exsa::set_error(err, "exsa_chat_apply: a null argument");
        return EXSA_CHAT_BAD_REQUEST;
    }
    *result = nullptr;
    common_chat_templates_inputs inputs;
    int32_t code = stage(EXSA_CHAT_BAD_REQUEST, err, [&] { inputs = parse_request(request_json, *templates); });
    if (code != EXSA_OK) {
        return code;
    }
    code = stage(EXSA_CHAT_SCHEMA, err, [&] { check_schemas(inputs); });
    if (code != EXSA_OK) {
        return code;
    }
    common_chat_params params;
    code = stage(EXSA_CHAT_TEMPLATE_RENDER, err, [&] { params = common_chat_templates_apply(templates->templates.get(), inputs); });
    if (code != EXSA_OK) {
        return code;
    }
    return exsa::fatal_guarded(err, [&] { *result = to_c_string(result_json(params)); });
}

int32_t exsa_chat_parse(const char * params_json, const char * text, size_t text_len, bool is_partial, char ** message_json,
                        exsa_error * err) {
    if (params_json == nullptr || (text == nullptr && text_len > 0) || message_json == nullptr) {
        exsa::set_error(err, "exsa_chat_parse: a null argument");
        return EXSA_CHAT_BAD_REQUEST;
    }
    *message_json = nullptr;
    common_chat_parser_params params;
    int32_t code = stage(EXSA_CHAT_BAD_REQUEST, err, [&] {
        const common_json json = common_json::parse(params_json);
        const int64_t format = json.at("format").get<long long>();
        if (format < 0 || format >= COMMON_CHAT_FORMAT_COUNT) {
            throw std::invalid_argument("unknown chat format " + std::to_string(format));
        }
        params.format            = static_cast<common_chat_format>(format);
        params.generation_prompt = json.value("generation_prompt", std::string());
        const std::string parser = json.value("parser", std::string());
        if (!parser.empty()) {
            params.parser.load(parser);
        }
    });
    if (code != EXSA_OK) {
        return code;
    }
    common_chat_msg message;
    code = stage(EXSA_CHAT_OUTPUT_MISMATCH, err, [&] {
        message = common_chat_parse(std::string(text != nullptr ? text : "", text_len), is_partial, params);
    });
    if (code != EXSA_OK) {
        return code;
    }
    return exsa::fatal_guarded(err, [&] {
        message.role = "assistant";
        *message_json = to_c_string(message.to_json_oaicompat().dump());
    });
}

int32_t exsa_chat_diff(const char * previous_json, const char * next_json, char ** diffs_json, exsa_error * err) {
    if (previous_json == nullptr || next_json == nullptr || diffs_json == nullptr) {
        exsa::set_error(err, "exsa_chat_diff: a null argument");
        return EXSA_CHAT_BAD_REQUEST;
    }
    *diffs_json = nullptr;
    common_chat_msg previous;
    common_chat_msg next;
    int32_t code = stage(EXSA_CHAT_BAD_REQUEST, err, [&] {
        previous = message_from_json(previous_json);
        next     = message_from_json(next_json);
    });
    if (code != EXSA_OK) {
        return code;
    }
    std::vector<common_chat_msg_diff> diffs;
    code = stage(EXSA_CHAT_OUTPUT_MISMATCH, err, [&] { diffs = common_chat_msg_diff::compute_diffs(previous, next); });
    if (code != EXSA_OK) {
        return code;
    }
    return exsa::fatal_guarded(err, [&] {
        common_json out = common_json::array();
        for (const auto & diff : diffs) {
            common_json d = common_json::object();
            d["content_delta"]           = diff.content_delta;
            d["reasoning_content_delta"] = diff.reasoning_content_delta;
            if (diff.tool_call_index == std::string::npos) {
                d["tool_call_index"] = nullptr;
            } else {
                d["tool_call_index"] = static_cast<int64_t>(diff.tool_call_index);
            }
            common_json call = common_json::object();
            call["id"]        = diff.tool_call_delta.id;
            call["name"]      = diff.tool_call_delta.name;
            call["arguments"] = diff.tool_call_delta.arguments;
            d["tool_call"]    = call;
            out.push_back(d);
        }
        *diffs_json = to_c_string(out.dump());
    });
}

void exsa_chat_string_free(char * s) {
    std::free(s);
}

}  // extern "C"
