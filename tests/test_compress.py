"""Compressed streaming's codec (engine.compress): every decode is bit for bit the bf16 weights it
encoded, the code is a valid length-limited prefix code, and the Triton decoder (under Triton's CPU
interpreter) writes what the reference decoder writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.compress import (
    LANE_WEIGHTS, MAX_CODE_BITS, codebook, compress, decode_reference, exponent_histogram, exponents, lanes_for,
)

ROOT = Path(__file__).resolve().parents[1]
SPECIAL = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40, 3.0e38, 1.0, -2.0]


def roundtrip(flat: torch.Tensor, lane_weights: int = LANE_WEIGHTS) -> tuple[torch.Tensor, float]:
    lanes = lanes_for(flat.numel(), lane_weights)
    book = codebook(exponent_histogram(flat, lanes * lane_weights))
    layer = compress(flat, book, lane_weights)
    out = torch.full((lanes * lane_weights,), 7.0, dtype=torch.bfloat16)
    decode_reference(layer, book.table, out)
    return out[: flat.numel()], layer.nbytes / flat.nbytes


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("numel, lane_weights", [(1, 8), (255, 8), (1000, 16), (4096 * 3 + 5, 32), (70_001, 256)])
def test_gaussian_weights_decode_bit_for_bit(numel, lane_weights):
    flat = (torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 0.02).to(torch.bfloat16)
    flat[: min(numel, len(SPECIAL))] = torch.tensor(SPECIAL[:numel])
    decoded, ratio = roundtrip(flat, lane_weights)
    assert same_bits(decoded, flat)
    if numel > 50_000:  # ~2.7 bits of exponent + 8 raw bits + lane offsets, against 16
        assert 0.62 < ratio < 0.72


@pytest.mark.parametrize("slab", [64, 1000, 4097])
def test_the_encoder_reads_its_input_in_slabs_with_the_same_result(monkeypatch, slab):
    # Slabs of whole steps, a partial step, the padding's step: the bytes of the one-slab encoding.
    import engine.compress

    flat = (torch.randn(70_001, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    padded = lanes_for(70_001, 256) * 256
    counts = exponent_histogram(flat, padded)
    book = codebook(counts)
    whole = compress(flat, book)
    monkeypatch.setattr(engine.compress, "SLAB_WEIGHTS", slab)
    assert torch.equal(exponent_histogram(flat, padded), counts) and int(counts.sum()) == padded
    sliced = compress(flat, book)
    for part in ("sign_mantissa", "words", "offsets"):
        assert torch.equal(getattr(sliced, part), getattr(whole, part)), part


def test_every_bit_pattern_decodes_to_itself():
    # All 65536 bf16 values (every exponent, NaN payloads, subnormals) twice, shuffled: the
    # rarest exponents get the longest codes the limit allows.
    flat = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).repeat(2)
    flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(1))].view(torch.bfloat16)
    decoded, _ = roundtrip(flat, 64)
    assert same_bits(decoded, flat)


def test_one_exponent_alone_still_advances_one_bit_per_weight():
    flat = torch.full((300,), 0.75, dtype=torch.bfloat16)
    lanes = lanes_for(300, 300)  # one lane, no padding: a single symbol
    book = codebook(exponent_histogram(flat, lanes * 300))
    assert int((book.lengths > 0).sum()) == 1 and int(book.lengths.max()) == 1
    decoded, _ = roundtrip(flat, 300)
    assert same_bits(decoded, flat)


@pytest.mark.parametrize("max_bits", [4, 8, MAX_CODE_BITS])
def test_codes_are_a_complete_prefix_code_within_the_length_limit(max_bits):
    # Skewed counts (a geometric tail) whose unlimited Huffman code would be longer than max_bits.
    counts = torch.zeros(256, dtype=torch.int64)
    counts[100:116] = torch.tensor([2**k for k in range(16)])
    book = codebook(counts, max_bits)
    used = [s for s in range(256) if book.lengths[s] > 0]
    assert used == list(range(100, 116)) and int(book.lengths.max()) <= max_bits
    assert sum(2.0 ** -int(book.lengths[s]) for s in used) == 1.0  # Kraft: complete, nothing wasted
    strings = [format(int(book.codes[s]), f"0{int(book.lengths[s])}b") for s in used]
    assert not any(a != b and b.startswith(a) for a in strings for b in strings)
    # The table decodes every code, whatever bits follow it.
    for s, code in zip(used, strings):
        for tail in range(0, 1 << (max_bits - len(code)), max(1, (1 << (max_bits - len(code))) // 4)):
            entry = int(book.table[int(code, 2) << (max_bits - len(code)) | tail])
            assert (entry & 0xFF, entry >> 8) == (s, len(code))


def test_length_limited_code_costs_little_against_entropy():
    flat = (torch.randn(200_000, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    counts = exponent_histogram(flat).double()
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * p.log2()).sum())
    book = codebook(exponent_histogram(flat))
    mean_bits = float((counts * book.lengths).sum() / counts.sum())
    assert entropy <= mean_bits < entropy + 0.1


def test_a_codebook_from_other_weights_is_refused():
    book = codebook(exponent_histogram(torch.full((64,), 1.0, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="without a code"):
        compress(torch.full((64,), 1e-3, dtype=torch.bfloat16), book, 8)
    with pytest.raises(ValueError, match="bfloat16"):
        compress(torch.ones(64), book, 8)


def test_exponents_field():
    values = torch.tensor([1.0, 2.0, 0.5, 0.0, -1.0], dtype=torch.bfloat16)
    assert exponents(values).tolist() == [127, 128, 126, 0, 127]


def test_triton_decoder_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    script = (
        "import torch\n"
        "from engine.compress import codebook, compress, decode_reference, exponent_histogram, lanes_for\n"
        "from engine import decompress_kernel\n"
        "for numel, w in [(1000, 8), (3 * 128 * 16 + 5, 16)]:\n"
        "    flat = (torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 0.02).to(torch.bfloat16)\n"
        "    flat[:3] = torch.tensor([float('nan'), float('-inf'), 1e-40])\n"
        "    lanes = lanes_for(numel, w)\n"
        "    book = codebook(exponent_histogram(flat, lanes * w))\n"
        "    layer = compress(flat, book, w)\n"
        "    got = decompress_kernel.decode(layer, book.table, torch.zeros(lanes * w, dtype=torch.bfloat16))\n"
        "    want = decode_reference(layer, book.table, torch.zeros(lanes * w, dtype=torch.bfloat16))\n"
        "    assert torch.equal(got.view(torch.int16), want.view(torch.int16))\n"
        "    assert torch.equal(got[:numel].view(torch.int16), flat.view(torch.int16))\n"
        "    print('decoded', numel)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("decoded") == 2


# --- compressed streaming in the engine ----------------------------------------------------------

from engine import EngineConfig, EngineError, SamplingConfig, load_engine  # noqa: E402
from engine.offload import PIECES, LayerStack, _piece_ranges, linear_tensors  # noqa: E402
from tests.test_lossless import assert_drafts_lossless, greedy, random_prompts  # noqa: E402


def streamed_layers_equal(model: torch.nn.Module, keep: int, slots: int) -> int:
    """Every streamed layer of `model` through a compressed LayerStack (fake device), each tensor
    compared bit for bit with the model's; returns the tensors compared."""
    layers = [linear_tensors(layer) for layer in model.model.layers]
    stack = LayerStack(layers, torch.device("cpu"), keep_on_gpu=keep, num_slots=slots, stream=True, compressed=True)
    assert stack.offloaded_bytes < 0.75 * stack.weight_bytes
    compared = 0
    for _ in range(2):  # two forwards: the slots come round again
        for i in range(len(layers)):
            for name, tensor in stack.weights(i).items():
                assert torch.equal(tensor.view(torch.int16), layers[i][name].view(torch.int16)), (i, name)
                compared += i >= keep
            stack.done(i)
    return compared


