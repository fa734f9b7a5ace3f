"""Held-out loss per set during training: does Chinese improve while English holds, on data the model never trains on.

    held_out = load_held_out(settings, data, rank, world_size)  # None when eval_data_root_dir is empty
    scores = held_out.evaluate(engine)                          # on every rank; every rank gets the same figures

Samples. Each set of `eval_sets` (empty: the training mix's sets) is a folder <eval_data_root_dir>/<set>/<NNNNN>.jsonl
in the training corpus's layout. Its records become samples by the stage's own rules: its RecordRules.build()
(with the prompt files of the *training* root) and the training stream's SampleBuilder, so formats, masks,
max_seq_length and long_text are those of training. The samples are the first `eval_samples_per_set` in file and
line order, drawn (prompts, directions, LM prefix masks) with an RNG of their own whose seed is fixed: they do not
depend on the training seed, the ranks or the world size. They are built once, at start-up, so every evaluation
scores exactly the same tokens, and no evaluation touches the training stream or its RNG.

Sharding. Every rank builds the same list and scores samples rank, rank + W, rank + 2W, ... Every rank runs the same
number of forward passes (a batch with nothing counted pads the shorter shares): under Gemini a forward gathers
parameter chunks collectively (GeminiDDP._inference_forward in colossalai/zero/gemini/gemini_ddp.py).

Loss. Per set: the summed token cross-entropy over all ranks / the counted target tokens over all ranks (a
token-weighted mean; padding and masked prompt tokens never count). "mix" weights the per-set losses as
pretrain_data_split weights the sets; a set outside the training mix is scored and reported, but not in "mix".

Bits per byte and per character, beside it: the same summed nats / ln 2 / the UTF-8 bytes (characters) of the text the
counted target tokens spell (llama.text_units; an end token spells nothing, its loss still counts). Unlike the
per-token loss they do not change with the tokenizer: a base model and its widened copy read on one scale. "mix"
weights them as it weights the losses.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from llama.text_units import TextUnits
from training.batching import pad_batch
from training.corpus import DataError, Location, RecordError, list_set_files, parse_record
from training.samples import Sample
from training.settings_concerns import Settings

logger = logging.getLogger(__name__)

EVAL_SEED = "held-out seed=0"  # fixed, and not the training seed: the same samples for every run of a stage


@dataclass(frozen=True)
class Score:
    loss: float  # token-weighted mean cross-entropy in nats
    tokens: int  # counted target tokens, all ranks
    bits_per_byte: float = math.nan  # summed nats / ln 2 / UTF-8 bytes the counted tokens spell
    bits_per_char: float = math.nan  # the same per character
    bytes: int = 0
    chars: int = 0

    @property
    def ppl(self) -> float:
        try:
            return math.exp(self.loss)
        except OverflowError:
            return math.inf

    def row(self) -> dict:
        """The figures as metrics.jsonl records them."""
        return {"loss": self.loss, "ppl": self.ppl, "tokens": self.tokens, "bits_per_byte": self.bits_per_byte,
                "bits_per_char": self.bits_per_char, "bytes": self.bytes, "chars": self.chars}


def bits_per(nats: float, units: int) -> float:
    """Summed nats over `units` bytes or characters, in bits per unit (nan for none)."""
    return nats / math.log(2) / units if units else math.nan


@dataclass
class Scores:
    """One evaluation: per set, and mix-weighted over the sets in the training mix (None if there are none)."""

    sets: dict[str, Score]
    mix: Score | None
    weights: dict[str, int] = field(default_factory=dict)  # the mix weights of the sets in "mix"
    seconds: float = 0.0


def load_held_out(run: Settings, data, rank: int, world_size: int) -> "HeldOut | None":
    """The held-out sets of `run`'s settings, built with the rules of the training stream `data` (a DataStream);
    None when eval_data_root_dir is empty. Bad input (missing folder, bad record, no usable record) is a
    DataError that names the set and the path, raised at start-up."""
    if not run.evaluation.eval_data_root_dir.strip():
        return None
    settings = run.evaluation
    root = Path(settings.eval_data_root_dir)
    if not root.is_dir():
        raise DataError(f"setting 'eval_data_root_dir': folder {root.resolve()} does not exist")
    names = list(settings.eval_sets) or list(data.split)
    # The stage's build() and prompt files, read from the training root: a held-out task record gets the prompts
    # its training twin gets.
    rules = type(data.rules)(data.root, names)
    sets = {}
    for name in names:
        folder = root / name
        if not folder.is_dir():
            source = "eval_sets" if settings.eval_sets else "pretrain_data_split (eval_sets is empty)"
            raise DataError(f"held-out set '{name}': folder {folder} does not exist ({source} names it)")
        sets[name] = held_out_samples(rules, data.builder, list_set_files(root, name, 0), name,
                                      settings.eval_samples_per_set, run.data.skip_bad_records)
    weights = {name: data.split[name].weight for name in names if name in data.split}
    held_out = HeldOut(sets, weights, settings.eval_steps, run.data.batch_size, data.tokenizer.pad_id, rank,
                       world_size, TextUnits.of(data.tokenizer))
    counts = [f"{name} {len(samples)} samples" + ("" if name in weights else " (not in the mix)")
              for name, samples in sets.items()]
    logger.info("held-out evaluation every %d steps from %s: %s", settings.eval_steps, root, ", ".join(counts))
    return held_out


def held_out_samples(rules, builder, files: list[Path], set_name: str, count: int,
                     skip_bad_records: bool) -> list[Sample]:
    """The first `count` samples of the set's records in file and line order: records through the stage's
    rules.build(), samples through the training SampleBuilder, both with the fixed-seed RNG. Fewer when the
    files hold fewer (no wrap-around: a held-out sample is never scored twice)."""
    rng = random.Random(f"{EVAL_SEED} set={set_name}")  # per set: adding a set changes no other set's samples
    counters = Counter()  # the builder's cut and skip counts, and ours
    samples: list[Sample] = []
    specs = []
    for where, raw in _lines(files, set_name):
        if len(samples) >= count:
            break
        if not raw.strip():
            continue
        try:
            spec = rules.build(set_name, parse_record(raw), rng)
        except RecordError as e:
            if not skip_bad_records:
                raise DataError(f"held-out {where}: {e} (skip_bad_records=True skips such records)") from None
            counters["bad_records"] += 1
            logger.warning("held-out %s: skipped bad record: %s", where, e)
            continue
        if spec is None:
            counters["empty_texts"] += 1
            continue
        specs.append(spec)
        if len(samples) + len(specs) >= count:  # enough records for now: tokenize them in one batch call
            samples += [s for built in builder.build(specs, rng, counters) for s in built]
            specs = []
    samples += [s for built in builder.build(specs, rng, counters) for s in built] if specs else []
    samples = samples[:count]
    if not samples:
        raise DataError(f"held-out set '{set_name}': no usable record in {files[0].parent} ({len(files)} file(s); "
                        f"{counters['bad_records']} bad, {counters['empty_texts']} empty, "
                        f"{counters['too_long']} too long for max_seq_length={builder.max_seq_length})")
    if len(samples) < count:
        logger.warning("held-out set '%s': %d samples (eval_samples_per_set=%d): %s holds no more", set_name,
                       len(samples), count, files[0].parent)
    return samples


def _lines(files: list[Path], set_name: str):
    """(where, raw line) over the files in order, streamed."""
    for path in files:
        try:
            with open(path, "rb") as f:
                for number, raw in enumerate(f, 1):
                    yield Location(set_name, path, number), raw
        except OSError as e:
            raise DataError(f"held-out set '{set_name}', file {path}: cannot read: {e}") from e


class HeldOut:
    """This rank's share of every held-out set as ready batches, and the evaluation over them."""

    def __init__(self, sets: dict[str, list[Sample]], weights: dict[str, int], every: int, batch_size: int,
                 pad_id: int, rank: int, world_size: int, units: TextUnits):
        self.names = list(sets)
        self.weights = weights
        self.every = every
        self.batches = {name: _share_batches(samples, rank, world_size, batch_size, pad_id, units)
                        for name, samples in sets.items()}
        self._warned_not_ready = False

    def due(self, step: int, max_steps: int) -> bool:
        """After step `step`: every `every` optimizer steps and at the end (step 0 is the loop's own call)."""
        return step % self.every == 0 or step == max_steps

    @torch.no_grad()
    def evaluate(self, engine) -> Scores | None:
        """Score every set with the engine's model as it is now: eval mode (no dropout), no autograd graph, the
        training precision (engine.autocast(), the plugin's own casts). None when the engine cannot run a
        forward outside training yet."""
        if not engine.inference_ready():
            if not self._warned_not_ready:
                logger.warning("held-out evaluation skipped: the engine cannot run a forward outside training "
                               "before its first step (gemini_placement_policy='auto' measures memory in it)")
                self._warned_not_ready = True
            return None
        start = time.perf_counter()
        device = engine.choice.device
        # Per set: [summed token loss, counted tokens, their bytes, their characters]; float64, so that summing
        # many batches adds no rounding.
        totals = torch.zeros(len(self.names), 4, dtype=torch.float64, device=device)
        model = engine.model
        was_training = model.training
        model.eval()
        try:
            for index, name in enumerate(self.names):
                for batch in self.batches[name]:
                    with engine.autocast():
                        loss, _ = model(batch["input_ids"].to(device, non_blocking=True),
                                        loss_mask=batch["loss_mask"].to(device, non_blocking=True))
                    # The model's loss is the mean over its counted targets: times their count, the sum.
                    totals[index, 0] += loss.double() * batch["num_counted"]
                    totals[index, 1] += batch["num_counted"]
                    totals[index, 2] += batch["num_bytes"]
                    totals[index, 3] += batch["num_chars"]
        finally:
            model.train(was_training)
        dist.all_reduce(totals)
        sets = {name: Score(loss_sum / tokens if tokens else math.nan, int(tokens), bits_per(loss_sum, n_bytes),
                            bits_per(loss_sum, n_chars), int(n_bytes), int(n_chars))
                for name, (loss_sum, tokens, n_bytes, n_chars) in zip(self.names, totals.tolist())}
        return Scores(sets, mix_score(sets, self.weights), dict(self.weights), time.perf_counter() - start)


