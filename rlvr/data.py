"""Prompts and ground truths: GSM8K, verl-schema parquet (One-Shot-RLVR), and synthetic arithmetic.

Every source yields `Example(question, answer)`. Prompts go through the tokenizer's chat template
with a system prompt and the format instruction, which is added to every prompt, training and
evaluation alike, even when the question already asks for `\\boxed{}`.

Data order is a pure function of (seed, step): step s takes batch s mod k of the permutation
seeded by (seed, epoch), k = batches per epoch. The data module keeps the next step to read in its
checkpoint state, so a resumed run continues with the very next batch.

Dynamic sampling (grpo.dynamic_sampling) draws further prompts from a second stream, the refill
stream: prompt j of it is a pure function of (seed, j), and the data module's state keeps the cursor j
of the next one, so a resumed run refills with the very prompts the uninterrupted run would have.
The step stream is untouched by it: step s takes the same batch with dynamic sampling or without.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from rlvr.errors import UserError
from rlvr.reflection import DEFAULT_INSTRUCTION  # the instruction and the verdict parser are one definition

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant that solves math problems step by step."



@dataclass(frozen=True)
class Example:
    question: str
    answer: str


class DataError(UserError):
    """A malformed data file, named with its row and the field that is wrong."""


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def _require(row: Any, field: str, where: str) -> str:
    value = row.get(field) if isinstance(row, dict) else None
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: missing or empty field {field!r}")
    return str(value)


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, row) for each non-blank line; `where` names the file and the row (from 1) for errors."""
    path = Path(path)
    count = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} row {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            count += 1
            yield where, row
    if not count:
        raise DataError(f"{path}: no rows")


def read_jsonl(path: str | Path, question_field: str, answer_field: str) -> list[Example]:
    """One JSON object per line with the two named fields."""
    return [Example(_require(row, question_field, where), _require(row, answer_field, where))
            for where, row in iter_jsonl(path)]


def gsm8k(source: str = "openai/gsm8k", split: str = "train") -> list[Example]:
    """GSM8K from a local jsonl (`question`, `answer` ending in `#### N`) or a hub id."""
    if Path(source).exists():
        return read_jsonl(source, "question", "answer")
    from datasets import load_dataset

    rows = load_dataset(source, "main", split=split)
    return [Example(_require(r, "question", f"{source}[{split}] row {i}"), _require(r, "answer", f"{source}[{split}] row {i}"))
            for i, r in enumerate(rows, start=1)]


ONE_SHOT_SETS = {  # data.example -> file in data.folder (One-Shot-RLVR's training sets)
    "pi1": "pi1_r128.parquet",  # the single example pi_1, repeated 128 times
    "pi13": "pi13_r128.parquet",
    "pi1_pi13": "merge_pi1_pi13_r128.parquet",  # 2 examples
    "pi1_pi2_pi13_pi1209": "merge_pi1_pi2_pi13_pi1209_r128.parquet",  # 4 examples
    "dsr_sub": "dsr_sub.parquet",  # the 1,209-example DeepScaleR subset the examples were picked from
}


def one_shot(
    source: str | None = None, example: str = "pi1", folder: str = "../shared/data/one_shot_rlvr",
    drop_unlabeled: bool = False,
) -> list[Example]:
    """verl-schema parquet: `prompt` (chat turns; the last user turn is the question) and
    `reward_model.ground_truth`. `source` names a file; else `example` picks one of ONE_SHOT_SETS.

    A row with an empty ground truth can never be rewarded, so it is an error unless
    `drop_unlabeled` (dsr_sub as published has one, row 266)."""
    import pyarrow.parquet as pq

    if source is None:
        if example not in ONE_SHOT_SETS:
            raise ValueError(f"data.example={example!r}; choose one of {list(ONE_SHOT_SETS)}")
        source = str(Path(folder) / ONE_SHOT_SETS[example])
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"data.source: no parquet file at {path}")
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    missing = {"prompt", "reward_model"} - set(table.column_names)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}; verl schema needs 'prompt' and "
                        f"'reward_model.ground_truth', found {table.column_names}")
    examples, dropped = [], []
    for number, row in enumerate(table.select(["prompt", "reward_model"]).to_pylist(), start=1):
        where = f"{path} row {number}"
        turns = [t for t in row["prompt"] or [] if isinstance(t, dict) and t.get("role") == "user"]
        if not turns:
            raise DataError(f"{where}: field 'prompt' has no user turn")
        label = (row["reward_model"] or {}).get("ground_truth")
        if drop_unlabeled and (label is None or not str(label).strip()):
            dropped.append(number)
            continue
        try:
            answer = _require(row["reward_model"] or {}, "ground_truth", where + " reward_model")
        except DataError as e:
            raise DataError(f"{e} (data.drop_unlabeled=true skips such rows)") from None
        examples.append(Example(_require(turns[-1], "content", where + " prompt"), answer))
    if dropped:
        log.warning("%s: dropped %d row(s) with an empty ground truth: %s", path, len(dropped), dropped[:20])
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def arithmetic(size: int = 4096, seed: int = 0, max_operand: int = 20) -> list[Example]:
    """Seeded small arithmetic word problems ("Tom has 7 apples and gets 5 more ..."), built in code."""
    rng = random.Random(seed)
    names = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ken", "Zoe"]
    things = ["apples", "coins", "books", "marbles", "stickers", "pencils"]
    examples = []
    for _ in range(size):
        name, thing = rng.choice(names), rng.choice(things)
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        kind = rng.choice(["add", "sub", "mul"])
        if kind == "add":
            question, answer = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have?", a + b
        elif kind == "sub":
            a, b = max(a, b), min(a, b)
            question, answer = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", a - b
        else:
            question, answer = f"{name} buys {a} bags with {b} {thing} each. How many {thing} is that?", a * b
        examples.append(Example(question, str(answer)))
    return examples


