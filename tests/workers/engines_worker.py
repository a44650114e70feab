"""Worker for tests/test_hf_engines.py: trains the tiny Llama under one engine, saves what it saw.

    python engines_worker.py FAMILY OUT_DIR PORT

FAMILY: ``single`` (one process, no engine: the baselines), ``ddp``, ``fsdp2`` or ``zero3`` (two
gloo processes). Each configuration of the family trains the losses `CONFIGS` gives it for 2
optimizer steps of 2 micro-batches (plain SGD), with ``prefloss.hf.preference_loss`` and a reference
prepared by ``prefloss.hf.prepare_reference``. Per engine, the plain fp32 configuration trains all
three losses (α-DPO's all-reduced running statistics, ε-DPO's per-pair β, DPO); each variant that
changes how the engine holds the parameters (head unit, resharding, tied embeddings, bf16, LoRA,
packed rows) trains one of them, the losses rotated over the variants so that each loss meets
several; the single process trains only the losses its configurations are compared on. Rank r
holds pairs ``[rB, (r+1)B)`` of each micro-batch; the single process holds all ``2B`` (chosen rows
first, then rejected), so the mean of the ranks' losses and the reduced gradients equal the single
process's. The policy starts equal to the reference, so
at the first micro-batch every reward must be exactly 0. The ``-packed`` configurations run
``preference_loss(padding_free=True)`` (each rank packs its own rows; one process packs the merged
batch).

The ``moe`` configurations train a tiny Mixtral (4 experts, 2 per token) with DPO, adding its
routers' load-balancing loss (``router_aux_loss_coef`` = `MOE_COEF`). That loss is a product of two
token means, so it is computed per rank on the rank's rows (as every DDP/ZeRO-3 run of a MoE does):
the single process computes each rank's rows in turn (`micro_batch_loss`) and takes the mean, which
with DPO's per-pair mean equals the 2 ranks exactly.

The single family's configurations are shared out over 2 processes, each computing its own alone
(`main_single`). Saved (rank 0, ``OUT_DIR/FAMILY.pt``): per configuration and loss, the 4
micro-batch losses (mean over ranks), whether the first micro-batch's rewards were all exactly 0,
the full (gathered) gradients at both optimizer steps, the loss state after each step, how often
prefloss gathered a sharded head in forward and in backward, and for the MoE the micro-batches' aux
losses (mean over ranks) and their coefficient. Run with cwd outside the repository, so its top-level
``kernels/`` folder is never on ``sys.path``.
"""

from __future__ import annotations

import copy
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from worker_setup import distributed_env, launch, merge_parts  # noqa: E402

import prefloss  # noqa: E402
from prefloss.hf import engines  # noqa: E402
from prefloss.hf.adapters import AdaptersDisabled  # noqa: E402
from prefloss.hf.step import preference_loss  # noqa: E402
from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama, tiny_moe  # noqa: E402

PAIRS_PER_RANK, WORLD, T, GAS, STEPS, LR = 2, 2, 16, 2, 2, 0.5
CHUNK = 8  # rows per chunk of the fused op: many chunks, so a per-chunk gather would show
MOE_COEF = 0.5  # the MoE's load-balancing coefficient: large, so that its gradients show
ALL = ("alpha_dpo", "epsilon_dpo", "dpo")
# configuration -> the losses it trains (module docstring). A variant's loss must be among its
# baseline's (tests/test_hf_engines.py: _baseline); bf16 ones are also compared with "fp32".
CONFIGS = {
    "single": {
        "fp32": ALL,
        "fp32-tied": ("epsilon_dpo", "dpo"),
        "fp32-lora": ("alpha_dpo",),
        "bf16-params": ("alpha_dpo", "dpo"),
        "bf16-module": ("epsilon_dpo",),
        "fp32-moe": ("dpo",),
        "fp32-packed": ("alpha_dpo", "epsilon_dpo"),
    },
    "ddp": {"ddp": ALL, "ddp-packed": ("alpha_dpo",)},
    "fsdp2": {
        "fsdp2-root": ALL,
        "fsdp2-root-raf": ("epsilon_dpo",),
        "fsdp2-head": ("dpo",),
        "fsdp2-head-keep": ("alpha_dpo",),
        "fsdp2-tied-raf": ("epsilon_dpo",),
        "fsdp2-root-raf-bf16": ("alpha_dpo",),
        "fsdp2-head-bf16": ("dpo",),
        "fsdp2-lora-raf": ("alpha_dpo",),
        "fsdp2-root-raf-packed": ("epsilon_dpo",),
    },
    "zero3": {
        "zero3": ALL,
        "zero3-tied": ("dpo",),
        "zero3-bf16": ("epsilon_dpo",),
        "zero3-lora": ("alpha_dpo",),
        "zero3-moe": ("dpo",),
        "zero3-packed": ("epsilon_dpo",),
    },
}