@pytest.mark.parametrize("numel", [1, 255, 256, 1024, 4 * 256 + 1, 70_001, 233_000_000])
def test_a_layer_is_cut_into_pieces_of_whole_lanes(numel):
    # Each piece decodes into weights [start, start + padded length): the pieces tile the layer
    # with no gap or overlap, each whole lanes (only the last one padded), at most PIECES of them.
    ranges = _piece_ranges(numel)
    assert 1 <= len(ranges) <= PIECES and ranges[0][0] == 0
    for (start, length), (following, _) in zip(ranges, ranges[1:]):
        assert following == start + length and length % LANE_WEIGHTS == 0
    last_start, last_length = ranges[-1]
    assert last_start < numel <= last_start + last_length < numel + LANE_WEIGHTS


def test_every_streamed_tensor_of_the_bundled_model_decodes_bit_for_bit(bundled_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bundled_folder, dtype=torch.bfloat16)
    assert streamed_layers_equal(model, keep=2, slots=3) == 2 * 7 * (model.config.num_hidden_layers - 2)


def test_every_streamed_tensor_of_a_random_model_decodes_bit_for_bit(random_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(random_folder, dtype=torch.bfloat16)
    assert streamed_layers_equal(model, keep=1, slots=2) > 0


@pytest.mark.parametrize("method", ["vanilla", "subspec_sd"])
def test_compressed_streaming_equals_plain_decoding(random_folder, method):
    common = dict(llm_path=str(random_folder), dtype="bfloat16")
    vanilla = load_engine(EngineConfig(**common))
    streamed = load_engine(EngineConfig(method=method, emulate_offload=True, keep_first_n_layers_on_gpu=1,
                                        compressed_streaming=True, substitute_bits=8, max_depth=6, topk_len=3,
                                        **common))
    details = streamed.describe()
    assert details["offloaded_bytes"] < 0.75 * details["offloaded_weight_bytes"]
    prompts = random_prompts(6, 512, seed=21)
    if method == "vanilla":
        for prompt in prompts:
            assert greedy(streamed, prompt, 16) == greedy(vanilla, prompt, 16)
    else:
        assert_drafts_lossless(streamed, vanilla, prompts, 16)


def test_compressed_streaming_needs_bfloat16(random_folder):
    with pytest.raises(EngineError, match="bfloat16"):
        load_engine(EngineConfig(llm_path=str(random_folder), dtype="float32", emulate_offload=True,
                                 keep_first_n_layers_on_gpu=1, compressed_streaming=True))


def test_sampling_with_compressed_streaming_draws_what_plain_decoding_draws(random_folder):
    # Same seed, same distribution, same weights bit for bit: the same samples.
    common = dict(llm_path=str(random_folder), dtype="bfloat16")
    vanilla = load_engine(EngineConfig(**common))
    streamed = load_engine(EngineConfig(emulate_offload=True, keep_first_n_layers_on_gpu=1, compressed_streaming=True,
                                        **common))
    sampling = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=0.9, seed=5)
    for prompt in random_prompts(3, 512, seed=22):
        assert streamed.generate(prompt, sampling).token_ids == vanilla.generate(prompt, sampling).token_ids