SOURCES = {"gsm8k": gsm8k, "one_shot": one_shot, "arithmetic": arithmetic}


def load_examples(kind: str, limit: int | None = None, **options: Any) -> list[Example]:
    """`data.kind` picks the source; the other `data.*` keys are its arguments."""
    if kind not in SOURCES:
        raise ValueError(f"data.kind={kind!r}; choose one of {sorted(SOURCES)}")
    examples = SOURCES[kind](**options)
    return examples[:limit] if limit else examples


# ---------------------------------------------------------------------------------------------
# Evaluation sets
# ---------------------------------------------------------------------------------------------


def benchmark_example(row: dict, where: str) -> Example:
    """One evaluation row in any schema of the Qwen2.5-Math harness (math500, aime24/25, amc23,
    minerva_math, olympiadbench) or GSM8K's. Question: `problem`, else `question` (after
    olympiadbench's `context`). Answer: `answer`, else `final_answer` (a list), else the last
    `\\boxed{}` of `solution` (minerva_math has no answer field)."""
    from rlvr.answers import last_boxed

    question = row.get("problem") or row.get("question")
    if not question:
        raise DataError(f"{where}: missing question; expected field 'problem' or 'question'")
    if row.get("context"):
        question = f"{row['context']}\n\n{question}"
    answer = row.get("answer")
    if answer is None and row.get("final_answer"):
        final = row["final_answer"]
        answer = ", ".join(final) if isinstance(final, list) else final
        answer = str(answer).replace("$", "")  # olympiadbench writes "$69$,$84$"
    if answer is None and row.get("solution"):
        answer = last_boxed(str(row["solution"]))
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)  # amc23 stores 27.0
    if answer is None or not str(answer).strip():
        raise DataError(f"{where}: missing answer; expected field 'answer', 'final_answer' or a \\boxed{{}} in 'solution'")
    return Example(str(question), str(answer))


def load_benchmark(source: str, limit: int | None = None) -> list[Example]:
    """An evaluation set from a local jsonl, or a hub dataset id (its `test` split)."""
    if Path(source).exists():
        examples = [benchmark_example(row, where) for where, row in iter_jsonl(source)]
    else:
        from datasets import load_dataset

        rows = load_dataset(source, split="test")
        examples = [benchmark_example(dict(row), f"{source}[test] row {i}") for i, row in enumerate(rows, start=1)]
    return examples[:limit] if limit else examples


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def build_prompt(
    question: str,
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    instruction: str = DEFAULT_INSTRUCTION,
    shots: Sequence[tuple[str, str]] = (),
) -> str:
    """The chat-templated prompt text, ending where the assistant's response begins. `shots`: worked
    (question, answer) pairs (prompt.shots), each put before the question as a user turn (with the
    instruction) and an assistant turn: a small model copies a format from a turn it has seen far more
    faithfully than from an instruction."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for shot_question, shot_answer in shots:
        messages.append({"role": "user", "content": f"{shot_question.strip()}\n\n{instruction}".strip()})
        messages.append({"role": "assistant", "content": shot_answer})
    messages.append({"role": "user", "content": f"{question.strip()}\n\n{instruction}".strip()})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


# The refill stream's permutation seeds, apart from the step stream's (an epoch 1.5e9 away; torch seeds its
# CPU generator with the low 32 bits only, so an offset of 2**32 or more would be no offset at all).
REFILL_SEED_OFFSET = 1_500_000_001


class StepSampler(Sampler[list[tuple[int, int, int]]]):
    """Yields, from step `start` on, endlessly, this rank's share of each step's batch in a
    seed-determined order, as (step, place in the global batch, row) triples.

    The global batch of a step is a function of (seed, step) alone; rank r of `world` takes its
    r-th contiguous slice, so the ranks together see exactly that batch, whatever their number.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        if batch_size > num_rows:
            raise ValueError(f"batch_size {batch_size} is larger than the data set ({num_rows} rows)")
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {world} processes (devices x num_nodes)")
        self.num_rows, self.batch_size, self.seed, self.start = num_rows, batch_size, seed, start
        self.rank, self.world = rank, world
        self.batches_per_epoch = num_rows // batch_size  # the remainder is dropped each epoch

    def batch(self, step: int) -> list[int]:
        """The rows of the whole (global) batch of `step`."""
        epoch, k = divmod(step, self.batches_per_epoch)
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return order[k * self.batch_size : (k + 1) * self.batch_size].tolist()

    def refill(self, cursor: int, count: int) -> list[int]:
        """Rows `cursor` .. `cursor + count - 1` of the refill stream: every row once per pass, in an
        order seeded by (seed, pass) apart from the step stream's (no remainder dropped)."""
        rows: list[int] = []
        for j in range(cursor, cursor + count):
            epoch, k = divmod(j, self.num_rows)
            if k == 0 or not rows:
                order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(
                    self.seed * 100_003 + epoch + REFILL_SEED_OFFSET)).tolist()
            rows.append(order[k])
        return rows

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        share = self.batch_size // self.world
        first = self.rank * share
        step = self.start
        while True:
            rows = self.batch(step)[first : first + share]
            yield [(step, first + i, row) for i, row in enumerate(rows)]
            step += 1


