"""Triton's Open Inference Protocol clients (tritonclient.grpc and tritonclient.http) against
an lmgrid gateway.

Run by the tests in crates/lmgrid/tests/client_sdks.rs with the Python of the venv that
`cargo xtask deps` builds from xtask/python/requirements-sdk.txt, against a gateway serving
the tensor fixtures `add_mul` (FP32 a, b [-1, 4] -> sum, product), `identity_fp16`
(FP16 x [-1, 3] -> y) and `identity_bytes` (BYTES x [-1, 2] -> y):

    python oip_client.py --http 127.0.0.1:8080 --grpc 127.0.0.1:8081 [--api-key KEY]

With `--api-key`, model calls send `Authorization: Bearer KEY`, and calls without it must be
refused. Answers asked for compressed (`Accept-Encoding`) must come back compressed. Each
check prints `ok: NAME` or `FAILED: NAME` with the reason; every check runs even when an
earlier one failed, and the exit status is 1 if any failed.
"""

import argparse
import gzip
import json
import sys
import traceback
import urllib.request
import zlib

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

ADD_MUL = "add_mul"
FP16 = "identity_fp16"
TEXT = "identity_bytes"


def expect_error(call, *statuses):
    """Runs `call`, which must raise InferenceServerException with one of `statuses`."""
    try:
        call()
    except InferenceServerException as error:
        assert str(error.status()) in statuses, (error.status(), error.message())
        return error
    raise AssertionError(f"no error; expected {statuses}")