def make_losses(config: str, family: str) -> dict[str, torch.nn.Module]:
    """The losses ``config`` of ``family`` trains (`CONFIGS`), fresh."""
    build = {
        "alpha_dpo": lambda: prefloss.AlphaDPOLoss(chunk_size=CHUNK),
        "epsilon_dpo": lambda: prefloss.EpsilonDPOLoss(
            beta=0.5, epsilon=0.3, compare_dtype=None, chunk_size=CHUNK
        ),
        "dpo": lambda: prefloss.DPOLoss(beta=0.5, chunk_size=CHUNK),
    }
    return {name: build[name]() for name in CONFIGS[family][config]}


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``STEPS * GAS`` micro-batches of ``WORLD * PAIRS_PER_RANK`` pairs, merged layout."""
    g = torch.Generator().manual_seed(1234)
    pairs = WORLD * PAIRS_PER_RANK
    batches = []
    for _ in range(STEPS * GAS):
        ids = torch.randint(0, 256, (2 * pairs, T), generator=g)
        lengths = torch.randint(T - 5, T + 1, (2 * pairs,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        prompt = torch.randint(2, 6, (pairs,), generator=g).repeat(2)  # a pair shares its prompt
        labels = torch.cat([ids[:, 1:], torch.full((2 * pairs, 1), -100)], dim=1)
        labels[torch.arange(T)[None, :] < prompt[:, None] - 1] = -100
        next_is_padding = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1).eq(0)
        labels[next_is_padding] = -100
        ids = ids.masked_fill(mask.eq(0), 258)
        batches.append((ids, mask, labels))
    return batches


def rank_rows(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rows of rank ``rank``: its chosen rows, then its rejected rows."""
    pairs = x.shape[0] // 2
    per = pairs // world
    chosen, rejected = x[:pairs], x[pairs:]
    return torch.cat([chosen[rank * per : (rank + 1) * per], rejected[rank * per : (rank + 1) * per]])


def build_model(config: str) -> torch.nn.Module:
    """The tiny Llama; ``lora`` configurations wrap it in LoRA adapters (q/v) with a trained head
    (``modules_to_save``), whose reference is the same model with adapters disabled."""
    tok = byte_level_tokenizer()
    if "moe" in config:
        return tiny_moe(tok, "mixtral", router_aux_loss_coef=MOE_COEF, seed=0)
    model = tiny_llama(
        tok, hidden_size=32, intermediate_size=64, num_heads=2, seed=0, tie_word_embeddings="tied" in config
    )
    if "lora" in config:
        import peft

        torch.manual_seed(0)  # LoRA's A matrices; B starts at 0, so the policy starts equal to the reference
        lora = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]
        )
        model = peft.get_peft_model(model, lora)
    return model


