"""Lists of examples become padded, masked tensors with the run's tokenizer."""
import pytest
import torch

from signalrl.engine.batching import IGNORE_INDEX, prepare_batch
from signalrl.engine.tokenizer import BOS_ID, BYTE_OFFSET, EOS_ID, PAD_ID, byte_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def ids(text):
    return [BYTE_OFFSET + b for b in text.encode()]


def test_byte_tokenizer_roundtrip(tok, tmp_path):
    text = "héllo, wörld ✓"
    enc = tok.encode(text)
    assert enc == [BOS_ID] + ids(text)
    assert tok.decode(enc) == text
    tok.save_pretrained(str(tmp_path))
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert list(again.encode(text)) == enc
    assert again.pad_token_id == PAD_ID and again.eos_token_id == EOS_ID


def test_text_examples_are_padded_and_masked(tok):
    b = prepare_batch([{"text": "ab"}, {"text": "abcd"}], tok, loss_fn="causal_lm", device=CPU)
    assert b["input_ids"].tolist() == [[BOS_ID] + ids("ab") + [EOS_ID, PAD_ID, PAD_ID],
                                       [BOS_ID] + ids("abcd") + [EOS_ID]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert set(b) == {"input_ids", "attention_mask"}


def test_derived_keys_the_loss_does_not_accept_are_dropped(tok):
    ex = [{"prompt": "q", "response": "ab"}]
    b = prepare_batch(ex, tok, loss_fn="x", device=CPU, accepted_keys={"input_ids", "attention_mask", "labels"})
    assert set(b) == {"input_ids", "attention_mask", "labels"}


def test_prompt_response_gives_labels_and_response_mask(tok):
    b = prepare_batch([{"prompt": "q", "response": "ab"}, {"prompt": [BOS_ID, 50, 51], "response": [60, EOS_ID]}],
                      tok, loss_fn="causal_lm", device=CPU)
    assert b["input_ids"].tolist() == [[BOS_ID] + ids("q") + ids("ab") + [EOS_ID],
                                       [BOS_ID, 50, 51, 60, EOS_ID]]
    assert b["response_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    lab = b["labels"].tolist()
    assert lab[0] == [IGNORE_INDEX, IGNORE_INDEX] + ids("ab") + [EOS_ID]
    assert lab[1] == [IGNORE_INDEX] * 3 + [60, EOS_ID]


def test_per_token_fields_for_response_or_whole_sequence(tok):
    ex = [{"prompt": [1, 10], "response": [11, 12], "old_log_probs": [-0.5, -0.25], "values": [0, 1, 2, 3]},
          {"prompt": [1, 10, 20], "response": [11], "old_log_probs": [-1.0], "values": [4, 5, 6, 7]}]
    b = prepare_batch(ex, tok, loss_fn="enhanced_ppo", device=CPU)
    assert b["old_log_probs"].tolist() == [[0, 0, -0.5, -0.25], [0, 0, 0, -1.0]]
    assert b["values"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert b["old_log_probs"].dtype == torch.float32


def test_scalar_reward_goes_to_last_response_token_for_ppo(tok):
    ex = [{"prompt": [1, 10], "response": [11, 12], "rewards": 2.0},
          {"prompt": [1, 10], "response": [11], "rewards": -1.0}]
    b = prepare_batch(ex, tok, loss_fn="enhanced_ppo", device=CPU)
    assert b["rewards"].tolist() == [[0, 0, 0, 2.0], [0, 0, -1.0, 0]]
    b = prepare_batch(ex, tok, loss_fn="importance_sampling", device=CPU)
    assert b["rewards"].tolist() == [2.0, -1.0]


def test_preference_pairs(tok):
    b = prepare_batch([{"prompt": "q", "chosen": "a", "rejected": "bb"}], tok, loss_fn="dpo", device=CPU)
    assert b["chosen_input_ids"].tolist() == [[BOS_ID] + ids("q") + ids("a") + [EOS_ID]]
    assert b["rejected_input_ids"].tolist() == [[BOS_ID] + ids("q") + ids("bb") + [EOS_ID]]
    assert b["chosen_loss_mask"].tolist() == [[0, 0, 1, 1]]
    assert b["rejected_attention_mask"].tolist() == [[1, 1, 1, 1, 1]]


def test_groups_for_grpo(tok):
    b = prepare_batch([{"prompt": "q", "responses": ["a", "bc"], "rewards": [1.0, 0.0]},
                       {"prompt": "qq", "responses": ["", "d"], "rewards": [0.5, 0.5]}], tok, loss_fn="grpo",
                      device=CPU)
    assert b["prompt_ids"].tolist() == [[PAD_ID, BOS_ID] + ids("q"), [BOS_ID] + ids("qq")]
    assert b["prompt_attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert b["response_ids"].shape == (2, 2, 3)
    assert b["response_masks"].tolist() == [[[1, 1, 0], [1, 1, 1]], [[1, 0, 0], [1, 1, 0]]]
    assert b["rewards"].tolist() == [[1.0, 0.0], [0.5, 0.5]]


def test_dict_of_lists_and_tensors(tok):
    b = prepare_batch({"input_ids": [[1, 5, 6]], "attention_mask": [[1, 1, 1]], "rewards": [[0.0, 0.5, 1.0]]}, tok,
                      loss_fn="enhanced_ppo", device=CPU)
    assert b["input_ids"].dtype == torch.long and b["rewards"].dtype == torch.float32
    cols = prepare_batch({"prompt": ["a", "b"], "response": ["x", "yz"]}, tok, loss_fn="causal_lm", device=CPU)
    assert cols["input_ids"].shape == (2, 5)


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty"),
    ([{"foo": 1}], "needs 'text'"),
    ([{"prompt": "a", "response": "b", "old_log_probs": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}], "expected 4 .* or 2"),
    ([{"text": "a", "x": 1.0}, {"text": "b"}], "missing in some"),
    ([{"prompt": "q", "responses": ["a"], "rewards": [1.0, 2.0]}], "rewards"),
    ("just a string", "expected a dict"),
])
def test_bad_examples_raise_clear_errors(tok, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        prepare_batch(bad, tok, loss_fn="causal_lm", device=CPU)
