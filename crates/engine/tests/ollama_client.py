"""The official `ollama` Python client against a running `exsa serve` (run by ollama_client.rs).

Usage: ollama_client.py BASE_URL MODEL ON_DEMAND_MODEL BACKEND JINJA. MODEL was given with --model
(pinned); ON_DEMAND_MODEL comes from --models-dir (loaded on its first request); grammars (JSON
format) are refused on every BACKEND but source, tools where JINJA is "no-jinja" (a build without
llama.cpp's chat layer). Exits 0 when every check holds; an assertion error names the first that
did not.
"""

import json
import math
import sys
import time
import urllib.request

import ollama

base, model, on_demand, backend, jinja = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "jinja"
client = ollama.Client(host=base, timeout=120)
greedy = {"temperature": 0, "num_predict": 12}

# The server answers Ollama's probes.
with urllib.request.urlopen(base + "/") as r:
    assert r.read() == b"Ollama is running"
with urllib.request.urlopen(base + "/api/version") as r:
    assert json.load(r)["version"]

# Models: every one served, by Ollama's name:tag.
names = [m.model for m in client.list().models]
assert f"{model}:latest" in names and f"{on_demand}:latest" in names, names

# Chat, whole and streamed: the same greedy text; the last object has the counts and durations.
messages = [{"role": "user", "content": "Name three fruits."}]
whole = client.chat(model=model, messages=messages, options=greedy)
assert whole.message.role == "assistant" and whole.message.content, whole
assert whole.done and whole.done_reason == "length", whole
assert whole.eval_count == 12 and whole.prompt_eval_count > 0 and whole.total_duration > 0 and whole.eval_duration > 0, whole
parts = list(client.chat(model=model + ":latest", messages=messages, options=greedy, stream=True))
assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].done_reason == "length", parts[-1]
assert "".join(p.message.content or "" for p in parts) == whole.message.content

# The same prompt through OpenAI's route gives the same greedy text.
body = json.dumps({"model": model, "messages": messages, "max_tokens": 12, "temperature": 0}).encode()
req = urllib.request.Request(base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req) as r:
    openai_text = json.load(r)["choices"][0]["message"]["content"]
assert openai_text == whole.message.content, (openai_text, whole.message.content)

# Generate, whole and streamed, with a system prompt and a stop sequence; raw skips the template.
gen = client.generate(model=model, prompt="Count: one, two,", system="You count.", options={**greedy, "stop": ["five"]})
assert gen.done and gen.response and "five" not in gen.response, gen
streamed = list(client.generate(model=model, prompt="Count: one, two,", system="You count.", options={**greedy, "stop": ["five"]}, stream=True))
assert "".join(p.response for p in streamed) == gen.response and streamed[-1].done
raw = client.generate(model=model, prompt="The capital of France is", raw=True, options=greedy)
assert raw.response and raw.eval_count <= 12, raw

# JSON output: "json" and a schema, through the grammar (refused by name where grammars are).
if backend != "source":
    try:
        client.chat(model=model, messages=[{"role": "user", "content": "A cat as JSON."}], format="json")
        raise AssertionError(f"a grammar was accepted on backend {backend}")
    except ollama.ResponseError as e:
        assert e.status_code == 400 and "grammar" in e.error, e
else:
    as_json = client.chat(model=model, messages=[{"role": "user", "content": "Describe a cat as JSON."}], format="json",
                          options={"temperature": 0, "num_predict": 64})
    if as_json.done_reason == "stop":
        assert isinstance(json.loads(as_json.message.content), dict), as_json.message.content
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}
    shaped = client.chat(model=model, messages=[{"role": "user", "content": "A person."}], format=schema, options={"temperature": 0, "num_predict": 64})
    if shaped.done_reason == "stop":
        person = json.loads(shaped.message.content)
        assert isinstance(person["name"], str) and isinstance(person["age"], int), person

# Options the server does not have are refused by name, never ignored.
try:
    client.chat(model=model, messages=messages, options={"mirostat": 2})
    raise AssertionError("mirostat was accepted")
except ollama.ResponseError as e:
    assert e.status_code == 400 and "mirostat" in e.error, e

# A tool call round trip: the call in the history, its result, and the reply.
tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
history = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "Sunny, 21 degrees", "tool_name": "get_weather"},
]
if not jinja:
    # A build without llama.cpp's Jinja layer (the crate baseline's, raw FFI's): tools are
    # refused by name.
    try:
        client.chat(model=model, messages=history, tools=tools, options=greedy)
        raise AssertionError(f"tools were accepted without the chat layer (backend {backend})")
    except ollama.ResponseError as e:
        assert e.status_code == 400 and "tools" in e.error, e
else:
    reply = client.chat(model=model, messages=history, tools=tools, options=greedy)
    assert reply.done and (reply.message.content or reply.message.tool_calls), reply
    for call in reply.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict), call

# Images: no vision model here, a clear error.
try:
    client.chat(model=model, messages=[{"role": "user", "content": "What is this?", "images": [b"\x89PNG"]}])
    raise AssertionError("an image was accepted")
except ollama.ResponseError as e:
    assert e.status_code == 400 and "vision" in e.error, e

# Embeddings: normalised by /api/embed, as the model pools them by /api/embeddings.
embedded = client.embed(model=model, input=["A cat sat on the mat.", "Stock markets fell today."])
assert len(embedded.embeddings) == 2
for v in embedded.embeddings:
    assert abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4
# A text alone and beside another are decoded differently and round differently (this model
# amplifies it: tests/embeddings.rs' tolerance), so they are compared by cosine.
single = client.embeddings(model=model, prompt="A cat sat on the mat.").embedding
norm = math.sqrt(sum(x * x for x in single))
assert len(single) == len(embedded.embeddings[0])
cosine = sum(a * b / norm for a, b in zip(embedded.embeddings[0], single))
assert cosine > 0.997, cosine

# Show: family, size, quantization, context length, template.
shown = client.show(model)
assert shown.details.family == "gemma3" and shown.details.quantization_level == "Q4_K_M", shown.details
assert shown.details.parameter_size.endswith("M") and shown.template, shown
assert shown.modelinfo["gemma3.context_length"] >= 8192, shown.modelinfo

# Loading, ps and keep_alive: the on-demand model loads for a request, shows in ps with an
# expiry, and keep_alive 0 unloads it; the pinned model stays.
client.generate(model=on_demand, prompt="hello", options={"num_predict": 2}, keep_alive="10m")
loaded = {m.model: m for m in client.ps().models}
assert f"{on_demand}:latest" in loaded and f"{model}:latest" in loaded, loaded
assert loaded[f"{on_demand}:latest"].size > 0 and loaded[f"{on_demand}:latest"].expires_at is not None
client.generate(model=on_demand, keep_alive=0)
deadline = time.time() + 15
while f"{on_demand}:latest" in [m.model for m in client.ps().models]:
    assert time.time() < deadline, "keep_alive 0 did not unload the model"
    time.sleep(0.2)
assert f"{model}:latest" in [m.model for m in client.ps().models]

# A name the server does not have.
try:
    client.chat(model="no-such-model", messages=messages)
    raise AssertionError("an unknown model answered")
except ollama.ResponseError as e:
    assert e.status_code == 404 and "no-such-model" in e.error, e

# Managing models goes through files, not the API.
try:
    client.pull("llama3")
    raise AssertionError("pull was accepted")
except ollama.ResponseError as e:
    assert e.status_code == 501 and "--models-dir" in e.error, e

print("ok")
