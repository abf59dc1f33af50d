"""Every Triton kernel builds for the GPU on a CPU-only machine: PTX and a cubin per launch.

The Triton wheel ships NVIDIA's compiler (ptxas), so `triton.compile` lowers a kernel for any
CUDA target without a GPU. The other kernel tests run under TRITON_INTERPRET=1 (conftest.py),
which executes code the hardware compiler may refuse (tl.dot on blocks under 16, say) and under
which @triton.jit gives interpreted functions, not JITFunctions. So the builds run in one
subprocess without TRITON_INTERPRET (`main`), over exactly the launches the decode step makes: an
`ARKVCache` of SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head_dim 64) attends
with `attention="triton"` while a recorder stands in for the kernel, and each recorded launch
goes through the real JITFunction's binder and `_pack_args` (the path of `JITFunction.run`), so
the signature, the specialisations (16-byte alignment, integers equal to 1) and the constexprs
are those a GPU launch compiles.

Matrix: Original cache dtype (float32, bfloat16, float16) x format (original: the Original
region; fp8, int8, int4: the Quantized region, payload uint8 and metadata in the format's
`meta_dtype`) x target (sm_80, sm_90): 24 builds of about 1 s each. They land in Triton's cache
(TRITON_CACHE_DIR, default ~/.triton/cache), keyed by the kernel source, so an unchanged kernel
is read back, not rebuilt."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import decode_kernels
from arkv import ARKV, ARKVConfig
from kv_arena import FORMATS
from model import ModelArgs

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARCHS = (80, 90)
FORMAT_NAMES = {code: name for name, code in decode_kernels.FORMAT_CODES.items()}
TRITON_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.uint8: "*u8"}


def ptxas_missing() -> str | None:
    """Why no build can run here, or None."""
    if not decode_kernels.available():
        return "triton is not installed"
    from triton import knobs
    from triton.backends import backends
    if "nvidia" not in backends:
        return "this Triton wheel has no NVIDIA backend"
    try:
        knobs.nvidia.ptxas  # the bundled binary, or TRITON_PTXAS_PATH; runs `ptxas --version`
    except RuntimeError as err:
        return f"ptxas is unavailable: {err}"
    return None


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(ptxas_missing() is not None, reason=str(ptxas_missing()))]


def recorded_launches(dtype: torch.dtype) -> list[tuple[tuple, dict]]:
    """(args, constexprs) of every kernel launch of one decode-step attention per format, with
    an Original cache of `dtype` (Original launches repeat across formats: kept once)."""
    args = ModelArgs(dim=576, n_layer=1, n_head=9, n_kv_heads=3, head_dim=64, intermediate_size=64, vocab_size=16,
                     max_seq_len=256)
    launches, seen = [], set()

    class Recorder:
        def __getitem__(self, grid):
            def launch(*call_args, **constexprs):
                key = (constexprs["FORMAT"], tuple(str(getattr(a, "dtype", type(a))) for a in call_args))
                if key not in seen:
                    seen.add(key)
                    launches.append((call_args, constexprs))
            return launch

    real, decode_kernels._tristate_attention_kernel = decode_kernels._tristate_attention_kernel, Recorder()
    try:
        for kv_quant in ("fp8", "int8", "int4"):
            manager = ARKV(ARKVConfig(kv_budget=64, window=8, kv_quant=kv_quant, attention="triton"), args, dtype)
            cache = manager.cache_factory(0, args, 1, 128, dtype)
            cache.attend(torch.zeros(1, args.n_head, 1, args.head_dim, dtype=dtype))
    finally:
        decode_kernels._tristate_attention_kernel = real
    return launches


def build(kernel, call_args: tuple, constexprs: dict, arch: int) -> dict:
    """Compile one launch for sm_`arch` as `JITFunction.run` would on that GPU."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(constexprs, debug=kernel.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)  # as JITFunction.run adds them
    bound_args, specialization, options = binder(*call_args, **kwargs)
    options, signature, constants, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=target, options=options.__dict__)
    return dict(seconds=time.perf_counter() - start, signature=signature, ptx_target=f".target sm_{arch}" in compiled.asm["ptx"],
                cubin_elf=compiled.asm["cubin"][:4] == b"\x7fELF", cubin_bytes=len(compiled.asm["cubin"]))


def main():
    """Subprocess entry (no TRITON_INTERPRET): build the matrix, print one JSON line."""
    from triton.runtime.jit import JITFunction

    kernel = decode_kernels._tristate_attention_kernel
    assert isinstance(kernel, JITFunction), "run without TRITON_INTERPRET"
    results = []
    for dtype_name, dtype in DTYPES.items():
        for call_args, constexprs in recorded_launches(dtype):
            for arch in ARCHS:
                result = dict(kernel=kernel.__name__, dtype=dtype_name, format=FORMAT_NAMES[constexprs["FORMAT"]], arch=arch)
                try:
                    result.update(build(kernel, call_args, constexprs, arch))
                except Exception as err:  # reported per build by the test that reads it
                    result["error"] = f"{type(err).__name__}: {err}"[-3000:]
                results.append(result)
    jit_functions = {name: value.src for name, value in vars(decode_kernels).items() if isinstance(value, JITFunction)}
    print(json.dumps(dict(results=results, jit_functions=jit_functions)))


@pytest.fixture(scope="module")
def builds() -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    code = "import sys; sys.path[:0] = ['.', 'tests']; import test_decode_kernels_build; test_decode_kernels_build.main()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_every_kernel_is_built(builds):
    """A JIT function of kernels.py is either built here or called by one that is (a helper)."""
    built = {r["kernel"] for r in builds["results"]}
    sources = [builds["jit_functions"][name] for name in built]
    for name in builds["jit_functions"]:
        assert name in built or any(f"{name}(" in src for src in sources), f"{name} is in no build: add its launches"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", list(decode_kernels.FORMAT_CODES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_tristate_attention_builds(builds, dtype, fmt, arch):
    [result] = [r for r in builds["results"]
                if (r["kernel"], r["dtype"], r["format"], r["arch"]) == ("_tristate_attention_kernel", dtype, fmt, arch)]
    assert "error" not in result, result["error"]
    assert result["ptx_target"] and result["cubin_elf"] and result["cubin_bytes"] > 0
    meta = DTYPES[dtype] if fmt == "original" else FORMATS[fmt].meta_dtype
    kv = DTYPES[dtype] if fmt == "original" else torch.uint8
    signature = result["signature"]
    assert (signature["q_ptr"], signature["kv_ptr"], signature["meta_ptr"]) == (
        TRITON_TYPES[DTYPES[dtype]], TRITON_TYPES[kv], TRITON_TYPES[meta])
