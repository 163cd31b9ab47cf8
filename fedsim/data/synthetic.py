"""Seeded toy sources: ``synthetic`` (classification: class indicator words mixed with shared noise words) and
``synthetic-arithmetic`` (task.kind causal_lm: one-step word problems, answer N). Both are sized by
``data.synthetic_examples`` (``synthetic`` also by ``data.synthetic_classes``) and seeded by the run's seed."""

from __future__ import annotations

import numpy as np

from fedsim.config.schema import DataConfig
from fedsim.data.registry import register_source
from fedsim.data.types import InstructDataset, TextDataset
from fedsim.errors import DataError
from fedsim.seeding import numpy_rng

_WORDS = """apple river stone cloud market garden winter music doctor engine forest bridge window letter silver
planet island castle summer harbor valley desert rocket tiger eagle ocean mountain village school train
camera coffee butter candle pencil wallet ladder mirror pillow rabbit monkey dragon violin guitar piano
basket bottle jacket hammer needle rubber saddle tunnel temple museum palace prison factory kitchen
theater stadium airport station office library hospital church farm field lake beach storm thunder
lightning rain snow wind fire ice gold iron copper glass paper wood cotton silk wool leather metal plastic
red blue green yellow purple orange brown black white gray pink one two three four five six seven eight nine
ten hundred thousand run walk jump swim climb fly drive ride read write sing dance cook paint build break
happy sad angry quiet loud bright dark warm cold soft hard fast slow big small old young new
king queen prince soldier farmer sailor pilot judge lawyer artist writer singer player teacher student
horse sheep goat chicken duck fish whale shark snake frog bird bear wolf fox deer lion mouse
bread cheese rice soup salad sugar salt pepper honey milk tea wine beer juice water
shirt shoe hat coat dress ring chain rope wheel door wall roof floor table chair bed lamp clock phone
north south east west left right up down inside outside near far above below
morning evening night today week month year season spring autumn""".split()
_FUNCTION_WORDS = "the a of and to in is it that was for on are with as at by this from".split()
_INDICATORS_PER_CLASS = 8
_MIN_NOISE_CONTENT = 40


def make_synthetic(num_examples: int, num_classes: int, seed: int) -> TextDataset:
    """A learnable toy task: each class owns 8 indicator words; texts mix them with shared noise.

    Each text has 12-20 words: ~30% its own class's indicators, ~5% other classes' indicators
    (so single words are not decisive), the rest shared noise. Classes are balanced
    (``i % C`` then shuffled). Vocabulary: at most 257 real English words for up to 27 classes.
    Seeded by ``numpy_rng(seed, "synthetic")``.

    Raises:
        DataError: fewer than 2 classes, or fewer examples than classes.
    """
    if num_classes < 2:
        raise DataError(
            f"data.synthetic_classes: {num_classes} class(es); a classification task needs at least 2 "
            "(--set data.synthetic_classes=4)."
        )
    if num_examples < num_classes:
        raise DataError(
            f"data.synthetic_examples: {num_examples} examples for {num_classes} classes; use at least one per "
            "class (--set data.synthetic_examples=2000)."
        )
    rng = numpy_rng(seed, "synthetic")
    words = [_WORDS[i] for i in rng.permutation(len(_WORDS))]
    n_ind = num_classes * _INDICATORS_PER_CLASS
    n_real = min(n_ind, len(words) - _MIN_NOISE_CONTENT)  # real words used as indicators; the rest are noise
    made_up = [f"c{i // _INDICATORS_PER_CLASS}w{i % _INDICATORS_PER_CLASS}" for i in range(n_real, n_ind)]
    indicators = np.asarray(words[:n_real] + made_up, dtype=object).reshape(num_classes, _INDICATORS_PER_CLASS)
    noise = np.asarray(words[n_real:] + _FUNCTION_WORDS, dtype=object)

    labels = rng.permutation(np.arange(num_examples, dtype=np.int64) % num_classes)
    lengths = rng.integers(12, 21, size=num_examples)
    texts: list[str] = []
    for y, n in zip(labels, lengths, strict=True):
        kind = rng.random(n)
        own = indicators[y, rng.integers(0, _INDICATORS_PER_CLASS, size=n)]
        other_cls = (y + rng.integers(1, num_classes, size=n)) % num_classes
        other = indicators[other_cls, rng.integers(0, _INDICATORS_PER_CLASS, size=n)]
        shared = noise[rng.integers(0, len(noise), size=n)]
        toks = np.where(kind < 0.30, own, np.where(kind < 0.35, other, shared))
        texts.append(" ".join(toks))
    names = tuple(f"class_{c}" for c in range(num_classes))
    return TextDataset(texts, labels, names)


_NAMES = "Ann Ben Cara Dan Eva Finn Gina Hugo Iris Jack Kate Liam Mia Noah Olga Paul".split()
_ITEMS = "apples pears books coins stamps shells marbles pencils cards eggs".split()
ARITHMETIC_OPS = ("add", "subtract", "multiply")


def make_arithmetic(num_examples: int, seed: int) -> InstructDataset:
    """Seeded one-step word problems, ``numpy_rng(seed, "arithmetic")``; group = operation (add, subtract,
    multiply; balanced, ``i % 3`` then shuffled); the response is the answer number.

    Raises DataError for fewer than 3 examples (one per operation)."""
    if num_examples < len(ARITHMETIC_OPS):
        raise DataError(
            f"data.synthetic_examples: {num_examples}; synthetic-arithmetic needs at least one example per "
            f"operation ({len(ARITHMETIC_OPS)}), e.g. --set data.synthetic_examples=600."
        )
    rng = numpy_rng(seed, "arithmetic")
    ops = rng.permutation(np.arange(num_examples, dtype=np.int64) % len(ARITHMETIC_OPS))
    prompts, answers = [], []
    for op in ops:
        name, item = _NAMES[rng.integers(len(_NAMES))], _ITEMS[rng.integers(len(_ITEMS))]
        a, b = int(rng.integers(2, 20)), int(rng.integers(1, 10))
        if op == 0:
            q, n = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
        elif op == 1:
            a += b
            q, n = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?", a - b
        else:
            q, n = f"{name} has {b} boxes with {a} {item} in each box. How many {item} does {name} have?", a * b
        prompts.append(q)
        answers.append(str(n))
    return InstructDataset(
        prompts=prompts,
        responses=list(answers),
        answers=answers,
        labels=ops,
        label_names=ARITHMETIC_OPS,
        answer_kind="number",
    )


@register_source("synthetic")
def _synthetic_source(cfg: DataConfig, seed: int, arg: str | None) -> TextDataset:
    return make_synthetic(cfg.synthetic_examples, cfg.synthetic_classes, seed)


@register_source("synthetic-arithmetic", tasks=("causal_lm",))
def _arithmetic_source(cfg: DataConfig, seed: int, arg: str | None) -> InstructDataset:
    return make_arithmetic(cfg.synthetic_examples, seed)
