"""On a GPU, compressed streaming (engine.compress, the Triton decoder on its own stream) hands every
layer its weights bit for bit, forward after forward, and decodes as plain bf16 streaming does.
Skipped without CUDA (tests/test_compress.py covers the same promises with the CPU's reference
decoder); run on the device machine."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import EngineConfig, SamplingConfig
from engine.build import engine_from_model
from engine.loading import LoadedModel
from engine.offload import LayerStack, linear_tensors
from tests.random_models import config_for
from tests.test_gpu_row_invariant import NoText

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the Triton decoder runs there")
CUDA = torch.device("cuda")


def random_bf16(arch: str, layers: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    config = config_for(arch, num_hidden_layers=layers, hidden_size=256, intermediate_size=704)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_streamed_layers_arrive_bit_for_bit(slots):
    model = random_bf16("qwen3")
    layers = [linear_tensors(layer) for layer in model.model.layers]
    stack = LayerStack(layers, CUDA, keep_on_gpu=1, num_slots=slots, compressed=True)
    assert stack.offloaded_bytes < 0.75 * stack.weight_bytes
    for _ in range(3):  # forwards: every slot is reused while the next blobs cross and decode
        for i in range(len(layers)):
            for name, tensor in stack.weights(i).items():
                # Compared on the compute stream, after its wait for the decode (what a layer sees).
                assert torch.equal(tensor.view(torch.int16).cpu(), layers[i][name].view(torch.int16)), (i, name)
            stack.done(i)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_compressed_streaming_decodes_as_bf16_streaming(arch):
    model = random_bf16(arch)
    prompt = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    tokens = {}
    for compressed in (False, True):
        engine = engine_from_model(EngineConfig(device="cuda", keep_first_n_layers_on_gpu=1, offload_slots=2,
                                                compressed_streaming=compressed),
                                   LoadedModel(model, NoText(), arch, None))
        tokens[compressed] = engine.generate(prompt, SamplingConfig(max_new_tokens=24)).token_ids
        engine.close()
    assert tokens[True] == tokens[False]