def test_encoded_layers_are_kept_between_starts_and_serve_another_placement(random_folder, tmp_path, monkeypatch):
    # The first start encodes and stores; a start that streams fewer layers reads every one of them
    # from the cache (one codebook for the model); one that streams more encodes only the new one;
    # a damaged file is encoded again and rewritten. Every weight still arrives bit for bit.
    import engine.compress
    from transformers import AutoModelForCausalLM

    from engine.loading import encoded_cache_file

    monkeypatch.setenv("SUBSPEC_CACHE_DIR", str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(random_folder, dtype=torch.bfloat16)
    layers = [linear_tensors(layer) for layer in model.model.layers]
    cache = encoded_cache_file(random_folder)
    real = engine.compress.compress
    encoded: list[int] = []
    monkeypatch.setattr(engine.compress, "compress", lambda *a, **k: encoded.append(1) or real(*a, **k))

    def start(keep: int) -> None:
        stack = LayerStack(layers, torch.device("cpu"), keep_on_gpu=keep, num_slots=2, stream=True,
                           compressed=True, encoded_cache=cache)
        for i in range(len(layers)):
            for name, tensor in stack.weights(i).items():
                assert torch.equal(tensor.view(torch.int16), layers[i][name].view(torch.int16)), (keep, i, name)
            stack.done(i)

    total, pieces = len(layers), len(_piece_ranges(stack_numel(layers)))
    assert pieces == PIECES  # the random model's layers are large enough for every piece
    start(keep=1)
    assert len(encoded) == (total - 1) * pieces and cache.is_file()
    start(keep=2)
    assert len(encoded) == (total - 1) * pieces  # nothing encoded: read back
    start(keep=0)
    assert len(encoded) == total * pieces  # only layer 0's pieces
    cache.write_bytes(b"not safetensors")
    start(keep=1)
    assert len(encoded) == (2 * total - 1) * pieces and cache.stat().st_size > 100  # encoded again, written anew
    # A file that reads but holds other bits (damaged data, a stale layer): every blob is decoded
    # and compared before use; a piece that differs is encoded again and the file rewritten.
    from safetensors.torch import load_file, save_file

    start(keep=0)  # layer 0 back in the file
    assert len(encoded) == 2 * total * pieces
    stored = load_file(cache)
    assert total == 3
    stored["0.0"][8] ^= 1  # one bit of lane 1's offset: the lane decodes from the wrong bit
    stored["1.1"] = stored["2.1"].clone()  # another layer's piece under this key
    stored["2.3"] = stored["2.3"][:-3].clone()  # a truncated blob
    stored["2"] = stored["2.0"].clone()  # a key of an older form (whole layers): dropped on rewrite
    save_file(stored, cache)
    before = len(encoded)
    start(keep=0)
    assert len(encoded) == before + 3
    assert "2" not in load_file(cache)
    start(keep=0)
    assert len(encoded) == before + 3  # the rewritten file is good again


def stack_numel(layers: list) -> int:
    """Weights of one packed layer as LayerStack lays it out (its gaps included)."""
    from engine.offload import _layout, _numel

    return _numel(_layout(layers[0]))


def test_the_encoded_cache_follows_the_weight_files(tmp_path):
    from engine.loading import encoded_cache_file

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 10)
    first = encoded_cache_file(tmp_path)
    weights.write_bytes(b"y" * 11)
    assert encoded_cache_file(tmp_path) != first and first.parent.name == "compressed"
