import jinja2
import pytest

from transforms.annotations import PART_CODES
from transforms.grid_encoders import create_grid_encoder
from transforms.prompts import (
    PROMPT_VERSIONS, SYSTEM_PROMPT_V0, build_prompt, parse_grid_from_response,
)

TRAIN = [{"input": [[1, 2]], "output": [[3], [4]]}, {"input": [[5]], "output": [[6]]}]
TEST_INPUT = [[7, 8], [9, 0]]
TEST_OUTPUT = [[1]]

V1_INSTRUCTIONS = (
    "Let's see if you can solve this simple Abstraction and Reasoning Challenge (ARC) task.\n"
    "Below there are some input-output grid examples that define the task.\n"
    "Your job is to understand the transformation between the input and the output and apply it to the test input grid.\n"
    "The transformations are always based on the following priors: objectness, goal-directed, numbers & counting, and basic geometry & topology.\n"
)

GOLDEN_V1_TRAIN_MINIMAL = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n" + V1_INSTRUCTIONS +
    "\n## Example 1\n\n### Input\n\n12\n\n### Output\n\n3\n4\n"
    "\n## Example 2\n\n### Input\n\n5\n\n### Output\n\n6\n"
    "\n## Test case\n\n### Input\n\n78\n90<|im_end|>\n"
    "<|im_start|>assistant\n### Output\n\n1<|im_end|>\n"
)

# arc24's templates (scripts/arc24/prompting.py), rendered with jinja2 as arc24 does, as the reference.
ARC24_TEMPLATES = {
    "output-from-examples-v1": ("You are a helpful assistant.", """Let's see if you can solve this simple Abstraction and Reasoning Challenge (ARC) task.
Below there are some input-output grid examples that define the task.
Your job is to understand the transformation between the input and the output and apply it to the test input grid.
The transformations are always based on the following priors: objectness, goal-directed, numbers & counting, and basic geometry & topology.
{% for sample in train_samples %}
## Example {{ loop.index }}

### Input

{{ sample.input }}

### Output

{{ sample.output }}
{% endfor %}
## Test case

### Input

{{ test_input }}
""", "### Output\n\n{{ output }}"),
    "output-from-examples-v0": (SYSTEM_PROMPT_V0, """Let's see if you can solve this simple ARC task. These are some input-output grid examples that define the task.
{% for sample in train_samples %}
## Example {{ loop.index }}

### Input

{{ sample.input }}

### Output

{{ sample.output }}
{% endfor %}
## Test case

### Input

{{ test_input }}
""", "### Output\n\n{{ output }}"),
    "input-from-inputs-v0": ("You are a helpful assistant.", """Your task is to create a new grid that follows the same distribution as the input grids from the Abstraction and Reasoning Challenge (ARC).
Below there are some grid examples, please create a new and different grid that follows the same distribution.
{% for sample in train_samples %}
## Grid example {{ loop.index }}

{{ sample.input }}
{% endfor %}
""", "## New grid\n\n{{ output }}"),
    "output-from-outputs-v0": ("You are a helpful assistant.", """Your task is to create a new grid that follows the same distribution as the input grids from the Abstraction and Reasoning Challenge (ARC).
Below there are some grid examples, please create a new and different grid that follows the same distribution.
{% for sample in train_samples %}
## Grid example {{ loop.index }}

{{ sample.output }}
{% endfor %}
""", "## New grid\n\n{{ output }}"),
}


