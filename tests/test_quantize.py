"""Weight-only int8 and int4 (quantize.py, `convert.py --quantize`) against independent oracles:
exact arithmetic for the quantizer's bound, a plain dequantized float32 matmul for the kernel, and
the float model it came from (tiny random Llama / Qwen3, and SmolLM2) end to end."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint import CheckpointError, load_model
from convert import convert_hf, requantize
from generate import generate, main as generate_main
from quantize import Int4Linear, Int8Linear, quantize_int4, quantize_int8
from tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
from test_model import TINY, hf_model  # noqa: E402  (after the transformers skip)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 80), exponent=st.integers(-30, 30), seed=st.integers(0, 2**31 - 1))
def test_int8_weights_within_half_a_step(rows, cols, exponent, seed):
    """|W - W_q s| <= s / 2 per element, with s = max|row| / 127 and codes in [-127, 127]; a zero
    row reads back as zeros. Checked in float64 from the stored int8 codes and float32 scales."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g) * 2.0**exponent
    weight[0] = 0.0
    codes, scales = quantize_int8(weight)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (rows,)
    assert codes.abs().max() <= 127
    w, s = weight.double(), scales.double()[:, None]
    assert ((w - codes.double() * s).abs() <= s / 2 * (1 + 1e-6)).all()
    assert (codes[0] == 0).all()
    assert torch.allclose(s[1:, 0], w[1:].abs().amax(1) / 127, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 100), exponent=st.integers(-30, 30), seed=st.integers(0, 2**31 - 1))
