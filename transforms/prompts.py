"""Prompt templates, exactly as ironbar/arc24 writes them, rendered with the tokenizer's chat template.

arc24 renders its user message with a jinja2 ``Template`` (which drops the template's final newline), puts it
between a system message and an assistant message, and renders the three with ``apply_chat_template``. Here the
messages are built piece by piece so that every piece keeps its label (instructions, example input/output, test
input, answer, and the character span of every grid cell); tests check the text against arc24's jinja templates.

Versions: ``output-from-examples-v1`` (default), ``output-from-examples-v0``, ``input-from-inputs-v0``,
``output-from-outputs-v0``.

Modes:
* ``train``: the assistant message holds the answer (``### Output\\n\\n`` and the encoded test output), followed by
  the template's end of turn, so activations cover the answer.
* ``inference``: as arc24's inference prompts: the assistant message is the answer header plus ```` ```grid ````
  (the start of the fence line; the model writes the rest, e.g. `` shape: 3x3``), and the text ends right there,
  without the end-of-turn marker (arc24's ``remove_assistant_ending``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from transforms.annotations import PART_CODES
from transforms.grid_encoders import GridEncoder

DEFAULT_PROMPT_VERSION = "output-from-examples-v1"
PROMPT_MODES = ("train", "inference")
DEFAULT_PROMPT_MODE = "train"
# What arc24 puts in the assistant message of an inference prompt.
INFERENCE_ANSWER_START = "```grid"

SYSTEM_PROMPT_V0 = """You are a helpful AI assistant. Your job is to solve tasks from the Abstraction and Reasoning Challenge (ARC). 
The user will present you with sample input and output grids for each task. 
Your job will be to understand the transformation between the input and the output and apply it to the last input grid given by the user. 
The puzzle-like inputs and outputs present a grid where each square can be one of ten colors. A grid can be any height or width between 1x1 and 30x30.
The background of the grid is typically colored with 0.
The tasks from ARC are based on the following priors:

- Objectness: Objects persist and cannot appear or disappear without reason. Objects can interact or not depending on the circumstances.
- Goal-directed: Objects can be animate or inanimate. Some objects are "agents" - they have intentions and they pursue goals.
- Numbers & counting: Objects can be counted or sorted by their shape, appearance, or movement using basic mathematics like addition, subtraction, and comparison.
- Basic geometry & topology: Objects can be shapes like rectangles, triangles, and circles which can be mirrored, rotated, translated, deformed, combined, repeated, etc. Differences in distances can be detected.

