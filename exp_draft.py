"""Device experiment (not product code): what a 7B draft step costs under variants of its non-linear parts."""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
import offload_gpu as b  # noqa: E402

import engine.model as model_mod  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
results = {}


def save():
    with open(f"{OUT}/exp.json", "w") as f:
        json.dump(results, f, indent=1)


class Args:
    max_length = 2048
    shape = "qwen2.5-7b"


device = torch.device("cuda")
config = b.SHAPES["qwen2.5-7b"]()
model = b.random_model(config, torch.bfloat16, device)
engine, _ = b.build(model, config, Args, device, "subspec_sd", 8.0, max_depth=48, topk_len=6, tree_policy="reference")
target, drafter = engine.target, engine.drafter
ids = torch.randint(0, config.vocab_size, (600,), device=device)
target.transformer.prefill(target.stack, target.cache, ids, 512)
tree = b._reference_tree(1 + 6 * 8, config.vocab_size, target.cache.length, device)
frontier = torch.arange(tree.size - 6, tree.size, device=device)
timer = b.Timer(device)
orig_attention = model_mod.Transformer._attention


def measure(name):
    drafter.graphs._shapes.clear()
    drafter.graphs._outputs.clear()
    ref = drafter.log_probs(tree.tokens[frontier], tree.positions(frontier), tree.slots(frontier), tree.mask(frontier),
                            tree.prefix_len + tree.size).clone()
    started = time.perf_counter()
    got = drafter.draft_step(tree, frontier).clone()  # capture (and compile)
    first = time.perf_counter() - started
    ms = b.median_ms(lambda: drafter.draft_step(tree, frontier), timer, 30)
    kernels = b.kernel_breakdown(lambda: drafter.draft_step(tree, frontier))
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    results[name] = {"graph_ms": ms, "first_call_s": first, "argmax_agree_eager": agree,
                     "kernels": kernels}
    print(name, json.dumps(results[name])[:1500], flush=True)
    save()


def folded_attention(self, weights, cache, layer, h, cos, sin, slots, attn_mask, kv_end, q_norm, k_norm):
    T = h.shape[0]
    q, k, v = model_mod._projections(weights, "qkv_proj", ("q_proj", "k_proj", "v_proj"), self.qkv_sizes, h)
    q = q.view(T, self.num_heads, self.head_dim)
    k = k.view(T, self.num_kv_heads, self.head_dim)
    v = v.view(T, self.num_kv_heads, self.head_dim)
    q, k = model_mod._rotate(q.transpose(0, 1), cos, sin), model_mod._rotate(k.transpose(0, 1), cos, sin)
    cache.write(layer, slots, k, v.transpose(0, 1))
    keys, values = cache.view(layer, kv_end)
    group = self.num_heads // self.num_kv_heads
    qf = q.reshape(self.num_kv_heads, group * T, self.head_dim)
    mask = attn_mask[0, 0].repeat(group, 1)[None, None]
    out = F.scaled_dot_product_attention(qf[None], keys[None], values[None], attn_mask=mask)
    out = out[0].reshape(self.num_heads, T, self.head_dim)
    return model_mod._linear(weights, "o_proj", out.transpose(0, 1).reshape(T, -1))


def fused_norms():
    for norms in target.transformer.norms:
        for norm in norms:
            if norm is not None:
                w, eps = norm.weight, norm.variance_epsilon
                norm.forward = lambda x, w=w, eps=eps: F.rms_norm(x, (x.shape[-1],), w, eps)


try:
    measure("tinygemm fused (product)")
    model_mod.Transformer._attention = folded_attention
    measure("+ GQA folded into query rows")
    fused_norms()
    measure("+ F.rms_norm")
    model_mod.Transformer._attention = orig_attention
    for norms in target.transformer.norms:
        for norm in norms:
            if norm is not None:
                del norm.forward
    step = drafter.log_probs
    drafter.graphs.step = torch.compile(step, dynamic=False)
    measure("torch.compile(draft step), product code")
except Exception as err:  # noqa: BLE001
    results["error"] = repr(err)[:1000]
    print(results["error"], flush=True)
save()