class Checks:
    def __init__(self, module, client, key, protocol, url):
        self.module = module
        self.client = client
        self.key = key
        self.protocol = protocol
        self.url = url

    @property
    def headers(self):
        # A new dict for every call: tritonclient.http adds Inference-Header-Content-Length to
        # the dict it is given, which a later JSON-only request would then send too.
        return {"authorization": f"Bearer {self.key}"} if self.key else None

    def inputs(self, a, b, binary):
        made = []
        for name, value in (("a", a), ("b", b)):
            tensor = self.module.InferInput(name, list(value.shape), "FP32")
            if self.protocol == "http":
                tensor.set_data_from_numpy(value, binary_data=binary)
            else:
                tensor.set_data_from_numpy(value)
            made.append(tensor)
        return made

    def output(self, name, binary):
        if self.protocol == "http":
            return self.module.InferRequestedOutput(name, binary_data=binary)
        return self.module.InferRequestedOutput(name)

    def server(self):
        assert self.client.is_server_live(), "not live"
        assert self.client.is_server_ready(), "not ready"
        metadata = self.client.get_server_metadata()
        if self.protocol == "http":
            name, extensions = metadata["name"], metadata["extensions"]
            assert "binary_tensor_data" in extensions, metadata
        else:
            name = metadata.name
        assert name == "lmgrid", metadata

    def model_metadata(self):
        assert self.client.is_model_ready(ADD_MUL, headers=self.headers), "add_mul not ready"
        assert self.client.is_model_ready(ADD_MUL, "1", headers=self.headers)
        metadata = self.client.get_model_metadata(ADD_MUL, headers=self.headers)
        if self.protocol == "http":
            inputs = [(t["name"], t["datatype"], list(t["shape"])) for t in metadata["inputs"]]
            outputs = [t["name"] for t in metadata["outputs"]]
            versions = metadata["versions"]
        else:
            inputs = [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs]
            outputs = [t.name for t in metadata.outputs]
            versions = list(metadata.versions)
        assert inputs == [("a", "FP32", [-1, 4]), ("b", "FP32", [-1, 4])], inputs
        assert outputs == ["sum", "product"], outputs
        assert versions == ["1"], versions

    def infer(self):
        a = np.arange(8, dtype=np.float32).reshape(2, 4)
        b = np.full((2, 4), 0.5, dtype=np.float32)
        # The client's defaults: binary tensors over HTTP, every output.
        result = self.client.infer(
            ADD_MUL, self.inputs(a, b, True), request_id="r-1", headers=self.headers
        )
        np.testing.assert_allclose(result.as_numpy("sum"), a + b)
        np.testing.assert_allclose(result.as_numpy("product"), a * b)
        response = result.get_response()
        model_name = response["model_name"] if self.protocol == "http" else response.model_name
        assert model_name == ADD_MUL, response
        # One output asked for, at a version.
        result = self.client.infer(
            ADD_MUL,
            self.inputs(a, b, True),
            model_version="1",
            outputs=[self.output("product", True)],
            headers=self.headers,
        )
        np.testing.assert_allclose(result.as_numpy("product"), a * b)
        assert result.as_numpy("sum") is None, "sum was not asked for"

    def infer_json_and_mixed(self):
        if self.protocol != "http":
            return
        a = np.array([[1, 2, 3, 4]], dtype=np.float32)
        b = np.array([[-1, 0.25, 8, 1e6]], dtype=np.float32)
        for binary_inputs, binary_outputs in ((False, False), (True, False), (False, True)):
            inputs = self.inputs(a, b, binary_inputs)
            if binary_inputs:
                # One input as binary data, the other as JSON.
                inputs[1].set_data_from_numpy(b, binary_data=False)
            result = self.client.infer(
                ADD_MUL,
                inputs,
                outputs=[self.output("sum", binary_outputs), self.output("product", True)],
                headers=self.headers,
            )
            np.testing.assert_allclose(result.as_numpy("sum"), a + b)
            np.testing.assert_allclose(result.as_numpy("product"), a * b)
            sum_json = result.get_output("sum")
            assert ("data" in sum_json) == (not binary_outputs), sum_json

    def infer_fp16(self):
        x = np.array([[0.5, -2.0, 65504.0], [1e-3, 0.0, 3.25]], dtype=np.float16)
        tensor = self.module.InferInput("x", list(x.shape), "FP16")
        if self.protocol == "http":
            tensor.set_data_from_numpy(x, binary_data=True)
        else:
            tensor.set_data_from_numpy(x)
        result = self.client.infer(FP16, [tensor], headers=self.headers)
        y = result.as_numpy("y")
        assert y.dtype == np.float16, y.dtype
        np.testing.assert_array_equal(y, x)

    def infer_compressed(self):
        if self.protocol != "http":
            return
        a = np.array([[1, 2, 3, 4]], dtype=np.float32)
        for algorithm in ("gzip", "deflate"):
            for binary in (True, False):
                result = self.client.infer(
                    ADD_MUL,
                    self.inputs(a, a, binary),
                    request_compression_algorithm=algorithm,
                    headers=self.headers,
                )
                np.testing.assert_allclose(result.as_numpy("sum"), a + a)

    def infer_compressed_answer(self):
        if self.protocol != "http":
            return
        # 16 strings of 200 characters: answers of several KiB, JSON or binary.
        x = np.array(
            [[f"{row}-{col}:" + "lmgrid " * 28 for col in range(2)] for row in range(8)],
            dtype=np.object_,
        )
        for algorithm in ("gzip", "deflate"):
            for binary in (True, False):
                tensor = self.module.InferInput("x", list(x.shape), "BYTES")
                tensor.set_data_from_numpy(x, binary_data=binary)
                result = self.client.infer(
                    TEXT,
                    [tensor],
                    outputs=[self.output("y", binary)],
                    response_compression_algorithm=algorithm,
                    headers=self.headers,
                )
                y = result.as_numpy("y")
                got = [v if isinstance(v, bytes) else v.encode() for v in y.flatten()]
                assert got == [v.encode() for v in x.flatten()], (algorithm, binary)
        # Whether it was compressed is only visible on the wire: ask once more, raw.
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": list(x.shape),
                        "datatype": "BYTES",
                        "data": x.flatten().tolist(),
                    }
                ]
            }
        ).encode()
        for algorithm, decompress in (("gzip", gzip.decompress), ("deflate", zlib.decompress)):
            request = urllib.request.Request(
                f"http://{self.url}/v2/models/{TEXT}/infer",
                data=body,
                headers={
                    **(self.headers or {}),
                    "Content-Type": "application/json",
                    "Accept-Encoding": algorithm,
                },
            )
            with urllib.request.urlopen(request) as answer:
                assert answer.headers["Content-Encoding"] == algorithm, dict(answer.headers)
                raw = answer.read()
            result = json.loads(decompress(raw))
            assert len(raw) < len(json.dumps(result)) / 3, len(raw)
            assert result["outputs"][0]["data"] == x.flatten().tolist(), result

    def infer_bytes(self):
        x = np.array([["", "héllo".encode()], ["東京".encode(), b"a, b"]], dtype=np.object_)
        modes = (True, False) if self.protocol == "http" else (None,)
        for binary in modes:
            tensor = self.module.InferInput("x", list(x.shape), "BYTES")
            if binary is None:
                tensor.set_data_from_numpy(x)
            else:
                tensor.set_data_from_numpy(x, binary_data=binary)
            outputs = None if binary is None else [self.output("y", binary)]
            result = self.client.infer(TEXT, [tensor], outputs=outputs, headers=self.headers)
            y = result.as_numpy("y")
            assert y.shape == x.shape, y.shape
            # Binary outputs come back as bytes, JSON ones as text.
            got = [v if isinstance(v, bytes) else v.encode() for v in y.flatten()]
            want = [v if isinstance(v, bytes) else v.encode() for v in x.flatten()]
            assert got == want, (binary, got, want)
        # Bytes that are not text are refused by the worker.
        bad = np.array([[b"\xff", b"ok"]], dtype=np.object_)
        tensor = self.module.InferInput("x", [1, 2], "BYTES")
        tensor.set_data_from_numpy(bad)
        error = expect_error(
            lambda: self.client.infer(TEXT, [tensor], headers=self.headers),
            "400",
            "StatusCode.INVALID_ARGUMENT",
        )
        assert "UTF-8" in error.message(), error.message()

    def errors(self):
        a = np.zeros((1, 4), dtype=np.float32)
        not_found = ("404", "StatusCode.NOT_FOUND")
        invalid = ("400", "StatusCode.INVALID_ARGUMENT")
        error = expect_error(
            lambda: self.client.infer("no-such-model", self.inputs(a, a, True), headers=self.headers),
            *not_found,
        )
        assert "no-such-model" in error.message(), error.message()
        expect_error(
            lambda: self.client.get_model_metadata(ADD_MUL, "9", headers=self.headers),
            *not_found,
        )
        # A tensor of the wrong width for the model is the worker's refusal.
        wide = np.zeros((1, 5), dtype=np.float32)
        error = expect_error(
            lambda: self.client.infer(ADD_MUL, self.inputs(wide, wide, True), headers=self.headers),
            *invalid,
        )
        assert "a" in error.message(), error.message()

    def keys(self):
        if not self.headers:
            return
        a = np.zeros((1, 4), dtype=np.float32)
        expect_error(
            lambda: self.client.infer(ADD_MUL, self.inputs(a, a, True)),
            "401",
            "StatusCode.UNAUTHENTICATED",
        )
        expect_error(
            lambda: self.client.infer(
                ADD_MUL,
                self.inputs(a, a, True),
                headers={"authorization": "Bearer lmg-not-a-key"},
            ),
            "401",
            "StatusCode.UNAUTHENTICATED",
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--http", required=True, help="host:port of the gateway's HTTP API")
    parser.add_argument("--grpc", required=True, help="host:port of the gateway's gRPC API")
    parser.add_argument("--api-key", help="a tenant's API key; keys are then required")
    args = parser.parse_args()

    clients = [
        ("grpc", grpcclient, grpcclient.InferenceServerClient(args.grpc)),
        ("http", httpclient, httpclient.InferenceServerClient(args.http)),
    ]
    failed = []
    for protocol, module, client in clients:
        checks = Checks(module, client, args.api_key, protocol, args.http)
        for name in ("server", "model_metadata", "infer", "infer_json_and_mixed", "infer_fp16",
                     "infer_compressed", "infer_compressed_answer", "infer_bytes", "errors",
                     "keys"):
            label = f"{protocol}.{name}"
            try:
                getattr(checks, name)()
                print(f"ok: {label}")
            except Exception:  # every check runs; each failure is reported with its trace
                failed.append(label)
                print(f"FAILED: {label}\n{traceback.format_exc()}")
        client.close()
    if failed:
        print(f"{len(failed)} failed: {', '.join(failed)}")
        return 1
    print("all Open Inference Protocol client checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