def test_int4_weights_within_half_a_step(rows, cols, exponent, seed):
    """Per group of 32 input channels (zero-padded to a multiple of 32): codes in [0, 15], z the
    group's minimum, s = (max - min) / 15, |W - (q s + z)| <= s / 2 per element; byte j of a group
    holds codes j (low nibble) and j + 16 (high). Checked in float64 from the stored bytes."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g) * 2.0**exponent
    packed, scales, zeros = quantize_int4(weight)
    padded = -(-cols // 32) * 32
    assert packed.dtype == torch.uint8 and packed.shape == (rows, padded // 2)
    assert scales.shape == zeros.shape == (rows, padded // 32)
    pairs = packed.view(rows, padded // 32, 16).long()
    codes = torch.cat([pairs % 16, pairs // 16], dim=-1)  # [rows, groups, 32]: channel j, then j + 16
    w = torch.nn.functional.pad(weight.double(), (0, padded - cols)).view(rows, -1, 32)
    s, z = scales.double()[..., None], zeros.double()[..., None]
    assert ((w - (codes * s + z)).abs() <= s / 2 * (1 + 1e-6) + 1e-300).all()
    assert torch.equal(zeros.double(), w.amin(-1))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_int4_linear_equals_dequantized_matmul(dtype, tolerance):
    """x [B, S, in] through Int4Linear (in = 80: padded to 96) equals x @ (q s + z)^T in float64,
    the codes read from the bytes as `quantize_int4` packs them."""
    g = torch.Generator().manual_seed(0)
    layer = Int4Linear(80, 40)
    layer.weight.copy_(torch.randint(0, 256, (40, 48), generator=g, dtype=torch.uint8))
    layer.scales.copy_(torch.rand(40, 3, generator=g) * 0.01 + 1e-3)
    layer.zeros.copy_(torch.randn(40, 3, generator=g) * 0.05)
    pairs = layer.weight.view(40, 3, 16).long()
    codes = torch.cat([pairs % 16, pairs // 16], dim=-1).double()  # [out, groups, 32]
    w = (codes * layer.scales.double()[..., None] + layer.zeros.double()[..., None]).flatten(1)[:, :80]
    x = torch.randn(2, 3, 80, generator=g).to(dtype)
    expected = x.double() @ w.T  # [2, 3, 40]
    got = layer(x)
    assert got.shape == (2, 3, 40) and got.dtype == dtype
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() <= tolerance


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_int8_linear_equals_dequantized_matmul(dtype, tolerance):
    """x [B, S, in] through Int8Linear equals x @ (W_q s)^T computed in float64."""
    g = torch.Generator().manual_seed(0)
    layer = Int8Linear(96, 40)
    layer.weight.copy_(torch.randint(-127, 128, (40, 96), generator=g, dtype=torch.int8))
    layer.scales.copy_(torch.rand(40, generator=g) * 0.01 + 1e-3)
    x = torch.randn(2, 3, 96, generator=g).to(dtype)
    expected = x.double() @ (layer.weight.double() * layer.scales.double()[:, None]).T  # [2, 3, 40]
    got = layer(x)
    assert got.shape == (2, 3, 40) and got.dtype == dtype
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() <= tolerance


@pytest.mark.parametrize("weight_quant, layer, spread, agreement", [("int8", Int8Linear, 0.02, 0.9),
                                                                   ("int4", Int4Linear, 0.1, 0.8)])
@pytest.mark.parametrize("kind, extra", [
    ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    ("qwen3", dict(num_key_value_heads=2, head_dim=32, rope_theta=1e6, tie_word_embeddings=True)),
])
def test_quantized_checkpoint_tracks_the_float_model(tmp_path, kind, extra, weight_quant, layer, spread, agreement):
    """A tiny random model converted, then quantized from its converted folder: every projection is
    quantized (the tied output its own copy), logits stay within `spread` of the float model's
    range, and the greedy choice agrees at >= `agreement` of positions (random weights: many
    near-ties; int4 has 8x int8's step)."""
    model = hf_model(kind, extra)
    model.save_pretrained(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "float")
    args = requantize(tmp_path / "float", tmp_path / weight_quant, weight_quant)
    assert args.weight_quant == weight_quant
    float_model = load_model(tmp_path / "float", "cpu", torch.float32)
    quantized_model = load_model(tmp_path / weight_quant, "cpu", torch.float32)
    assert isinstance(quantized_model.output, layer) and isinstance(quantized_model.layers[0].feed_forward.w2, layer)
    ids = torch.randint(0, TINY["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(1))
    logits = []
    for m in (float_model, quantized_model):
        m.setup_caches(1, 48)
        with torch.no_grad():
            logits.append(m(ids, torch.arange(40)))
    reference, got = logits
    assert (got - reference).abs().max() <= spread * (reference.max() - reference.min())
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= agreement


def test_quantizing_twice_is_refused(tmp_path):
    model = hf_model("llama", dict(num_key_value_heads=2))
    model.save_pretrained(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "float")
    requantize(tmp_path / "float", tmp_path / "int8", "int8")
    with pytest.raises(CheckpointError, match="already quantized"):
        requantize(tmp_path / "int8", tmp_path / "again", "int8")


@pytest.mark.parametrize("weight_quant, agreement", [("int8", 0.95), ("int4", 0.85)])
def test_smollm2_quantized_agrees_with_float32(smollm2_checkpoint, tmp_path, capsys, weight_quant, agreement):
    """SmolLM2 with int8 (int4) weights answers "Paris", and over a 300-token float32 greedy
    generation picks float32's next token at >= 95% (85%; measured 92%) of the positions (both models read the
    same tokens)."""
    quantized_checkpoint = tmp_path / weight_quant
    requantize(smollm2_checkpoint, quantized_checkpoint, weight_quant)
    generate_main(["--checkpoint", str(quantized_checkpoint), "--prompt", "The capital of France is", "--max-new-tokens",
                   "4"])
    assert "Paris" in capsys.readouterr().out
    float_model = load_model(smollm2_checkpoint, "cpu", torch.float32)
    prompt = torch.tensor([load_tokenizer(smollm2_checkpoint).encode("The history of the printing press begins")])
    float_model.setup_caches(1, 320)
    tokens, _ = generate(float_model, prompt, 300)
    sequence = torch.cat([prompt, torch.tensor([tokens[:-1]])], dim=1)  # each position predicts the next token
    quantized_model = load_model(quantized_checkpoint, "cpu", torch.float32)
    quantized_model.setup_caches(1, 320)
    with torch.no_grad():
        predicted = quantized_model(sequence, torch.arange(sequence.shape[1]))[0, prompt.shape[1] - 1:].argmax(-1)
    measured = (predicted == torch.tensor(tokens)).float().mean().item()
    print(f"{weight_quant} vs float32 greedy agreement: {measured:.3f}")
    assert measured >= agreement


@pytest.mark.parametrize("weight_quant", ["none", "int8", "int4"])
def test_compiled_decode_projections_equal_eager(tmp_path, weight_quant):
    """A compiled decode step on the CPU multiplies by `quantize.matvec` / `quantize.int4_matvec` (a
    product summed), eager by a matmul: the logits of one step agree within float32 round-off,
    float, int8 and int4 weights."""
    model = hf_model("llama", dict(num_key_value_heads=2, tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "float")
    checkpoint = tmp_path / "float"
    if weight_quant != "none":
        requantize(checkpoint, tmp_path / weight_quant, weight_quant)
        checkpoint = tmp_path / weight_quant
    ours = load_model(checkpoint, "cpu", torch.float32)
    ours.setup_caches(2, 16)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(5))
    step = torch.compile(lambda idx, pos: ours(idx, pos), fullgraph=True)
    with torch.no_grad():
        ours(prompt, torch.arange(8))
        token, pos = prompt[:, -1:], torch.tensor([[8], [8]])
        eager = ours(token, pos)
        compiled = step(token, pos)
    assert (compiled - eager).abs().max() <= 1e-5 * eager.abs().max()