def reference(config: str, ref: torch.nn.Module, policy: torch.nn.Module) -> torch.nn.Module:
    if "lora" in config:
        return AdaptersDisabled(engines.unwrap_model(policy))
    return engines.prepare_reference(ref, policy)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def deepspeed_config(config: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": PAIRS_PER_RANK,
        "gradient_accumulation_steps": GAS,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": "bf16" in config},
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told otherwise
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def setup(config: str, model: torch.nn.Module, ref: torch.nn.Module):
    """(policy as the engine holds it, prepared reference, optimizer or DeepSpeed engine)."""
    if config.startswith("fsdp2"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if config.endswith("bf16"):
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy()
        for layer in model.get_decoder().layers:
            fully_shard(layer, mp_policy=mp)
        if "-head" in config:
            fully_shard(model.lm_head, mp_policy=mp, reshard_after_forward="keep" not in config)
        fully_shard(model, mp_policy=mp, reshard_after_forward="raf" in config)
        opt = torch.optim.SGD(trainable(model), lr=LR)
        return model, reference(config, ref, model), opt
    if config.startswith("zero3"):
        import deepspeed

        cfg = deepspeed_config(config)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(trainable(model), lr=LR), config=cfg
        )
        return engine, reference(config, ref, engine), engine
    if config.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel

        policy = DistributedDataParallel(model)
        return policy, reference(config, ref, policy), torch.optim.SGD(model.parameters(), lr=LR)
    if config == "bf16-params":  # what FSDP2's bf16 MixedPrecisionPolicy computes with: params only
        opt = MasterWeightsSGD(model)
        for m in (model, ref):
            for p in m.parameters():
                p.data = p.data.to(torch.bfloat16)
        return model, engines.prepare_reference(ref, model), opt
    if config == "bf16-module":  # what DeepSpeed's bf16 computes with: module.bfloat16()
        opt = MasterWeightsSGD(model)
        model, ref = model.bfloat16(), ref.bfloat16()
        return model, engines.prepare_reference(ref, model), opt
    return model, reference(config, ref, model), torch.optim.SGD(trainable(model), lr=LR)


class MasterWeightsSGD:
    """SGD on fp32 master copies of 16-bit parameters, as both engines' bf16 modes do."""

    def __init__(self, model: torch.nn.Module) -> None:  # called while the parameters are fp32
        self.pairs = [(p, p.detach().clone()) for p in model.parameters()]

    def step(self) -> None:
        with torch.no_grad():
            for p, master in self.pairs:
                if p.grad is not None:
                    master.add_(p.grad.float(), alpha=-LR)
                    p.copy_(master)

    def zero_grad(self) -> None:
        for p, _ in self.pairs:
            p.grad = None


def full_grads(config: str, policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    inner = engines.unwrap_model(policy)
    grads = {}
    for name, p in inner.named_parameters():
        if config.startswith("zero3"):
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
        elif config.startswith("fsdp2"):
            g = p.grad.full_tensor() if p.grad is not None else None
        else:
            g = p.grad
        if g is not None:
            grads[name] = g.detach().float().clone()
    return grads


def full_params(config: str, policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    inner = engines.unwrap_model(policy)
    params = {}
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        if config.startswith("zero3"):
            from deepspeed.utils import safe_get_full_fp32_param

            value = safe_get_full_fp32_param(p)
        elif config.startswith("fsdp2"):
            value = p.full_tensor()
        else:
            value = p
        params[name] = value.detach().float().clone()
    return params


class GatherCounter:
    """Counts prefloss's gathers of a sharded head, split into forward and backward."""

    def __init__(self) -> None:
        self.forward = self.backward = 0
        for cls in (engines.FSDP2Head, engines.DeepSpeedHead):
            original = cls.gather

            def counted(access, _original=original):
                if torch._C._current_graph_task_id() != -1:  # inside a backward pass
                    self.backward += 1
                else:
                    self.forward += 1
                return _original(access)

            cls.gather = counted


def micro_batch_loss(config, loss_fn, policy, ref, batch, rank: int, world: int):
    """(loss, whether every reward is exactly 0, the MoE's aux loss or ``None``) of this rank's rows
    of ``batch``; for the MoE in one process, the mean over the `WORLD` ranks' rows, each with its own
    aux loss (module docstring)."""
    coef = MOE_COEF if "moe" in config else 0.0
    ranks = range(WORLD) if coef and world == 1 else [rank]
    world = WORLD if coef and world == 1 else world
    outs = [
        preference_loss(
            loss_fn,
            policy,
            *(rank_rows(x, r, world) for x in batch),
            ref_model=ref,
            router_aux_loss_coef=coef,
            padding_free=config.endswith("-packed"),
        )
        for r in ranks
    ]
    loss = sum(out.loss for out in outs) / len(outs)
    zero = all(bool(o.chosen_rewards.eq(0).all() and o.rejected_rewards.eq(0).all()) for o in outs)
    aux = sum(out.metrics["aux_loss"] for out in outs) / len(outs) if coef else None
    return loss, zero, aux


def run_config(config: str, family: str, rank: int, world: int, counter: GatherCounter) -> dict:
    batches = make_batches()
    result = {}
    for loss_name, loss_fn in make_losses(config, family).items():
        model = build_model(config)
        ref = copy.deepcopy(model)
        policy, ref, opt = setup(config, model, ref)
        losses, grads, states, params, auxes, zero_rewards = [], [], [], [], [], None
        counter.forward = counter.backward = 0
        for step in range(STEPS):
            for micro in range(GAS):
                batch = batches[step * GAS + micro]
                loss, zero, aux = micro_batch_loss(config, loss_fn, policy, ref, batch, rank, world)
                if zero_rewards is None:
                    zero_rewards = zero
                if config.startswith("zero3"):
                    policy.backward(loss)  # scales by 1/GAS itself
                    if micro < GAS - 1:
                        policy.step()  # DeepSpeed counts micro-steps here; it updates only at the boundary
                else:
                    (loss / GAS).backward()
                for value, into in ((loss, losses), (aux, auxes)):
                    if value is None:
                        continue
                    value = value.detach().float().clone()
                    if world > 1:
                        dist.all_reduce(value)
                        value /= world
                    into.append(value)
            grads.append(full_grads(config, policy))
            opt.step()
            if not config.startswith("zero3"):
                opt.zero_grad()
            if hasattr(loss_fn, "update_beta"):
                loss_fn.update_beta()
            states.append({k: v.detach().clone() for k, v in loss_fn.state_dict().items()})
            params.append(full_params(config, policy))
        result[loss_name] = {
            "losses": torch.stack(losses),
            "zero_rewards_at_start": zero_rewards,
            "grads": grads,
            "states": states,
            "params": params,
            "gathers": (counter.forward, counter.backward),
        }
        if auxes:
            result[loss_name].update(aux=torch.stack(auxes), aux_coef=MOE_COEF)
    return result


def main(rank: int, world: int, family: str, out_dir: str, port: int) -> None:
    """Rank ``rank`` of ``world`` trains `CONFIGS` ``[family]``; joins the process group a job before
    it in this process set up (combined_worker.py), else sets it up; leaves it for the jobs after."""
    torch.set_num_threads(1)
    if not dist.is_initialized():
        os.environ.update(distributed_env(rank, world, port))
        if family == "zero3":
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world)
    counter = GatherCounter()
    results = {config: run_config(config, family, rank, world, counter) for config in CONFIGS[family]}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, f"{family}.pt"))
    dist.barrier()


def main_single(part: int, parts: int, out_dir: str) -> None:
    """Part ``part`` of ``parts`` of the one-process baselines: every ``parts``-th configuration, each
    computed by this process alone (no process group), so that the baselines use both cores."""
    torch.set_num_threads(1)
    counter = GatherCounter()
    configs = list(CONFIGS["single"])[part::parts]
    results = {config: run_config(config, "single", 0, 1, counter) for config in configs}
    torch.save(results, os.path.join(out_dir, f"single-{part}.pt"))


def merge_single(out_dir: str, parts: int = WORLD) -> None:
    """``OUT_DIR/single.pt`` from the ``parts`` files `main_single` saved."""
    merge_parts(out_dir, CONFIGS["single"], parts)


def preload(family: str) -> tuple[str, ...]:
    """Modules the launcher imports before it forks the ranks (`worker_setup.launch`)."""
    return ("deepspeed",) if family == "zero3" else ()


if __name__ == "__main__":
    family, out_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if family == "single":
        launch(main_single, (WORLD, out_dir), nprocs=WORLD)
        merge_single(out_dir)
    else:
        launch(main, (WORLD, family, out_dir, port), nprocs=WORLD, preload=preload(family))