def arc24_prompt(tokenizer, version, encoder, is_train_prompt):
    system, user_template, answer_template = ARC24_TEMPLATES[version]
    train_samples = [{k: encoder.to_text(g) for k, g in ex.items()} for ex in TRAIN]
    user = jinja2.Template(user_template).render(train_samples=train_samples,
                                                 test_input=encoder.to_text(TEST_INPUT))
    if not is_train_prompt:
        output = "```grid"
    elif version.startswith("input-from-inputs"):
        output = encoder.to_text(TEST_INPUT)
    else:
        output = encoder.to_text(TEST_OUTPUT)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user},
                {"role": "assistant", "content": jinja2.Template(answer_template).render(output=output)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if not is_train_prompt:  # arc24's remove_assistant_ending for Qwen
        text = "<|im_end|>".join(text.split("<|im_end|>")[:-1])
    return text


def test_golden_v1_train(qwen_tokenizer):
    prompt = build_prompt(qwen_tokenizer, create_grid_encoder("minimal"), TRAIN, TEST_INPUT, TEST_OUTPUT)
    assert prompt.text == GOLDEN_V1_TRAIN_MINIMAL
    assert prompt.part_text("system") == ["You are a helpful assistant."]
    assert prompt.part_text("instructions") == [V1_INSTRUCTIONS]
    assert prompt.part_text("example_input") == ["\n## Example 1\n\n### Input\n\n12", "\n## Example 2\n\n### Input\n\n5"]
    assert prompt.part_text("example_output") == ["\n\n### Output\n\n3\n4\n", "\n\n### Output\n\n6\n"]
    assert prompt.part_text("test_input") == ["\n## Test case\n\n### Input\n\n78\n90"]
    assert prompt.part_text("answer") == ["### Output\n\n1"]


def test_golden_v1_inference_default_encoder(qwen_tokenizer):
    prompt = build_prompt(qwen_tokenizer, create_grid_encoder(), TRAIN, TEST_INPUT, None, prompt_mode="inference")
    assert prompt.text.endswith(
        "\n## Test case\n\n### Input\n\n```grid shape: 2x2\n1 78\n2 90\n```<|im_end|>\n"
        "<|im_start|>assistant\n### Output\n\n```grid")
    assert "<|im_end|>" not in prompt.text[-30:]
    assert prompt.part_text("answer") == ["### Output\n\n```grid"]
    assert prompt.part_text("example_output")[0] == "\n\n### Output\n\n```grid shape: 2x1\n1 3\n2 4\n```\n"


@pytest.mark.parametrize("version", list(ARC24_TEMPLATES))
@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize("spec", ["shape(row-number(minimal))", "minimal", "code-block(separation(|))"])
def test_every_version_matches_arc24(qwen_tokenizer, version, mode, spec):
    encoder = create_grid_encoder(spec)
    prompt = build_prompt(qwen_tokenizer, encoder, TRAIN, TEST_INPUT, TEST_OUTPUT, version, mode)
    assert prompt.text == arc24_prompt(qwen_tokenizer, version, encoder, mode == "train")
    # Labelled spans are ordered and disjoint; everything between them is chat markup.
    ends = [0] + [end for _, end, _, _ in prompt.spans]
    starts = [start for start, _, _, _ in prompt.spans] + [len(prompt.text)]
    markup = "".join(prompt.text[e:s] for e, s in zip(ends, starts))
    assert all(e <= s for e, s in zip(ends, starts))
    assert markup == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
                      + ("<|im_end|>\n" if mode == "train" else ""))
    # Every grid cell span writes its colour.
    for start, end, _, _, color in prompt.cells.tolist():
        assert prompt.text[start:end] == str(color)


def test_parts_and_example_indices_in_order(qwen_tokenizer):
    prompt = build_prompt(qwen_tokenizer, create_grid_encoder(), TRAIN, TEST_INPUT, TEST_OUTPUT)
    names = {code: name for name, code in PART_CODES.items()}
    assert [(names[code], index) for _, _, code, index in prompt.spans] == [
        ("system", -1), ("instructions", -1), ("example_input", 0), ("example_output", 0),
        ("example_input", 1), ("example_output", 1), ("test_input", -1), ("answer", -1)]
    for (_, end, _, _), (start, _, _, _) in zip(prompt.spans, prompt.spans[1:]):
        assert end <= start


def test_fewer_train_examples(qwen_tokenizer):
    prompt = build_prompt(qwen_tokenizer, create_grid_encoder("minimal"), TRAIN, TEST_INPUT, TEST_OUTPUT,
                          num_train=1)
    assert "## Example 1" in prompt.text and "## Example 2" not in prompt.text
    assert prompt.num_train_examples == 1


def test_train_mode_needs_the_test_output(qwen_tokenizer):
    with pytest.raises(ValueError, match="prompt_mode=inference"):
        build_prompt(qwen_tokenizer, create_grid_encoder(), TRAIN, TEST_INPUT, None, prompt_mode="train")


def test_unknown_version_and_mode(qwen_tokenizer):
    with pytest.raises(ValueError, match="unknown --prompt_version 'v9'.*output-from-examples-v1"):
        build_prompt(qwen_tokenizer, create_grid_encoder(), TRAIN, TEST_INPUT, TEST_OUTPUT, "v9")
    with pytest.raises(ValueError, match="unknown --prompt_mode 'eval'"):
        build_prompt(qwen_tokenizer, create_grid_encoder(), TRAIN, TEST_INPUT, TEST_OUTPUT, prompt_mode="eval")
    assert list(PROMPT_VERSIONS) == ["output-from-examples-v1", "output-from-examples-v0", "input-from-inputs-v0",
                                     "output-from-outputs-v0"]


def test_parse_grid_from_inference_response():
    encoder = create_grid_encoder()
    assert parse_grid_from_response(" shape: 2x2\n1 78\n2 90\n```", encoder) == TEST_INPUT


def test_chat_template_check(qwen_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from model.tokenizer import write_qwen25_tokenizer
    from transforms.prompts import check_chat_template

    check_chat_template(qwen_tokenizer)  # the Qwen2.5 template passes
    no_template = AutoTokenizer.from_pretrained(str(write_qwen25_tokenizer(tmp_path)), local_files_only=True)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="cannot render ARC prompts with its chat template"):
        check_chat_template(no_template)
    rewriting = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    rewriting.chat_template = "{% for m in messages %}[{{ m.content | upper }}]{% endfor %}"
    with pytest.raises(ValueError, match="does not copy message contents verbatim"):
        check_chat_template(rewriting)
