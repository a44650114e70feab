"""Write the synthetic preference data shipped in ``prefloss/data/`` (used by ``prefloss train``).

The preference is a rule the prompt determines, so it can be learned only by reading the prompt:

    prompt   "shout: mOuNtaIn river\\n"      (an instruction, then 1-3 words in random letter case)
    chosen   "MOUNTAIN RIVER"                (shout -> UPPER, whisper -> lower, title -> Title)
    rejected "mountain river"                (one of the two other casings, at random)

Every casing is the chosen one a third of the time and the rejected one two thirds of the time, so a
model that ignores the instruction cannot beat ~50% pairwise accuracy. The held-out split uses words
that never occur in the training split.

Usage: python scripts/make_synthetic_preferences.py [--out-dir prefloss/data] [--train 2000] [--eval 200]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = """
apple river mountain garden window candle silver forest bridge castle meadow harbor island
jungle ladder marble needle orange pepper planet rabbit saddle shadow spider summer thunder
tiger tunnel valley wagon winter yellow anchor basket bottle butter camera carpet cherry
circle cotton dragon engine falcon feather finger flower frozen galaxy ginger golden hammer
helmet honey hunter jacket kettle kitten lemon letter lizard magnet mirror monkey muffin
napkin ocean oyster palace pencil pillow pirate pocket potato puzzle rocket salmon sandal
school sister spring stable statue stone sugar switch table tomato turtle velvet violin
walnut wizard wonder zipper arrow beacon blossom canyon cactus copper desert echo ember
fabric fiddle glacier granite hollow lantern legend meteor nectar orchid parrot pebble
quartz ribbon riddle saffron scarlet sparrow thistle timber tundra voyage willow cobalt
""".split()

INSTRUCTIONS = {
    "shout": str.upper,
    "whisper": str.lower,
    "title": str.title,
}


def random_case(word: str, rng: random.Random) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in word)


def make_pair(words: list[str], rng: random.Random) -> dict[str, str]:
    phrase = rng.sample(words, rng.randint(1, 3))
    instruction = rng.choice(sorted(INSTRUCTIONS))
    other = rng.choice(sorted(set(INSTRUCTIONS) - {instruction}))
    text = " ".join(phrase)
    return {
        "prompt": f"{instruction}: {' '.join(random_case(w, rng) for w in phrase)}\n",
        "chosen": INSTRUCTIONS[instruction](text),
        "rejected": INSTRUCTIONS[other](text),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parents[1] / "prefloss" / "data"))
    parser.add_argument("--train", type=int, default=2000, help="training pairs")
    parser.add_argument("--eval", type=int, default=200, help="held-out pairs (unseen words)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    words = sorted(set(WORDS))
    rng.shuffle(words)
    n_eval_words = len(words) // 5
    eval_words, train_words = words[:n_eval_words], words[n_eval_words:]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, n, vocab in (("train", args.train, train_words), ("eval", args.eval, eval_words)):
        path = out / f"synthetic_preferences_{split}.jsonl"
        with path.open("w") as f:
            for _ in range(n):
                f.write(json.dumps(make_pair(vocab, rng)) + "\n")
        print(f"wrote {n} pairs to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
