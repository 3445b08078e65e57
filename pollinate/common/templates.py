"""How a generation example becomes text (``data.template``): the prompt the model continues and the answer it
learns, the same for training, evaluation and ``pollinate generate``.

``plain`` is ``Question: {prompt}\\nAnswer:`` (the default), ``alpaca`` the Stanford Alpaca instruction format,
``chat`` the tokenizer's own chat template (``apply_chat_template``), and any other value a format string with
``{prompt}``. A prompt is a string, or for chat data (a ``messages`` column) the conversation before the
answer.
"""

from __future__ import annotations

from typing import Any

from pollinate.common.config import ConfigError

TEMPLATES = {
    "plain": "Question: {prompt}\nAnswer:",
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"),
}
MESSAGES_FIELD = "messages"

Prompt = str | list[dict[str, str]]


def format_prompt(prompt: Prompt, template: str = "plain", tokenizer: Any = None) -> str:
    """The text the model continues for ``prompt`` under ``template`` (``chat`` needs the ``tokenizer``)."""
    if template == "chat":
        return chat_prompt(as_messages(prompt), tokenizer)
    if not isinstance(prompt, str):
        raise ConfigError(f"data.template = {template!r} formats text prompts, but the data holds conversations "
                          f"(a '{MESSAGES_FIELD}' column): use --set data.template=chat")
    return TEMPLATES.get(template, template).replace("{prompt}", prompt)


def answer_text(prompt: Prompt, response: str, template: str = "plain", tokenizer: Any = None) -> str:
    """The text after the formatted prompt that the model learns: `` response`` (no space after a prompt that
    ends in whitespace) or, with ``chat``, the assistant turn as the chat template closes it (its end token
    included, trailing whitespace dropped). Without the chat template's own end token the caller adds EOS."""
    if template != "chat":
        formatted = format_prompt(prompt, template)
        return response if formatted[-1:].isspace() else " " + response
    messages = as_messages(prompt)
    head = chat_prompt(messages, tokenizer)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
    return full[len(head):].rstrip() if full.startswith(head) else response


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A prompt as chat messages: a string is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def chat_prompt(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """The conversation rendered by the tokenizer's chat template, ending where the assistant's answer starts."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise ConfigError(f"data.template = 'chat' but the tokenizer of {name} has no chat template: use "
                          "--set data.template=plain (or alpaca, or a format string with {prompt})")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def split_conversation(messages: Any, where: str) -> tuple[list[dict[str, str]], str]:
    """A ``messages`` row -> (the turns before its last assistant message, that message's content)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise ConfigError(f"{where}: '{MESSAGES_FIELD}' must be a list of {{role, content}} messages")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 1:
        raise ConfigError(f"{where}: '{MESSAGES_FIELD}' needs an assistant message after at least one other "
                          "message (the last assistant message is the response)")
    turns = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages[:last]]
    return turns, str(messages[last]["content"])

