"""The official OpenAI Python SDK against an lmgrid gateway.

Run by crates/lmgrid/tests/client_sdks.rs with the Python of the venv that `cargo xtask deps`
builds from xtask/python/requirements-sdk.txt, against a gateway (`lmgrid up`, or separate
processes) serving the real models:

    python openai_sdk.py --base-url http://127.0.0.1:8080/v1 \
        --embedding-model all-minilm-l6-v2 --generation-model smollm2-135m-instruct \
        [--api-key KEY]

With `--api-key` the client uses that tenant key, and the `keys` check makes sure a wrong key
is refused.

Each check prints `ok: NAME` or `FAILED: NAME` with the reason; every check runs even when an
earlier one failed, and the exit status is 1 if any failed. `--only NAME,...` runs a subset.
"""

import argparse
import math
import sys
import traceback

import openai


def norm(vector):
    return math.sqrt(sum(v * v for v in vector))


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (norm(a) * norm(b))


class Checks:
    def __init__(self, client, embedding_model, generation_model, keys_required):
        self.client = client
        self.keys_required = keys_required
        self.embedding_model = embedding_model
        self.generation_model = generation_model

    def models(self):
        listed = self.client.models.list()
        ids = [model.id for model in listed.data]
        for wanted in (self.embedding_model, self.generation_model):
            assert wanted in ids, f"{wanted} not in {ids}"
        model = self.client.models.retrieve(self.embedding_model)
        assert model.id == self.embedding_model, model
        assert model.object == "model" and model.owned_by == "lmgrid", model

    def embeddings(self):
        texts = [
            "The capital of France is Paris.",
            "Paris is France's capital city.",
            "Turtles can live for more than a hundred years.",
        ]
        # The SDK asks for base64 unless told otherwise, and decodes it.
        default = self.client.embeddings.create(model=self.embedding_model, input=texts)
        assert default.object == "list" and default.model == self.embedding_model, default
        assert [item.index for item in default.data] == [0, 1, 2], default.data
        vectors = [item.embedding for item in default.data]
        for vector in vectors:
            assert len(vector) == 384, len(vector)
            assert abs(norm(vector) - 1.0) < 1e-4, norm(vector)
        assert default.usage.prompt_tokens > 0, default.usage
        # Two sentences about Paris are closer to each other than to the one about turtles.
        assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2, [
            cosine(vectors[0], vectors[1]),
            cosine(vectors[0], vectors[2]),
        ]
        # 384 floats as JSON are several KiB: the SDK asks for gzip and gets it.
        raw = self.client.embeddings.with_raw_response.create(
            model=self.embedding_model, input=texts[0], encoding_format="float"
        )
        assert raw.headers.get("content-encoding") == "gzip", dict(raw.headers)
        assert "accept-encoding" in raw.headers.get("vary", "").lower(), dict(raw.headers)
        floats = raw.parse()
        assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, vectors[0])) < 1e-6
        short = self.client.embeddings.create(
            model=self.embedding_model, input=texts[0], dimensions=64
        )
        assert len(short.data[0].embedding) == 64, len(short.data[0].embedding)

    def chat(self):
        raw = self.client.chat.completions.with_raw_response.create(
            model=self.generation_model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=32,
            extra_headers={"x-request-id": "sdk-chat-1"},
        )
        assert raw.headers.get("x-request-id") == "sdk-chat-1", dict(raw.headers)
        completion = raw.parse()
        assert completion.object == "chat.completion", completion
        assert completion.id.startswith("chatcmpl-"), completion.id
        choice = completion.choices[0]
        assert choice.message.role == "assistant", choice
        assert "Paris" in choice.message.content, repr(choice.message.content)
        assert choice.finish_reason in ("stop", "length"), choice.finish_reason
        usage = completion.usage
        assert usage.prompt_tokens > 0 and usage.completion_tokens > 0, usage
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage

    def chat_stream(self):
        stream = self.client.chat.completions.create(
            model=self.generation_model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        with_text = [c for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(with_text) >= 2, f"{len(with_text)} chunks with text"
        assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Paris" in text, repr(text)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes in (["stop"], ["length"]), finishes
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None, last
        assert last.usage.completion_tokens > 0, last.usage
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert len({c.id for c in chunks}) == 1, "one id for the whole stream"

    def completions(self):
        completion = self.client.completions.create(
            model=self.generation_model,
            prompt="The capital of France is",
            max_tokens=8,
            temperature=0,
        )
        assert completion.object == "text_completion", completion
        assert completion.id.startswith("cmpl-"), completion.id
        choice = completion.choices[0]
        assert choice.text.strip(), repr(choice.text)
        assert choice.finish_reason in ("stop", "length"), choice.finish_reason
        assert completion.usage.completion_tokens <= 8, completion.usage
        streamed = self.client.completions.create(
            model=self.generation_model,
            prompt="The capital of France is",
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        text = "".join(chunk.choices[0].text for chunk in streamed if chunk.choices)
        # Greedy decoding: the stream says what the unary call said.
        assert text == choice.text, (text, choice.text)

    def errors(self):
        try:
            self.client.models.retrieve("no-such-model")
            raise AssertionError("retrieving an unknown model succeeded")
        except openai.NotFoundError as error:
            assert error.code == "model_not_found", error.body
        try:
            self.client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}]
            )
            raise AssertionError("chatting with an unknown model succeeded")
        except openai.NotFoundError as error:
            assert error.code == "model_not_found", error.body
            assert error.param == "model", error.body
        try:
            self.client.chat.completions.create(
                model=self.generation_model,
                messages=[{"role": "user", "content": "hi"}],
                temperature=5,
            )
            raise AssertionError("temperature 5 was accepted")
        except openai.BadRequestError as error:
            assert error.param == "temperature", error.body
            assert error.type == "invalid_request_error", error.body
        try:
            self.client.chat.completions.create(
                model=self.embedding_model, messages=[{"role": "user", "content": "hi"}]
            )
            raise AssertionError("an embedding model chatted")
        except openai.BadRequestError as error:
            assert "embedding model" in error.message, error.message
        try:
            self.client.embeddings.create(model=self.embedding_model, input=[[101, 2023, 102]])
            raise AssertionError("token-id input was accepted")
        except openai.BadRequestError as error:
            assert error.param == "input", error.body


    def keys(self):
        if not self.keys_required:
            return
        wrong = self.client.with_options(api_key="lmg-not-a-key")
        try:
            wrong.models.list()
            raise AssertionError("a wrong key listed the models")
        except openai.AuthenticationError as error:
            assert error.status_code == 401, error.body


CHECKS = ["models", "embeddings", "chat", "chat_stream", "completions", "errors", "keys"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--embedding-model", required=True)
    parser.add_argument("--generation-model", required=True)
    parser.add_argument("--api-key", help="a tenant's API key; keys are then required")
    parser.add_argument("--only", default=",".join(CHECKS))
    args = parser.parse_args()

    # Without --api-key the gateway takes any key (keyless loopback access of `lmgrid up`);
    # the SDK insists on one.
    client = openai.OpenAI(
        base_url=args.base_url,
        api_key=args.api_key or "lmgrid-test-key",
        max_retries=0,
        timeout=120,
    )
    checks = Checks(client, args.embedding_model, args.generation_model, bool(args.api_key))
    failed = []
    selected = args.only.split(",")
    for name in selected:
        if name not in CHECKS:
            parser.error(f"unknown check {name!r}; expected some of {CHECKS}")
        try:
            getattr(checks, name)()
            print(f"ok: {name}", flush=True)
        except Exception:  # noqa: BLE001 - every failure is reported, then the next check runs
            failed.append(name)
            print(f"FAILED: {name}\n{traceback.format_exc()}", flush=True)
    passed = len(selected) - len(failed)
    print(f"openai {openai.__version__}: {passed} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
