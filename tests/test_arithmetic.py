"""The addition task's data files: splits, the analysis, and noisy final answers for an RL start."""

import json
import re

import pytest

from gptoss_jax.tasks import arithmetic


def _rows(path):
    with open(path) as f:
        return [json.loads(line)["messages"] for line in f]


def _result_of_analysis(thinking: str) -> str:
    return re.findall(r"so far (\d+)\.", thinking)[-1]


def test_final_noise_perturbs_only_training_finals(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    sizes = arithmetic.write_splits(str(train), str(held), train_size=2000, eval_size=200, final_noise=0.5)
    wrong = 0
    for user, assistant in _rows(train):
        a, b = map(int, user["content"].removeprefix("What is ").removesuffix("?").split(" + "))
        assert _result_of_analysis(assistant["thinking"]) == str(a + b)  # the working is always right
        if assistant["content"] != str(a + b):
            wrong += 1
            assert assistant["content"][:-1] == str(a + b)[:-1]  # only the last digit differs
            assert int(assistant["content"][-1]) == (int(str(a + b)[-1]) + 1) % 10
    assert wrong == sizes["train_finals_perturbed"] and 900 < wrong < 1100  # about half of 2000
    for user, assistant in _rows(held):
        a, b = map(int, user["content"].removeprefix("What is ").removesuffix("?").split(" + "))
        assert assistant["content"] == str(a + b)  # held-out references stay right


def test_no_noise_by_default_and_bad_rates_refused(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    sizes = arithmetic.write_splits(str(train), str(held), train_size=500, eval_size=50)
    assert sizes["train_finals_perturbed"] == 0  # control: the default writes every final right
    for user, assistant in _rows(train):
        a, b = map(int, user["content"].removeprefix("What is ").removesuffix("?").split(" + "))
        assert assistant["content"] == str(a + b)
    with pytest.raises(ValueError, match="final_noise"):
        arithmetic.write_splits(str(train), str(held), train_size=5, eval_size=5, final_noise=1.5)
