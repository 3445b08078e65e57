"""data.template: plain stays today's encoding, alpaca and format strings put the prompt in their text, chat goes
through the tokenizer's chat template, and chat data (a messages column) trains on its last assistant message.
Training, evaluation and `pollinate generate` put prompts in the same form."""

import json

import pytest
import torch

from pollinate.common.config import ConfigError
from pollinate.common.config_io import build_config
from pollinate.common.data import DataError, encode_generation, encoder_for, load_task
from pollinate.common.evaluation import generate_answers
from pollinate.common.models import load_tokenizer, resolve_model
from pollinate.common.templates import TEMPLATES, format_prompt
from pollinate.export.generate import complete
from pollinate.export.weights import TrainedModel

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
EXAMPLE = {"prompt": "What is 2 + 3?", "response": "5"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("tiny-llama").path)


@pytest.fixture
def chat_tokenizer(tokenizer):
    tokenizer.chat_template = CHATML
    yield tokenizer
    tokenizer.chat_template = None


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_ids(encoded: dict) -> list[int]:
    return [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != -100]


def test_plain_is_todays_question_answer_encoding(tokenizer):
    prompt = ids(tokenizer, "Question: What is 2 + 3?\nAnswer:")
    answer = ids(tokenizer, " 5") + [tokenizer.eos_token_id]
    assert encode_generation(EXAMPLE, tokenizer, 64) == {"input_ids": prompt + answer,
                                                          "labels": [-100] * len(prompt) + answer}
    assert encoder_for("generation", "plain") is encode_generation


@pytest.mark.parametrize(("template", "prompt_text", "answer_text"), [
    ("alpaca", TEMPLATES["alpaca"].replace("{prompt}", "What is 2 + 3?"), "5"),
    ("Q: {prompt} A:", "Q: What is 2 + 3? A:", " 5"),
])
def test_named_and_custom_templates_frame_the_prompt(tokenizer, template, prompt_text, answer_text):
    encoded = encoder_for("generation", template)(EXAMPLE, tokenizer, 256)
    assert encoded["input_ids"][: len(ids(tokenizer, prompt_text))] == ids(tokenizer, prompt_text)
    assert answer_ids(encoded) == ids(tokenizer, answer_text) + [tokenizer.eos_token_id]


def test_chat_uses_the_chat_template_and_learns_the_assistant_turn_once_terminated(chat_tokenizer):
    encoded = encode_generation(EXAMPLE, chat_tokenizer, 256, template="chat")
    prompt = "<|im_start|>user\nWhat is 2 + 3?<eos>\n<|im_start|>assistant\n"
    assert format_prompt(EXAMPLE["prompt"], "chat", chat_tokenizer) == prompt
    assert encoded["input_ids"][: len(ids(chat_tokenizer, prompt))] == ids(chat_tokenizer, prompt)
    assert answer_ids(encoded) == ids(chat_tokenizer, "5<eos>")  # the template's own end token, no second EOS


def test_chat_without_a_chat_template_says_which_templates_work(tokenizer):
    with pytest.raises(ConfigError, match="no chat template: use --set data.template=plain"):
        encode_generation(EXAMPLE, tokenizer, 64, template="chat")


def test_the_template_config_takes_names_or_a_format_string():
    assert build_config(None, ["data.template=Q: {prompt} A:"]).data.template == "Q: {prompt} A:"
    with pytest.raises(ConfigError, match="data.template.*containing \\{prompt\\}"):
        build_config(None, ["data.template=chatml"])


def write_conversations(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CONVERSATION = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
                             {"role": "assistant", "content": "5"}]}


def test_messages_rows_answer_with_their_last_assistant_message(tmp_path, chat_tokenizer):
    source = write_conversations(tmp_path / "chat.jsonl", [CONVERSATION] * 10)
    cfg = build_config(None, [f"data.source={source}", "data.template=chat", "data.partition=iid"]).data
    row = load_task(cfg, "generation", 0).train[0]
    assert row["prompt"] == CONVERSATION["messages"][:2] and row["response"] == "5"
    encoded = encode_generation(row, chat_tokenizer, 256, template="chat")
    assert answer_ids(encoded) == ids(chat_tokenizer, "5<eos>")
    assert chat_tokenizer.decode(encoded["input_ids"]).startswith("<|im_start|>system\nBe brief.")


def test_messages_rows_need_the_chat_template_and_an_assistant_turn(tmp_path):
    source = write_conversations(tmp_path / "chat.jsonl", [CONVERSATION] * 10)
    with pytest.raises(DataError, match="conversations.*--set data.template=chat"):
        load_task(build_config(None, [f"data.source={source}", "data.partition=iid"]).data, "generation", 0)
    broken = write_conversations(tmp_path / "broken.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    with pytest.raises(ConfigError, match="row 0.*needs an assistant message"):
        load_task(build_config(None, [f"data.source={broken}", "data.template=chat", "data.partition=iid"]).data,
                  "generation", 0)


class EchoModel(torch.nn.Module):
    """Records the prompts it is asked to continue and answers with EOS right away."""

    def __init__(self, eos: int):
        super().__init__()
        self.weight, self.eos, self.prompts = torch.nn.Parameter(torch.zeros(1)), eos, []

    def generate(self, input_ids, attention_mask, **_):
        self.prompts += [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]
        return torch.cat([input_ids, torch.full((len(input_ids), 1), self.eos)], dim=1)


@pytest.mark.parametrize("template", ["plain", "alpaca", "chat"])
def test_evaluation_and_generate_prompt_as_training_does(chat_tokenizer, template):
    expected = [ids(chat_tokenizer, format_prompt(EXAMPLE["prompt"], template, chat_tokenizer))]
    model = EchoModel(chat_tokenizer.eos_token_id)
    generate_answers(model, chat_tokenizer, [EXAMPLE], 4, 2, template)
    complete(TrainedModel(model, chat_tokenizer, 1, ""), [EXAMPLE["prompt"]], 2, 4, template)
    assert model.prompts == expected * 2
    training = encode_generation(EXAMPLE, chat_tokenizer, 256, template)
    assert training["input_ids"][: len(expected[0])] == expected[0]
