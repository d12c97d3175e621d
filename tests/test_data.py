"""Data sources, prompts, clear errors for bad rows, and a data order that resumes exactly."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlvr.data import (
    DataError,
    PromptDataModule,
    StepSampler,
    arithmetic,
    build_prompt,
    gsm8k,
    load_examples,
    one_shot,
    read_jsonl,
)
from rlvr.models import tiny_tokenizer
from rlvr.rewards import verify_signal

SHARED = Path(__file__).resolve().parents[2] / "shared"


def test_gsm8k_local_jsonl():
    rows = gsm8k(str(SHARED / "data/gsm8k/train.jsonl"))
    assert len(rows) == 7473
    assert rows[0].answer.rstrip().split("####")[-1].strip().isdigit()


def test_one_shot_parquet_takes_the_last_user_turn_and_ground_truth():
    rows = one_shot(str(SHARED / "data/one_shot_rlvr/pi1_r128.parquet"))
    assert len(rows) == 128
    assert rows[0].answer == "12.8"
    assert "\\boxed{}" in rows[0].question  # the paper's prompt already asks for a box ...


def test_the_format_instruction_is_added_even_when_the_question_asks_for_a_box():
    tok = tiny_tokenizer()
    question = one_shot(str(SHARED / "data/one_shot_rlvr/pi1_r128.parquet"))[0].question
    prompt = build_prompt(question, tok, system_prompt="sys", instruction="Use <think> and <reflection>.")
    assert "Use <think> and <reflection>." in prompt and question.strip() in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_shots_come_before_the_question_as_chat_turns_with_the_instruction():
    tok = tiny_tokenizer()
    prompt = build_prompt("What is 3 + 4?", tok, system_prompt="sys", instruction="Box it.",
                          shots=[("What is 2 + 5?", "2 + 5 = \\boxed{7}")])
    assert prompt == ("<|im_start|>system\nsys<|im_end|>\n"
                      "<|im_start|>user\nWhat is 2 + 5?\n\nBox it.<|im_end|>\n"
                      "<|im_start|>assistant\n2 + 5 = \\boxed{7}<|im_end|>\n"
                      "<|im_start|>user\nWhat is 3 + 4?\n\nBox it.<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert build_prompt("What is 3 + 4?", tok, "sys", "Box it.", shots=()) == \
        build_prompt("What is 3 + 4?", tok, "sys", "Box it.")


def test_the_training_prompts_carry_the_shots():
    tok = tiny_tokenizer()
    shots = (("What is 2 + 5?", "2 + 5 = \\boxed{7}"),)
    dm = PromptDataModule(load_examples("arithmetic", size=4), tok, batch_size=4, max_prompt_tokens=10_000, shots=shots)
    dm.setup()
    prompts = [tok.decode(ids) for ids in next(iter(dm.train_dataloader()))["prompt_ids"]]
    assert all(p.count("What is 2 + 5?") == 1 and "2 + 5 = \\boxed{7}<|im_end|>" in p for p in prompts)


def test_arithmetic_is_seeded_and_its_answers_are_right():
    a, b = arithmetic(50, seed=3), arithmetic(50, seed=3)
    assert a == b and a != arithmetic(50, seed=4)
    for example in a:
        q = example.question
        numbers = [int(t) for t in q.replace("?", " ").replace(".", " ").split() if t.isdigit()]
        expected = numbers[0] + numbers[1] if "more" in q else numbers[0] - numbers[1] if "away" in q else numbers[0] * numbers[1]
        assert verify_signal(f"\\boxed{{{expected}}}", example.answer) == 1.0


def test_load_examples_names_the_choices():
    with pytest.raises(ValueError, match="arithmetic"):
        load_examples("gsm9k")
    assert len(load_examples("arithmetic", size=100, limit=10)) == 10


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"question": "q1", "answer": "1"}\n{"question": "q2"}\n', "row 2: missing or empty field 'answer'"),
        (b'{"question": "q1", "answer": "1"}\n{"question": "", "answer": "2"}\n', "row 2: missing or empty field 'question'"),
        (b'{"question": "q1", "answer": "1"}\n{not json\n', "row 2: not valid JSON"),
        (b'{"question": "q1", "answer": "1"}\n{"question": "\xff\xfe", "answer": "2"}\n', "row 2: not valid UTF-8"),
        (b"", "no rows"),
    ],
)
def test_bad_jsonl_names_file_row_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_jsonl(path, "question", "answer")
    assert str(path) in str(error.value) and message in str(error.value)


def test_parquet_with_another_schema_is_rejected(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["1"]}), path)
    with pytest.raises(DataError, match="missing column.*reward_model"):
        one_shot(str(path))


def test_parquet_row_without_ground_truth(tmp_path):
    path = tmp_path / "nogt.parquet"
    turns = [[{"role": "user", "content": "q"}]] * 2
    pq.write_table(pa.table({"prompt": turns, "reward_model": [{"ground_truth": "1"}, {"ground_truth": None}]}), path)
    with pytest.raises(DataError, match=r"row 2 reward_model: missing or empty field 'ground_truth'"):
        one_shot(str(path))


def test_step_sampler_is_a_function_of_seed_and_step():
    sampler = StepSampler(num_rows=10, batch_size=3, seed=7)
    stream = iter(sampler)
    first = [next(stream) for _ in range(7)]  # 3 batches per epoch: crosses two epoch boundaries
    resumed = iter(StepSampler(num_rows=10, batch_size=3, seed=7, start=4))
    assert [next(resumed) for _ in range(3)] == first[4:]
    epoch0 = [i for batch in first[:3] for _, _, i in batch]
    assert len(set(epoch0)) == 9  # no repeats within an epoch; one row is left over
    assert [(s, p) for s, p, _ in first[5]] == [(5, 0), (5, 1), (5, 2)]
    with pytest.raises(ValueError, match="larger than the data set"):
        StepSampler(num_rows=2, batch_size=3, seed=0)


def test_ranks_take_contiguous_shares_of_the_same_global_batch():
    whole = iter(StepSampler(num_rows=20, batch_size=6, seed=3, start=2))
    shares = [iter(StepSampler(num_rows=20, batch_size=6, seed=3, start=2, rank=r, world=3)) for r in range(3)]
    for _ in range(4):
        assert next(whole) == [item for share in shares for item in next(share)]
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 processes"):
        StepSampler(num_rows=20, batch_size=6, seed=3, world=4)


def test_datamodule_drops_overlong_prompts_and_tracks_its_position():
    examples = load_examples("arithmetic", size=40)
    dm = PromptDataModule(examples, tiny_tokenizer(), batch_size=4, max_prompt_tokens=10_000)
    dm.setup()
    assert dm.dropped == 0 and dm.batches_per_epoch == 10
    batch = next(iter(dm.train_dataloader()))
    assert batch["step"] == 0 and len(batch["prompt_ids"]) == 4 and len(batch["answer"]) == 4
    dm.on_after_batch_transfer(batch, 0)
    assert dm.state_dict()["next_step"] == 1
    other = PromptDataModule(examples, tiny_tokenizer(), batch_size=4)
    other.load_state_dict(dm.state_dict())
    other.setup()
    assert next(iter(other.train_dataloader()))["step"] == 1

    short = PromptDataModule(examples, tiny_tokenizer(), batch_size=4, max_prompt_tokens=5)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        short.setup()


@pytest.mark.parametrize(("example", "unique"), [("pi1", 1), ("pi13", 1), ("pi1_pi13", 2), ("pi1_pi2_pi13_pi1209", 4)])
def test_one_shot_sets_by_name(example, unique):
    rows = one_shot(example=example, folder=str(SHARED / "data/one_shot_rlvr"))
    assert len(rows) == 128 and len({r.question for r in rows}) == unique


def test_dsr_sub_names_its_unlabeled_row_and_can_drop_it():
    folder = str(SHARED / "data/one_shot_rlvr")
    with pytest.raises(DataError, match="dsr_sub.parquet row 266 reward_model: .*ground_truth.*drop_unlabeled"):
        one_shot(example="dsr_sub", folder=folder)
    assert len(one_shot(example="dsr_sub", folder=folder, drop_unlabeled=True)) == 1208


def test_an_unknown_one_shot_set_lists_the_choices():
    with pytest.raises(ValueError, match="data.example='pi7'.*pi1_pi13"):
        one_shot(example="pi7")


def test_the_refill_stream_is_a_function_of_seed_and_cursor_and_each_pass_holds_every_row():
    sampler = StepSampler(num_rows=10, batch_size=3, seed=7)
    stream = sampler.refill(0, 25)  # two and a half passes
    assert sampler.refill(0, 12) + sampler.refill(12, 13) == stream  # where it is cut does not matter
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # each pass in its own order
    assert StepSampler(num_rows=10, batch_size=3, seed=8).refill(0, 25) != stream
    assert stream[:9] != sampler.batch(0) + sampler.batch(1) + sampler.batch(2)  # not the step stream's order


def test_the_datamodules_refill_cursor_is_shared_by_the_ranks_and_travels_in_its_state():
    examples = load_examples("arithmetic", size=40)
    ranks = [PromptDataModule(examples, tiny_tokenizer(), batch_size=4) for _ in range(2)]
    for dm in ranks:
        dm.setup()
    whole = PromptDataModule(examples, tiny_tokenizer(), batch_size=4)
    whole.setup()
    one = whole.refill(6)
    shares = [dm.refill(3, rank=r, world=2) for r, dm in enumerate(ranks)]  # each rank its slice of the same 6
    assert shares[0]["answer"] + shares[1]["answer"] == one["answer"]
    assert shares[0]["prompt_ids"] + shares[1]["prompt_ids"] == one["prompt_ids"]
    assert [dm.refill_cursor for dm in ranks] == [6, 6] and whole.refill_cursor == 6
    resumed = PromptDataModule(examples, tiny_tokenizer(), batch_size=4)
    resumed.setup()
    resumed.load_state_dict(whole.state_dict())
    assert resumed.refill(5) == whole.refill(5)
