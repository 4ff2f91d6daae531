"""The committed generated code equals what protoc makes from protos/ now."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_code_matches_protos(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)],
                   check=True, capture_output=True)
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "shardline" / "v1").glob("*_pb2*"))
    committed = sorted(p.relative_to(ROOT / "services")
                       for p in (ROOT / "services" / "shardline" / "v1").glob("*_pb2*"))
    assert fresh == committed, "generated file set differs: run `make protos`"
    for rel in fresh:
        assert (tmp_path / rel).read_text() == (ROOT / "services" / rel).read_text(), \
            f"{rel} is stale: run `make protos`"


def test_every_proto_field_is_documented():
    for proto in (ROOT / "protos").rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            is_field = s.endswith(";") and "=" in s and not s.startswith(("syntax", "package", "option", "import", "//"))
            if is_field:
                assert lines[i - 1].strip().startswith("///"), f"{proto.name}:{i + 1} undocumented: {s}"
