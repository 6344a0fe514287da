"""Pack FlashAttention-4 (CuTe DSL) for the GPU box, which has no network: one xz archive, .fa4/fa4_site.tar.xz,
small enough to travel with the repo in one transfer (64 MiB in all). Run here, in the repo root:

    python bench/fa4_carry.py            # (or: python bench/fa4_carry.py OUT_DIR)

(.fa4 is git-ignored, as carry needs), then on the box (carry [".fa4"]):

    python3 -c "import tarfile; tarfile.open('.fa4/fa4_site.tar.xz').extractall('/tmp/fa4', filter='data')" &&
    export PYTHONPATH=/tmp/fa4/site:/tmp/fa4/site/nvidia_cutlass_dsl/dsl_packages && python3 bench/attention_probe.py

What goes together (read from the wheels, 2026-11): flash-attn-4 4.0.0b36 needs nvidia-cutlass-dsl >= 4.6.2,
quack-kernels and apache-tvm-ffi. Since 4.8 the DSL is split: nvidia-cutlass-dsl-libs-core holds the Python
package (cutlass, cutlass.cute: installing only -base and -cu13 leaves `cutlass.cute` missing),
-libs-base the toolkit loader, -libs-cu13 (or -cu12, the same size; the loader picks by the driver) the MLIR
compiler _cutlass_ir (193 MB, one stripped x86-64 library for every GPU architecture: nothing per
architecture to drop) and libcute_dsl_runtime (44 MB). The meta package nvidia-cutlass-dsl only adds a .pth
(replaced by the PYTHONPATH above) and pulls -libs-cu12 as well, so it is left out, as are the profiler, the
aarch64/QNX stubs, tvm-ffi's C++ sources (its core links its test library: that stays), and torch-c-dlpack-ext (builds for torch <= 2.9
only; newer torch has the DLPack exchange API itself). The box already has cuda-bindings, einops, protobuf.
Checked without a GPU (2026-11-25, Python 3.12.1, torch 2.11.0, cuda-bindings 13, the 62.1 MiB archive this
writes): `import cutlass.cute` and `import flash_attn.cute` (flash_attn_func, flash_attn_varlen_func) succeed.
"""
import io
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEELS = ["flash-attn-4==4.0.0b36", "nvidia-cutlass-dsl-libs-base==4.8.1", "nvidia-cutlass-dsl-libs-core==4.8.1",
          "nvidia-cutlass-dsl-libs-cu13==4.8.1", "quack-kernels==0.6.5", "apache-tvm-ffi==0.1.15.post2"]
UNUSED = ["nvidia_cutlass_dsl/dsl_packages/iket", "nvidia_cutlass_dsl/cu13/lib/stubs", "tvm_ffi/3rdparty", "tvm_ffi/src"]
LIMIT = 63 * 2**20  # one transfer is 64 MiB with the repo itself (~0.4 MiB)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".fa4")
    out.mkdir(parents=True, exist_ok=True)
    if out == Path(".fa4") and subprocess.run(["git", "check-ignore", "-q", ".fa4"]).returncode != 0:
        print("note: .fa4 is not ignored by git; carry needs it ignored: add /.fa4/ to .gitignore")
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                        "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64",
                        "-d", str(wheels), *WHEELS], check=True)
        for wheel in sorted(wheels.glob("*.whl")):
            zipfile.ZipFile(wheel).extractall(site)
        for path in UNUSED:
            target = site / path
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(site, arcname="site")
        archive = out / "fa4_site.tar.xz"
        archive.write_bytes(lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    size = archive.stat().st_size
    print(f"{archive}: {size / 2**20:.1f} MiB ({'fits' if size <= LIMIT else 'TOO LARGE for one transfer'})")


if __name__ == "__main__":
    main()
