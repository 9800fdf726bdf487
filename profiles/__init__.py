"""Hardware profiles: how a model + method fits this machine's GPU (DESIGN.md section 4).

Two entry points for front ends:

Before a download (no weights, no GPU needed), from a transformers PretrainedConfig or a
config.json dict, like LM Studio's estimate::

    from profiles import estimate_plan, GIB
    plan = estimate_plan(config, 8 * GIB, "subspec_sd", max_context=2048,
                         substitute_bits=4, substitute_group=64)
    plan.fits, plan.layers_on_gpu, plan.layers_total, plan.stream_buffers, plan.reason
    plan.weights_bytes, plan.kv_cache_bytes, plan.buffers_bytes, plan.total_bytes
    plan.summary()  # "weights 5.45 GiB, KV 0.11 GiB, buffers 1.24 GiB (2 stream buffers and
                    #  workspace), 0 of 28 layers on GPU, 7.60 of 8.00 GiB: fits"

Measured on this machine (`subspec profile`, the TUI's first start)::

    from profiles import run_profile, format_profile
    profile = run_profile(model=None, vram_limit_gb=None, method="subspec_sd", progress=print)
    profile.plan            # ModelPlan: layers_on_gpu, stream_buffers, tree budget, measured peak, ...
    profile.plan.engine_overrides()  # EngineConfig fields the plan decides (offload_slots included)
    profile.as_dict()       # for --json
    print(format_profile(profile))

`run_profile` returns the stored profile when one matches (same GPU, model, method, cap) unless
`force`; otherwise it measures: on CUDA a trial load that lowers the resident layers (then the
stream buffers) until the measured peak fits, then a tree budget from timed forwards; on a CPU the fastest method measured.
Expected failures raise `ProfileError`, a subclass of `engine.EngineError` (one line for the user).
"""

from profiles.memory import GIB, ModelShapeError, Plan, estimate_plan
from profiles.runner import Profile, format_profile, run_profile
from profiles.store import ModelPlan, ProfileError, ProfileStore

__all__ = [
    "GIB",
    "ModelPlan",
    "ModelShapeError",
    "Plan",
    "Profile",
    "ProfileError",
    "ProfileStore",
    "estimate_plan",
    "format_profile",
    "run_profile",
]
