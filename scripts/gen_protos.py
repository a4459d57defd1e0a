"""Generate the Python gRPC stubs (and .pyi) from protos/ into accelgen/v1/.

    python scripts/gen_protos.py           # regenerate
    python scripts/gen_protos.py --check   # exit 1 if the committed stubs are stale (CI)
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = ROOT / "accelgen" / "v1"


def generate(out_root: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.glob("accelgen/v1/*.proto"))
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}"] + [str(p) for p in protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / "accelgen" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        if args.check:
            stale = [f.name for f in files if not (OUT_PACKAGE / f.name).exists()
                     or not filecmp.cmp(f, OUT_PACKAGE / f.name, shallow=False)]
            if stale:
                print(f"stale generated stubs: {', '.join(stale)}; run python scripts/gen_protos.py", file=sys.stderr)
                return 1
            print("generated stubs are up to date")
            return 0
        OUT_PACKAGE.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, OUT_PACKAGE / f.name)
    (OUT_PACKAGE / "__init__.py").write_text('"""Generated gRPC stubs of the accelgen.v1 API (scripts/gen_protos.py; do not edit)."""\n')
    print(f"generated {len(files)} files into {OUT_PACKAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