The transformations between input and output should be based on these priors.
"""  # noqa: W291 (arc24's text has trailing spaces on three lines)

SYSTEM_PROMPT_V1 = "You are a helpful assistant."

INSTRUCTIONS_OUTPUT_FROM_EXAMPLES_V0 = (
    "Let's see if you can solve this simple ARC task. These are some input-output grid examples that define the "
    "task.\n"
)
INSTRUCTIONS_OUTPUT_FROM_EXAMPLES_V1 = (
    "Let's see if you can solve this simple Abstraction and Reasoning Challenge (ARC) task.\n"
    "Below there are some input-output grid examples that define the task.\n"
    "Your job is to understand the transformation between the input and the output and apply it to the test "
    "input grid.\n"
    "The transformations are always based on the following priors: objectness, goal-directed, numbers & "
    "counting, and basic geometry & topology.\n"
)
# arc24 uses the same words ("input grids") for both of its grid-generation versions.
INSTRUCTIONS_NEW_GRID_V0 = (
    "Your task is to create a new grid that follows the same distribution as the input grids from the "
    "Abstraction and Reasoning Challenge (ARC).\n"
    "Below there are some grid examples, please create a new and different grid that follows the same "
    "distribution.\n"
)


@dataclass(frozen=True)
class PromptVersion:
    name: str
    system: str
    instructions: str
    # "examples": input/output pairs then the test input; "inputs"/"outputs": one grid per example, no test.
    layout: str
    answer_header: str


PROMPT_VERSIONS: dict[str, PromptVersion] = {
    version.name: version for version in (
        PromptVersion("output-from-examples-v1", SYSTEM_PROMPT_V1, INSTRUCTIONS_OUTPUT_FROM_EXAMPLES_V1,
                      "examples", "### Output\n\n"),
        PromptVersion("output-from-examples-v0", SYSTEM_PROMPT_V0, INSTRUCTIONS_OUTPUT_FROM_EXAMPLES_V0,
                      "examples", "### Output\n\n"),
        PromptVersion("input-from-inputs-v0", SYSTEM_PROMPT_V1, INSTRUCTIONS_NEW_GRID_V0, "inputs", "## New grid\n\n"),
        PromptVersion("output-from-outputs-v0", SYSTEM_PROMPT_V1, INSTRUCTIONS_NEW_GRID_V0, "outputs",
                      "## New grid\n\n"),
    )
}


def get_prompt_version(name: str) -> PromptVersion:
    if name not in PROMPT_VERSIONS:
        raise ValueError(f"unknown --prompt_version {name!r}; choose one of {', '.join(PROMPT_VERSIONS)}")
    return PROMPT_VERSIONS[name]


def check_prompt_mode(mode: str) -> str:
    if mode not in PROMPT_MODES:
        raise ValueError(f"unknown --prompt_mode {mode!r}; choose one of {', '.join(PROMPT_MODES)}")
    return mode


EncodedGrid = tuple[str, np.ndarray]  # (text, cells) from GridEncoder.encode_with_cells


@dataclass(frozen=True)
class EncodedSample:
    """The grids of one sample, encoded once (the length policy re-renders with fewer train examples)."""
    train: tuple[tuple[EncodedGrid, EncodedGrid], ...]
    test_input: EncodedGrid
    test_output: EncodedGrid | None


def encode_sample(encoder: GridEncoder, train: Sequence[dict[str, Any]], test_input, test_output) -> EncodedSample:
    return EncodedSample(
        train=tuple((encoder.encode_with_cells(ex["input"]), encoder.encode_with_cells(ex["output"])) for ex in train),
        test_input=encoder.encode_with_cells(test_input),
        test_output=None if test_output is None else encoder.encode_with_cells(test_output),
    )


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt. ``spans``: ``(start, end, part_code, example_index)`` in text order, covering every
    character that is not chat markup. ``cells``: ``[n, 5]`` int32 ``(char_start, char_end, row, col, color)``."""
    text: str
    spans: tuple[tuple[int, int, int, int], ...]
    cells: np.ndarray
    num_train_examples: int

    def part_text(self, part: str) -> list[str]:
        code = PART_CODES[part]
        return [self.text[start:end] for start, end, span_code, _ in self.spans if span_code == code]


class _MessageBuilder:
    """Concatenates labelled pieces of one message, remembering their spans relative to the message start."""

    def __init__(self):
        self.pieces: list[str] = []
        self.length = 0
        self.spans: list[tuple[int, int, int, int]] = []
        self.cells: list[np.ndarray] = []

    def add(self, part: str, *texts: str | EncodedGrid, example_index: int = -1):
        start = self.length
        for text in texts:
            if isinstance(text, tuple):
                text, cells = text
                shifted = cells.copy()
                shifted[:, :2] += self.length
                self.cells.append(shifted)
            self.pieces.append(text)
            self.length += len(text)
        code = PART_CODES[part]
        if self.spans and self.spans[-1][2] == code and self.spans[-1][3] == example_index:
            self.spans[-1] = (self.spans[-1][0], self.length, code, example_index)
        else:
            self.spans.append((start, self.length, code, example_index))

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class ChatTemplateError(ValueError):
    pass


def _user_message(version: PromptVersion, encoded: EncodedSample, num_train: int) -> _MessageBuilder:
    user = _MessageBuilder()
    user.add("instructions", version.instructions)
    for index, (grid_in, grid_out) in enumerate(encoded.train[:num_train]):
        number = index + 1
        if version.layout == "examples":
            user.add("example_input", f"\n## Example {number}\n\n### Input\n\n", grid_in, example_index=index)
            user.add("example_output", "\n\n### Output\n\n", grid_out, "\n", example_index=index)
        elif version.layout == "inputs":
            user.add("example_input", f"\n## Grid example {number}\n\n", grid_in, "\n", example_index=index)
        else:
            user.add("example_output", f"\n## Grid example {number}\n\n", grid_out, "\n", example_index=index)
    if version.layout == "examples":
        user.add("test_input", "\n## Test case\n\n### Input\n\n", encoded.test_input)
    return user


