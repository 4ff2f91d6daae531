"""Regenerate the Python code for protos/shardline/v1/*.proto into services/.

Usage: python scripts/gen_protos.py [OUT_DIR]   (default: services/)
tests/unit/test_protos_in_sync.py runs this into a temporary folder and compares.
"""
import pathlib
import sys

from grpc_tools import protoc
import grpc_tools

ROOT = pathlib.Path(__file__).resolve().parent.parent


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    protos = sorted((ROOT / "protos").rglob("*.proto"))
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args += [str(p) for p in protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_dir) for p in (out_dir / "shardline" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "services"
    for rel in generate(out):
        print(rel)