def mix_score(sets: dict[str, Score], weights: dict[str, int]) -> Score | None:
    """The per-set losses weighted as the training mix weights the sets; sets outside the mix are left out."""
    if not weights:
        return None
    total = sum(weights.values())

    def mean(figure: str) -> float:
        return sum(weights[name] * getattr(sets[name], figure) for name in weights) / total

    return Score(mean("loss"), sum(sets[name].tokens for name in weights), mean("bits_per_byte"),
                 mean("bits_per_char"), sum(sets[name].bytes for name in weights),
                 sum(sets[name].chars for name in weights))


def _share_batches(samples: list[Sample], rank: int, world_size: int, batch_size: int, pad_id: int,
                   units: TextUnits) -> list[dict]:
    """Padded batches of samples rank, rank + W, ...; as many on every rank (see the module docstring)."""
    share = sorted(samples[rank::world_size], key=lambda s: len(s.ids), reverse=True)  # less padding
    n_batches = math.ceil(math.ceil(len(samples) / world_size) / batch_size)
    rows = [share[start:start + batch_size] for start in range(0, len(share), batch_size)]
    rows += [[Sample([pad_id], 1)]] * (n_batches - len(rows))  # one token, nothing counted
    batches = [pad_batch(row, pad_id) for row in rows]
    for batch in batches:
        # Position 0 is never a target (the model predicts token t from position t - 1).
        counted = batch["loss_mask"][:, 1:].bool()
        batch["num_counted"] = int(counted.sum())
        batch["num_bytes"], batch["num_chars"] = units.count(batch["input_ids"][:, 1:][counted].numpy())
    return batches
