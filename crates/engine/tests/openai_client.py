"""The official `openai` Python client against a running `exsa serve` (run by openai_client.rs).

Usage: openai_client.py BASE_URL API_KEY MODEL_ID BACKEND. Exits 0 when every check holds; an
assertion error names the first that did not.
"""

import json
import sys

import openai

base, key, model, backend = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)

# Models.
assert [m.id for m in client.models.list()] == [model]

# Chat, whole and streamed: the same greedy text, the role first, usage at the end.
messages = [{"role": "user", "content": "Name three fruits."}]
whole = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
text = whole.choices[0].message.content
assert whole.choices[0].finish_reason == "length", whole
assert whole.usage.completion_tokens == 16 and whole.usage.prompt_tokens > 0, whole.usage

chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert streamed == text, (streamed, text)
assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens_details.cached_tokens > 0, chunks[-1]

# Log-probabilities of the tokens chosen.
with_logprobs = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
content = with_logprobs.choices[0].logprobs.content
assert len(content) == 4 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content), content

# Text completions, with a stop sequence.
completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stop=["\n"])
assert completion.choices[0].finish_reason in ("stop", "length") and "\n" not in completion.choices[0].text, completion

# Structured output: the reply is JSON that fits the schema (backend source; the crate
# baseline and raw FFI refuse grammars).
schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30}},
          "required": ["city", "country"]}
response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
place_messages = [{"role": "user", "content": "Name a city and its country, as JSON."}]
if backend == "source":
    place = client.chat.completions.create(model=model, messages=place_messages, max_tokens=64, temperature=0, response_format=response_format)
    parsed = json.loads(place.choices[0].message.content)
    assert list(parsed) == ["city", "country"] and all(isinstance(v, str) for v in parsed.values()), parsed
else:
    try:
        client.chat.completions.create(model=model, messages=place_messages, max_tokens=8, response_format=response_format)
        raise AssertionError(f"backend {backend} accepted a grammar")
    except openai.BadRequestError as e:
        assert e.body["code"] == "unsupported", e.body

# Embeddings, one per input, in order.
embeddings = client.embeddings.create(model=model, input=["first text", "second text"])
assert [d.index for d in embeddings.data] == [0, 1] and len(embeddings.data[0].embedding) == 640, embeddings.data[0]
assert embeddings.data[0].embedding != embeddings.data[1].embedding

# Errors as the client's typed exceptions.
try:
    openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    pass
# One model served: it answers whatever name the client sends (as llama-server does).
other = client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=4, temperature=0)
assert other.model == model and other.system_fingerprint.startswith("b"), other
# Several choices, each a whole reply, and streamed side by side: each chunk names its choice.
two = client.chat.completions.create(model=model, messages=messages, max_tokens=4, n=2, temperature=0)
assert [c.index for c in two.choices] == [0, 1] and two.choices[0].message.content == two.choices[1].message.content, two
chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=4, n=2, temperature=0, stream=True))
for i in (0, 1):
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
    assert text == two.choices[i].message.content, (i, text)

print("openai client: every check passed")
