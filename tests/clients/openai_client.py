"""A real OpenAI client against `tavernsim serve --demo`: one completion,
then one stream. Usage: openai_client.py http://127.0.0.1:PORT"""
import sys

import openai

base = sys.argv[1]
# max_retries=0: the proxy's retries are what get past the mock's 429s.
client = openai.OpenAI(base_url=base + "/v1", api_key="demo-token", max_retries=0, timeout=60)
messages = [{"role": "user", "content": "hello from the openai package"}]

r = client.chat.completions.create(model="mock-1", messages=messages)
text = r.choices[0].message.content
assert "fp=" in text, f"no fingerprint in the completion: {r!r}"

stream = client.chat.completions.create(model="mock-1", messages=messages, stream=True)
streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
assert streamed == text, f"the stream said {streamed!r}, the completion {text!r}"

try:
    openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
        model="mock-1", messages=messages)
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert "not signed in" in str(e), str(e)

print("OK openai", openai.__version__, "|", text)
