"""What padding-free (packed) micro-batches remove, and the CPU step time padded vs packed.

    python scripts/measure_packing.py [--pairs 8] [--batches 500] [--repeats 5] [--threads 1]

Two length distributions of micro-batches of ``--pairs`` pairs (2B rows, T = the longest row):

* ``synthetic``: the shipped pairs (prefloss/data/, train split) tokenized with the default run's
  byte-level tokenizer (`prefloss.hf.tiny`), in file order, ``max_length`` 512;
* ``modelled``: a MODEL of real preference data (not measured data): prompt and response token
  counts log-normal, prompt median 160 tokens (σ 0.9), chosen and rejected medians 260 (σ 0.7),
  independent, each row cut to ``max_length`` 1024 (TRL's default), random pairs.

For each: the share of the padded ``2B·T`` positions that are padding, i.e. what packing removes from
the decoder's forward and backward (every position runs every layer) and from the loss's inputs (its
``[2B, T, H]`` hidden states and their gradient become ``[1, L, H]``; the fused op's head GEMMs skip
unscored rows -- prompt and padding -- in both layouts, so their work is unchanged).

Then one training micro-batch (policy forward+backward, reference forward, DPO loss through
`prefloss.hf.preference_loss`) padded vs packed, timed alternately in one process, median of
``--repeats``, on CPU with ``sdpa``, for a small Llama (hidden 256, 4 layers, 4 heads, MLP 688, byte
vocabulary 259). On CPU, sdpa with packed position ids gets a dense ``[L, L]`` block-causal mask:
attention does not get cheaper, only everything else; the attention gain needs GPUs with
variable-length attention (flash_attention_2/3, flex_attention). The timed batch's ``L²/(N·T²)`` is
the attention work of that dense mask over the padded batch's (N rows of T, L packed tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from prefloss import DPOLoss
from prefloss.data import synthetic_preferences_path
from prefloss.hf.collator import PreferenceCollator
from prefloss.hf.data import tokenize_preferences
from prefloss.hf.step import preference_loss
from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama


def synthetic_lengths(tok, max_length: int = 512) -> list[tuple[int, int, int]]:
    rows = [json.loads(line) for line in open(synthetic_preferences_path("train"))]
    data = tokenize_preferences(rows, tok, max_length=max_length)
    return [
        (len(r["prompt_input_ids"]), len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in data
    ]


def modelled_lengths(n: int, max_length: int = 1024, seed: int = 0) -> list[tuple[int, int, int]]:
    g = torch.Generator().manual_seed(seed)

    def lognormal(median: float, sigma: float) -> torch.Tensor:
        return (median * torch.exp(sigma * torch.randn(n, generator=g))).round().clamp(min=1)

    prompt, chosen, rejected = lognormal(160, 0.9), lognormal(260, 0.7), lognormal(260, 0.7)
    prompt = prompt.clamp(max=max_length // 2)  # keep room for a response, as a prompt cut would
    out = []
    for p, c, r in zip(prompt.tolist(), chosen.tolist(), rejected.tolist(), strict=True):
        out.append((int(p), int(min(c, max_length - p)), int(min(r, max_length - p))))
    return out


def padded_share(lengths: list[tuple[int, int, int]], pairs: int) -> tuple[float, float]:
    """(share of padding among the 2B·T positions, mean T) over consecutive micro-batches."""
    real = total = 0
    widths = []
    for start in range(0, len(lengths) - pairs + 1, pairs):
        rows = [p + c for p, c, _ in lengths[start : start + pairs]]
        rows += [p + r for p, _, r in lengths[start : start + pairs]]
        real += sum(rows)
        total += len(rows) * max(rows)
        widths.append(max(rows))
    return 1 - real / total, statistics.mean(widths)


def batch_of(lengths, pairs: int, tok, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = [
        {
            "prompt_input_ids": torch.randint(0, 256, (p,), generator=g).tolist(),
            "chosen_input_ids": torch.randint(0, 256, (c,), generator=g).tolist(),
            "rejected_input_ids": torch.randint(0, 256, (r,), generator=g).tolist(),
        }
        for p, c, r in lengths[:pairs]
    ]
    return PreferenceCollator(tok.pad_token_id)(features)


def step_times(batch, tok, repeats: int) -> dict[str, float]:
    policy = tiny_llama(tok, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688,
                        max_position_embeddings=2048, seed=0)  # fmt: skip
    ref = tiny_llama(tok, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688,
                     max_position_embeddings=2048, seed=1).eval().requires_grad_(False)  # fmt: skip
    assert policy.config._attn_implementation == "sdpa", policy.config._attn_implementation
    loss_fn = DPOLoss(beta=0.1)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["shift_labels"]
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    for i in range(repeats + 1):  # the first round warms up
        for mode in ("padded", "packed"):
            policy.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            out = preference_loss(
                loss_fn, policy, ids, mask, labels, ref_model=ref, padding_free=mode == "packed"
            )
            out.loss.backward()
            if i:
                times[mode].append(time.perf_counter() - t0)
    return {mode: statistics.median(t) for mode, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per micro-batch (default 8)")
    parser.add_argument("--batches", type=int, default=500, help="modelled micro-batches (default 500)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per layout (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = byte_level_tokenizer()
    sets = {"synthetic": synthetic_lengths(tok), "modelled": modelled_lengths(args.pairs * args.batches)}
    print("| lengths | pairs | mean T | padding removed | timed batch: T, padding, L²/(N·T²) | "
          "step padded (s) | step packed (s) | packed/padded |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, lengths in sets.items():
        share, width = padded_share(lengths, args.pairs)
        batch = batch_of(lengths, args.pairs, tok, seed=0)
        pad = 100 * float((batch["attention_mask"] == 0).float().mean())
        rows, width = batch["input_ids"].shape
        dense = float(batch["attention_mask"].sum()) ** 2 / (rows * width**2)  # [L, L] mask vs N·[T, T]
        timed = f"{width}, {pad:.1f}%, {dense:.1f}"
        times = step_times(batch, tok, args.repeats)
        print(
            f"| {name} | {args.pairs} | {width:.0f} | {100 * share:.1f}% | {timed} | {times['padded']:.3f} | "
            f"{times['packed']:.3f} | {times['packed'] / times['padded']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
