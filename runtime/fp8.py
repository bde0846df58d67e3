"""FP8 training on CUDA through torchao's float8 training (planner/cost/fp8.py models it).

The blocks' linear layers become torchao Float8Linear modules (convert_to_float8_training with
Float8LinearConfig.from_recipe_name: tensorwise or rowwise); the output layer stays bf16, as in
torchtitan's float8 converter.  Under FSDP2 (ZeRO-2/3) with tensorwise scaling the weights are
all-gathered in fp8 (enable_fsdp_float8_all_gather).  Everything that cannot run is refused in
one line before any process group exists."""

import importlib.util

TORCH_RECIPES = ("tensorwise", "rowwise")


def fp8_refusal(job, layout, cuda: bool) -> str:
    """Why this runtime cannot train `job` in FP8 here ('' when it can, or the job is not fp8)."""
    if not job.fp8:
        return ""
    if not cuda:
        return ("precision fp8: FP8 GEMMs (torch._scaled_mm) need a CUDA GPU with FP8 tensor "
                "cores; this run has none (CPU): plan it in bf16 or fp32")
    if job.fp8_recipe not in TORCH_RECIPES:
        return (f"fp8_recipe {job.fp8_recipe}: this runtime trains FP8 with torchao "
                f"({', '.join(TORCH_RECIPES)}); delayed scaling is Transformer Engine's: export "
                f"the plan to Megatron-LM")
    if layout.tp > 1:
        return (f"precision fp8 with tp={layout.tp}: this runtime does not wire torchao's "
                f"float8 tensor-parallel plans; use tp=1")
    if importlib.util.find_spec("torchao") is None:
        return "precision fp8 needs torchao (pip install torchao), which is not installed"
    return ""


def check_fp8(plan) -> None:
    import torch
    why = fp8_refusal(plan.job, plan.layout, torch.cuda.is_available())
    if why:
        raise ValueError(why)


def _block_linear(module, fqn: str) -> bool:
    """torchtitan's filter: every linear but the output layer (and dims divisible by 16, which
    torch._scaled_mm requires)."""
    import torch
    return (isinstance(module, torch.nn.Linear) and fqn.startswith("layers.")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_fp8(part, recipe: str, zero_stage: int) -> None:
    """Swap the part's block linears for torchao Float8Linear (meta device is fine)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    config = Float8LinearConfig.from_recipe_name(recipe)
    if recipe == "tensorwise" and zero_stage >= 2:
        import dataclasses
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    convert_to_float8_training(part, config=config, module_filter_fn=_block_linear)