class PromptDataset(Dataset):
    def __init__(self, examples: list[Example], prompt_ids: list[list[int]]) -> None:
        self.examples, self.prompt_ids = examples, prompt_ids

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        step, position, index = item
        return {"step": step, "position": position, "prompt_ids": self.prompt_ids[index],
                "answer": self.examples[index].answer}


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "step": rows[0]["step"],
        "position": [r["position"] for r in rows],  # places in the step's global batch (the sampling seeds)
        "prompt_ids": [r["prompt_ids"] for r in rows],
        "answer": [r["answer"] for r in rows],
    }


class PromptDataModule(L.LightningDataModule):
    """Tokenized prompts in step order; its state (the next step) travels in the checkpoint."""

    def __init__(
        self,
        examples: list[Example],
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        seed: int = 0,
        max_prompt_tokens: int = 1024,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        instruction: str = DEFAULT_INSTRUCTION,
        shots: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__()
        self.examples = examples
        self.shots = shots
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.max_prompt_tokens = max_prompt_tokens
        self.system_prompt = system_prompt
        self.instruction = instruction
        self.next_step = 0
        self.refill_cursor = 0  # the next prompt of the refill stream (dynamic sampling)
        self.dataset: PromptDataset | None = None
        self.dropped = 0

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        texts = [build_prompt(e.question, self.tokenizer, self.system_prompt, self.instruction, self.shots)
                 for e in self.examples]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        keep = [i for i, p in enumerate(ids) if len(p) <= self.max_prompt_tokens]
        self.dropped = len(ids) - len(keep)
        if not keep:
            raise ValueError(f"every prompt is longer than data.max_prompt_tokens={self.max_prompt_tokens}")
        self.dataset = PromptDataset([self.examples[i] for i in keep], [ids[i] for i in keep])

    @property
    def longest_prompt(self) -> int:
        assert self.dataset is not None, "call setup() first"
        return max(len(p) for p in self.dataset.prompt_ids)

    @property
    def batches_per_epoch(self) -> int:
        assert self.dataset is not None, "call setup() first"
        return len(self.dataset) // self.batch_size

    def sampler(self, start: int = 0, rank: int = 0, world: int = 1) -> StepSampler:
        assert self.dataset is not None, "call setup() first"
        return StepSampler(len(self.dataset), self.batch_size, self.seed, start=start, rank=rank, world=world)

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return DataLoader(self.dataset, batch_sampler=self.sampler(self.next_step, rank, world), collate_fn=collate)

    def refill(self, count: int, rank: int = 0, world: int = 1) -> dict[str, list]:
        """Dynamic sampling's further prompts: `count` for each of `world` ranks, this rank's `count`
        (its contiguous slice of the next count * world of the refill stream); every rank calls it
        with the same count, so their cursors stay equal."""
        rows = self.sampler().refill(self.refill_cursor + rank * count, count)
        self.refill_cursor += count * world
        return {"prompt_ids": [self.dataset.prompt_ids[i] for i in rows],
                "answer": [self.dataset.examples[i].answer for i in rows]}

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        # Called when a batch is taken for a step (after any prefetching), so this is the true position.
        self.next_step = batch["step"] + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step, "refill_cursor": self.refill_cursor, "seed": self.seed,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_step = state["next_step"]
        self.refill_cursor = state.get("refill_cursor", 0)  # absent from checkpoints that predate it
