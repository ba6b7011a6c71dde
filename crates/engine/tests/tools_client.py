"""Tool calling through the official `openai` Python client against a running `exsa serve`
(run by tools.rs).

Usage: tools_client.py BASE_URL MODEL_ID MODE [MARKER_TOKEN]
  MODE generic:     the default model, whose template knows no tools (the generic JSON format,
                    grammar-forced from the first token);
  MODE lfm2:        the synthetic LFM2 model with an LFM2 template of llama.cpp's corpus; its
                    random weights never start a call, so a logit bias on MARKER_TOKEN (the
                    `<|tool_call_start|>` token) starts it, and the format's grammar forces the rest;
  MODE unsupported: a backend without the chat layer: tools are a 400 "unsupported".
Exits 0 when every check holds; an assertion error names the first that did not.
"""

import json
import sys

import openai

base, model, mode = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def function(name, parameters):
    return {"type": "function", "function": {"name": name, "description": f"The {name.replace('_', ' ')}.", "parameters": parameters}}


if mode == "lfm2":
    # LFM2's format writes arguments as Python literals, which its grammar does not hold to a
    # schema (strings may run on): tools without parameters keep a forced call finite.
    tools = [function("get_time", {"type": "object", "properties": {}}), function("get_date", {"type": "object", "properties": {}})]
    forced = {"logit_bias": {sys.argv[4]: 100}}
else:
    city = {"type": "string", "enum": ["Paris", "London", "Tokyo"]}
    tools = [
        function("get_weather", {"type": "object", "properties": {"city": city}, "required": ["city"]}),
        function("get_time", {"type": "object", "properties": {"city": city, "utc": {"type": "boolean"}}, "required": ["city", "utc"]}),
    ]
    forced = {}
names = [t["function"]["name"] for t in tools]
question = [{"role": "user", "content": "What is the weather in Paris, and what time is it there?"}]


def create(**kwargs):
    return client.chat.completions.create(model=model, **{"temperature": 0, "max_tokens": 96, **kwargs})


if mode == "unsupported":
    try:
        create(messages=question, tools=tools)
        raise AssertionError("a backend without Jinja templates accepted tools")
    except openai.BadRequestError as e:
        assert e.body["code"] == "unsupported", e.body
    sys.exit(0)


def check_call(call, name=None):
    """A forced call: a known (or the named) function, an id, arguments that parse as JSON and
    fit the tool's schema."""
    assert call.type == "function" and call.id, call
    assert call.function.name in names, call
    if name is not None:
        assert call.function.name == name, (call, name)
    arguments = json.loads(call.function.arguments)
    schema = tools[names.index(call.function.name)]["function"]["parameters"]
    assert isinstance(arguments, dict) and set(schema.get("required", [])) <= set(arguments) <= set(schema["properties"]), arguments
    for key, value in arguments.items():
        kind = schema["properties"][key]
        if "enum" in kind:
            assert value in kind["enum"], (key, value)
        if kind.get("type") == "boolean":
            assert isinstance(value, bool), (key, value)
    return arguments


# A required call, whole: message.tool_calls, no content, finish_reason tool_calls.
whole = create(messages=question, tools=tools, tool_choice="required", **forced)
choice = whole.choices[0]
assert choice.finish_reason == "tool_calls", choice
assert choice.message.content is None and len(choice.message.tool_calls) == 1, choice.message
call = choice.message.tool_calls[0]
check_call(call)

# The same streamed: the id, type and name come first, then argument fragments, which assemble
# to the whole response's call.
chunks = list(create(messages=question, tools=tools, tool_choice="required", stream=True, **forced))
deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
assert deltas and deltas[0].id and deltas[0].type == "function" and deltas[0].function.name, deltas
assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:]), deltas
streamed = "".join(d.function.arguments or "" for d in deltas)
assert (deltas[0].function.name, streamed) == (call.function.name, call.function.arguments), (streamed, call)
assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls", chunks[-1]

# A named function is always the one called.
for name in names:
    named = create(messages=question, tools=tools, tool_choice={"type": "function", "function": {"name": name}}, **forced)
    check_call(named.choices[0].message.tool_calls[0], name)

# The round trip: the call and its result go back; the answer is text (no bias now).
result = {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"result": "18 C and sunny" if "weather" in call.function.name else "14:05"})}
history = question + [choice.message.model_dump(exclude_none=True), result]
answer = create(messages=history, tools=tools, tool_choice="none", max_tokens=24)
assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content, answer.choices[0]
assert answer.choices[0].finish_reason in ("stop", "length"), answer.choices[0]

if mode == "generic":
    # tool_choice none never calls, even asked to.
    for _ in range(2):
        prose = create(messages=question, tools=tools, tool_choice="none", max_tokens=32)
        assert prose.choices[0].message.tool_calls is None and prose.choices[0].finish_reason != "tool_calls", prose.choices[0]
    # auto: whatever the model chooses is a well-formed reply (a call that fits, or text).
    auto = create(messages=question, tools=tools, max_tokens=128)
    message = auto.choices[0].message
    if message.tool_calls:
        [check_call(c) for c in message.tool_calls]
        assert auto.choices[0].finish_reason == "tool_calls"
    else:
        assert message.content is not None


# Bad input: a 400 naming the field.
def refused(field, **kwargs):
    try:
        create(max_tokens=4, **kwargs)
    except openai.BadRequestError as e:
        assert e.body["param"] == field, (field, e.body)
        return
    raise AssertionError(f"accepted: {kwargs}")


refused("tools", messages=question, tools=[{"type": "function", "function": {"parameters": {"type": "object"}}}])
refused("tools", messages=question, tools=[function("f", "not a schema")])
refused("tools", messages=question, tools=[function("f", {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}})])
refused("tool_choice", messages=question, tools=tools, tool_choice={"type": "function", "function": {"name": "no_such_tool"}})
refused("tool_choice", messages=question, tool_choice="required")
refused("messages", messages=question + [{"role": "tool", "content": "a result for no call"}])
refused("grammar", messages=question, tools=tools, extra_body={"grammar": "root ::= \"x\""})
refused("echo", messages=question, extra_body={"echo": True})
refused("some_new_field", messages=question, extra_body={"some_new_field": 1})
# Fields that cannot change the output are accepted.
create(messages=question, max_tokens=2, user="u1", metadata={"k": "v"}, store=False, service_tier="auto")
print("ok")