def _answer_message(version: PromptVersion, encoded: EncodedSample, mode: str) -> _MessageBuilder:
    answer = _MessageBuilder()
    if mode == "inference":
        answer.add("answer", version.answer_header, INFERENCE_ANSWER_START)
    elif version.layout == "inputs":
        answer.add("answer", version.answer_header, encoded.test_input)
    else:
        if encoded.test_output is None:
            raise ValueError(
                "the test output is unknown, so a train-mode prompt (which includes the answer) cannot be "
                "built; use --prompt_mode=inference for tasks without solutions")
        answer.add("answer", version.answer_header, encoded.test_output)
    return answer


def render_prompt(
    tokenizer, encoded: EncodedSample, prompt_version: str = DEFAULT_PROMPT_VERSION,
    prompt_mode: str = DEFAULT_PROMPT_MODE, num_train: int | None = None,
) -> Prompt:
    """Renders the chat text of a sample with its first ``num_train`` train examples (all if None)."""
    version = get_prompt_version(prompt_version)
    check_prompt_mode(prompt_mode)
    num_train = len(encoded.train) if num_train is None else num_train
    system = _MessageBuilder()
    system.add("system", version.system)
    user = _user_message(version, encoded, num_train)
    answer = _answer_message(version, encoded, prompt_mode)
    messages = [system, user, answer]
    contents = [message.text for message in messages]
    rendered = tokenizer.apply_chat_template(
        [{"role": role, "content": content} for role, content in zip(("system", "user", "assistant"), contents)],
        tokenize=False, add_generation_prompt=False)
    spans: list[tuple[int, int, int, int]] = []
    cells: list[np.ndarray] = []
    cursor = 0
    for message, content in zip(messages, contents):
        # Locating each content in order, rather than assuming ChatML, keeps any chat template that copies
        # message contents verbatim; one that rewrites them cannot be annotated and says so.
        offset = rendered.find(content, cursor)
        if offset < 0:
            raise ChatTemplateError(
                "the tokenizer's chat template does not copy message contents verbatim, so prompt parts cannot be "
                f"located in its output; message starting {content[:60]!r} not found after position {cursor}")
        spans += [(start + offset, end + offset, code, index) for start, end, code, index in message.spans]
        for block in message.cells:
            shifted = block.copy()
            shifted[:, :2] += offset
            cells.append(shifted)
        cursor = offset + len(content)
    if prompt_mode == "inference":
        # arc24 cuts the text at the assistant's end-of-turn marker; the answer content ends right before it.
        rendered = rendered[:cursor]
    all_cells = np.concatenate(cells) if cells else np.zeros((0, 5), dtype=np.int32)
    return Prompt(rendered, tuple(spans), all_cells, num_train)


def build_prompt(
    tokenizer, encoder: GridEncoder, train: Sequence[dict[str, Any]], test_input, test_output=None,
    prompt_version: str = DEFAULT_PROMPT_VERSION, prompt_mode: str = DEFAULT_PROMPT_MODE,
    num_train: int | None = None,
) -> Prompt:
    """The labelled prompt of one sample (convenience over ``encode_sample`` + ``render_prompt``)."""
    return render_prompt(tokenizer, encode_sample(encoder, train, test_input, test_output),
                         prompt_version, prompt_mode, num_train)


def check_chat_template(tokenizer, prompt_version: str = DEFAULT_PROMPT_VERSION) -> None:
    """Raises ValueError, naming the tokenizer, when its chat template cannot render labelled prompts (no
    template, or one that rewrites message contents), so a run fails once instead of rejecting every sample."""
    probe = EncodedSample(train=((("1", np.zeros((0, 5), np.int32)), ("2", np.zeros((0, 5), np.int32))),),
                                 test_input=("3", np.zeros((0, 5), np.int32)), test_output=None)
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    try:
        render_prompt(tokenizer, probe, prompt_version, "inference")
    except ChatTemplateError as error:
        raise ValueError(f"tokenizer {name}: {error}") from None
    except ValueError as error:  # transformers: no chat_template set
        raise ValueError(
            f"tokenizer {name} cannot render ARC prompts with its chat template ({error}); use a model whose "
            "tokenizer_config.json has a chat_template (all Qwen2.5 models do)") from None


def parse_grid_from_response(text: str, encoder: GridEncoder) -> list[list[int]]:
    """A grid from a model's continuation of an inference prompt (which ended with ```` ```grid ````)."""
    return encoder.to_grid(INFERENCE_ANSWER_START + text)
