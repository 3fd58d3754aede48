"""Held-out data, the scoring arithmetic, and the refusals of `eval` and `promote` that need no engine.

The engine side (real vLLM on CPU, runs trained by `llm-atc train`): tests/test_promote.py.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml
from support.chats import mapping_chats, write_jsonl
from support.cli import assert_one_line_error

from llm_atc.evaluation import ChatLoss, TemplateMismatch, assistant_spans, chat_loss, gain, score
from llm_atc.recipes.train.finetune import load_conversations, read_config, split_held_out


def conversations(n: int, **kwargs) -> list[list[dict]]:
    return [record["messages"] for record in mapping_chats(n, **kwargs)]


def key(messages: list[dict]) -> str:
    return json.dumps(messages, sort_keys=True)


def test_the_held_out_split_is_disjoint_stable_and_near_its_share():
    chats = conversations(1000)
    training, held = split_held_out(chats, 0.2)
    assert {key(c) for c in training}.isdisjoint({key(c) for c in held})
    assert len(training) + len(held) == len(chats)
    assert 150 <= len(held) <= 250  # 200 expected; 4 standard deviations either way
    again = split_held_out(list(reversed(chats)), 0.2)[1]  # another run, the records in another order
    assert {key(c) for c in again} == {key(c) for c in held}
    copies = split_held_out(chats + chats[:50], 0.2)[1]  # a duplicated conversation never lands on both sides
    assert {key(c) for c in copies} == {key(c) for c in held}
    assert split_held_out(chats, 0.0) == (chats, [])
    lone = next(c for c in chats if key(c) in {key(h) for h in held})
    assert split_held_out([lone], 0.2) == ([lone], [])  # nothing held out when nothing would be left to train on


def test_the_split_reads_its_share_as_the_node_does():
    assert read_config({"DATA": "x"}).eval_fraction == 0.05
    assert read_config({"DATA": "x", "EVAL_FRACTION": "0.3"}).eval_fraction == 0.3
    for bad in ("0.7", "-0.1", "nan", "a lot"):
        with pytest.raises(ValueError, match="EVAL_FRACTION"):
            read_config({"DATA": "x", "EVAL_FRACTION": bad})


def test_the_score_is_a_ratio_of_sums_with_its_interval():
    losses = [ChatLoss(2.0, 1), ChatLoss(4.0, 2), ChatLoss(9.0, 3)]
    result = score("m", losses)
    assert result.nll == pytest.approx(2.5) and result.tokens == 6 and result.chats == 3
    # residuals -0.5, -1, 1.5: sum of squares 3.5; * 3/2 = 5.25; sqrt / 6 tokens = 0.38188
    assert result.high - result.nll == pytest.approx(1.959964 * math.sqrt(5.25) / 6)
    assert result.perplexity == pytest.approx(math.exp(2.5))
    single = score("m", [ChatLoss(3.0, 2)])
    assert single.nll == 1.5 and math.isinf(single.high) and "no interval" in single.text()


def test_a_gain_on_the_same_conversations_is_taken_pair_by_pair():
    current = [ChatLoss(3.0, 1), ChatLoss(10.0, 4), ChatLoss(7.0, 2)]
    better = [ChatLoss(x.nll - x.tokens * 0.5, x.tokens) for x in current]  # 0.5 nats lower on every token
    result = gain(score("a", current), current, score("b", better), better)
    assert result.gain == pytest.approx(0.5) and result.low == pytest.approx(0.5) and result.high == pytest.approx(0.5)
    apart = gain(score("a", current), [], score("b", better), [])  # scored apart: the two intervals combine
    assert apart.gain == pytest.approx(0.5) and apart.low < 0.5 < apart.high


def test_assistant_turns_are_found_by_prefixes():
    turns = [([1, 2, 3], [1, 2, 3, 9, 8]), ([1, 2, 3, 9, 8, 4, 5], [1, 2, 3, 9, 8, 4, 5, 7])]
    assert assistant_spans(turns, [1, 2, 3, 9, 8, 4, 5, 7]) == [(3, 5), (7, 8)]
    with pytest.raises(TemplateMismatch):
        assistant_spans([([1, 2, 3], [1, 2, 4, 9])], [1, 2, 4, 9])
    assert chat_loss([-1.0, -0.5]) == ChatLoss(1.5, 2)
    with pytest.raises(ValueError):
        chat_loss([None])


def test_held_out_chats_are_written_in_a_format_train_reads(tmp_path):
    from llm_atc.recipes.train.finetune import write_conversations

    chats = conversations(5)
    write_conversations(tmp_path / "eval.jsonl", chats)
    assert load_conversations(str(tmp_path / "eval.jsonl")) == chats


def test_train_eval_fraction_reaches_the_task(cli, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", mapping_chats(20))
    result = cli("train", "--model_type", "lora", "--finetune_data", str(data), "--cloud", "local",
                 "--eval_fraction", "0.25", "--dryrun")  # fmt: skip
    assert result.exit_code == 0, result
    assert yaml.safe_load(result.stdout)["envs"]["EVAL_FRACTION"] == "0.25"
    default = cli("train", "--model_type", "lora", "--finetune_data", str(data), "--cloud", "local", "--dryrun")
    assert str(yaml.safe_load(default.stdout)["envs"]["EVAL_FRACTION"]) == "0.05"  # the recipe's own default


@pytest.mark.parametrize(
    "value, message",
    [("0.7", "--eval_fraction 0.7: give a number of conversations held out (a share) between 0 and 0.5"),
     ("nan", "--eval_fraction nan"), ("-1", "--eval_fraction -1.0")],
)  # fmt: skip
def test_train_refuses_a_bad_eval_fraction(cli, tmp_path, value, message):
    data = write_jsonl(tmp_path / "chats.jsonl", mapping_chats(20))
    result = cli("train", "--model_type", "lora", "--finetune_data", str(data), "--cloud", "local",
                 "--eval_fraction", value)  # fmt: skip
    assert_one_line_error(result, message)
    envs = cli("train", "--model_type", "lora", "--finetune_data", str(data), "--cloud", "local",
               "--envs", "EVAL_FRACTION=0.9")  # fmt: skip
    assert_one_line_error(envs, "EVAL_FRACTION=0.9 must be from 0 to 0.5")


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "nowhere"], "no deployment"),
        (["eval", "nowhere", "--data", "a.jsonl", "--run", "llm-atc/x"], "give --data FILE or --run llm-atc/<run>"),
        (["eval", "nowhere", "--limit", "0"], "--limit 0: give a number from 1 to 100000"),
        (["promote", "llm-atc/x", "--on", "d", "--as", "chat@v2"], "--as 'chat@v2': give a model name"),
        (["promote", "llm-atc/x", "--on", "d", "--as", "chat", "--min_gain", "nan"], "--min_gain nan"),
        (["promote", "llm-atc/x", "--on", "d", "--as", "chat", "--min_gain", "-1"], "--min_gain -1.0"),
        (["promote", "llm-atc/x", "--on", "d", "--as", "chat", "--timeout", "0"], "--timeout 0: give a number"),
        (["promote", "llm-atc/x", "--on", "d", "--as", "chat"], "no training run named 'x'"),
        (["promote", "llm-atc/x", "--rollback", "--on", "d", "--as", "chat"], "--rollback takes no RUN"),
        (["promote", "--on", "d", "--as", "chat"], "give the run to promote"),
    ],
)  # fmt: skip
def test_eval_and_promote_refuse_bad_input_in_one_line(cli, args, message):
    assert_one_line_error(cli(*args), message)


def test_promote_checks_its_options_before_any_io(tmp_path):
    """A name or margin typo is reported without importing SkyPilot or opening the registry."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom llm_atc.cli import main\n"
        "sys.argv = ['llm-atc', 'promote', 'llm-atc/x', '--on', 'd', '--as', 'a b']\n"
        "try:\n    main()\n"
        "except SystemExit as exit:\n    print(exit.code, 'sky' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"LLM_ATC_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.stdout.split() == ["1", "False"] or done.stdout.split() == ["2", "False"], done
    assert "give a model name" in done.stderr
    assert not (tmp_path / "registry.db").exists()
