"""The wheel ships the `adjoint` package, its LICENSE and its metadata, nothing else."""

import subprocess
import sys
import zipfile


def test_wheel_contents(tmp_path):
    root = __file__.rsplit("/tests/", 1)[0]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            root,
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("adjoint_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    dist_info = next(t for t in top if t.endswith(".dist-info"))
    assert top == {"adjoint", dist_info}, top
    assert f"{dist_info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "Project-URL: Source," in metadata and "Requires-Python: >=3.11" in metadata
    assert "adjoint/control/_implicit.py" in names and not any("benchmarks" in n for n in names)
