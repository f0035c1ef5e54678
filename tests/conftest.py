"""Shared fixtures: a tiny digits recipe that runs every stage in seconds on a CPU."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GENDD_HASH_CACHE", "off")  # hermetic: no hash cache shared with other runs (tests/test_store_reuse.py tests it)

REPO = Path(__file__).resolve().parents[1]

# IR version of the ONNX models tests build by hand with onnx.helper: onnx's default can be newer
# than the onnxruntime beside it reads (onnx 1.23 writes IR 14, onnxruntime 1.30 reads up to 13).
ONNX_IR = 9

TINY_RECIPE = """
[pipeline]
name = "tiny"
seed = 0

[data]
source = "digits"
calib_fraction = 0.2
augment = "crop"
crop_padding = 1
train_limit = 256
test_limit = 128

[teacher]
model = "resnet18"
model_kwargs = { layers = [1, 1, 1, 1], channels = [8, 16, 16, 32] }
small_input = true
epochs = 2
batch_size = 64
lr = 3e-3

[cache]
views = 2
batch_size = 100

[distill]
method = "gendd"
student = "resnet18"
student_kwargs = { layers = [1, 1, 1, 1], channels = [8, 8, 16, 16] }
small_input = true
epochs = 2
batch_size = 64
head_width = 32
head_depth = 1
token_dim = 16
diffusion_batch_mul = 2
eval_steps = 4
eval_draws = 2

[calibrate]
steps = [1, 2]
draws = [1, 2]
temperatures = [0.0, 1.0]
t_starts = [999, 800]
limit = 64
latency_batch = 8

[export]
parity_limit = 32
"""


@pytest.fixture
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation, costly on a shared CPU.
    Modules of tiny-tensor tests use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY_RECIPE)
    return p


@pytest.fixture
def tiny_context(tiny_recipe, tmp_path):
    """A stage Context over the tiny recipe and an empty artifact store; overrides via make(...)."""
    from rich.console import Console

    from gendd_deploy.artifacts import Store
    from gendd_deploy.config import load_recipe
    from gendd_deploy.stages import Context

    def make(*overrides: str):
        recipe = load_recipe(tiny_recipe, list(overrides))
        return Context(recipe=recipe, store=Store(tmp_path / "artifacts"), console=Console(quiet=True), recipe_path=str(tiny_recipe), quiet=True)

    return make
