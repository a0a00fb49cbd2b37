"""Chat templates rendered as transformers' apply_chat_template renders them (text and ids), the
CLI's chat options, DeepSpec's rule for evaluation prompts, and clear errors on bad input."""

import json
import re

import jax
import pytest

from dspark_jax import cli
from dspark_jax import target as target_model
from dspark_jax.chat import (ChatError, ChatTemplate, encode_chat, end_of_turn_id, first_turn_encoder,
                             load_chat_template, read_messages)
from dspark_jax.checkpoint import save_qwen3
from dspark_jax.config import Qwen3Config
from dspark_jax.evaluate import load_prompt_set
from dspark_jax.tokenizer import Tokenizer

from chat_templates import GEMMA_SPECIAL, GEMMA_STYLE, QWEN3_SPECIAL, QWEN3_STYLE, VOCAB, write_tokenizer



@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    qwen = write_tokenizer(root / "qwen3", QWEN3_SPECIAL, {"chat_template": QWEN3_STYLE, "eos_token": "<|im_end|>",
                           "pad_token": "<|endoftext|>", "bos_token": None}, non_special=("<think>", "</think>"))
    gemma = write_tokenizer(root / "gemma", GEMMA_SPECIAL, {"bos_token": "<bos>", "eos_token": "<eos>",
                            "pad_token": "<pad>"}, bos="<bos>")
    (gemma / "chat_template.jinja").write_text(GEMMA_STYLE)  # the other place a template lives
    return {"qwen3": qwen, "gemma": gemma}


def hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def hf_ids(hf, messages, **kw):
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello! How are you?"}],
    "system": [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "def f(x): return x"}],
    "multi": [{"role": "system", "content": "Please reason step by step."},
              {"role": "user", "content": "the quick brown fox"},
              {"role": "assistant", "content": "<think>\njumps\n</think>\n\nover the lazy dog."},
              {"role": "user", "content": "How are you?"}],
}


@pytest.mark.parametrize("name", ["qwen3", "gemma"])
@pytest.mark.parametrize("thinking", [False, True])
def test_rendering_and_ids_equal_transformers_apply_chat_template(tokenizers, name, thinking):
    hf = hf_tokenizer(tokenizers[name])
    tok = Tokenizer(tokenizers[name])
    template = load_chat_template(tokenizers[name])
    for conv_name, messages in CONVERSATIONS.items():
        ours = template.render(messages, add_generation_prompt=True, enable_thinking=thinking)
        theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
        assert ours == theirs, (name, conv_name)
        ids = encode_chat(tok, template, messages, enable_thinking=thinking)
        assert ids == hf_ids(hf, messages, enable_thinking=thinking), (name, conv_name)
    # thinking is the template's business: Qwen3 writes an empty <think> block when it is off
    no_think = template.render(CONVERSATIONS["single"], enable_thinking=False)
    assert no_think.endswith("<think>\n\n</think>\n\n") == (name == "qwen3")
    if name == "gemma":
        assert ids[0] == tok.token_id("<bos>") and ids[1] != ids[0]  # one BOS: the template's


def test_end_of_turn_is_the_token_that_closes_an_assistant_turn(tokenizers):
    for name, token in (("qwen3", "<|im_end|>"), ("gemma", "<end_of_turn>")):
        tok = Tokenizer(tokenizers[name])
        assert end_of_turn_id(tok, load_chat_template(tokenizers[name])) == tok.token_id(token)


def test_eval_prompts_follow_deepspec_encode_chat_messages(tokenizers, tmp_path):
    # DeepSpec: first turn as the user message, add_generation_prompt=True, enable_thinking=False,
    # the rendered text tokenized with add_special_tokens=False
    rows = [{"turns": ["Hello! How are you?", "And the fox?"]}, {"turns": ["def f(x):"]}]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("qwen3", "gemma"):
        tok, hf = Tokenizer(tokenizers[name]), hf_tokenizer(tokenizers[name])
        encoder = first_turn_encoder(tok, load_chat_template(tokenizers[name]))
        domain, prompts = load_prompt_set(str(path), tok.encode, 4, 10, chat=encoder)
        expected = [hf_ids(hf, [{"role": "user", "content": r["turns"][0]}], enable_thinking=False) for r in rows]
        assert domain == "set" and sorted(prompts) == sorted(expected)


def test_bad_templates_and_messages_are_named(tokenizers, tmp_path):
    gemma = load_chat_template(tokenizers["gemma"])
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatError, match=r"chat_template.jinja: the chat template raised: Conversation roles must alternate"):
        gemma.render(twice)
    with pytest.raises(ChatError, match=r"does not compile \(line 1"):
        ChatTemplate.from_string("{% if messages %}", "x.jinja")
    cases = {"role": ([{"role": "bot", "content": "hi"}], "message 0 has role 'bot'; expected one of system, user"),
             "content": ([{"role": "user", "content": "a"}, {"role": "assistant"}], "message 1 (assistant) has no 'content'"),
             "list": ({"role": "user"}, "expected a non-empty list")}
    for name, (messages, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(messages))
        with pytest.raises(ChatError, match=re.escape(f"{path}: {message}")):
            read_messages(path)


@pytest.fixture(scope="module")
def chat_target(tokenizers, tmp_path_factory):
    """A tiny random target whose directory holds the Qwen3-style tokenizer and template."""
    import shutil

    root = tmp_path_factory.mktemp("chat_target") / "target"
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, eos_token_ids=(0,))
    save_qwen3(root, target_model.init_params(jax.random.key(0), cfg, std=0.3), cfg)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizers["qwen3"] / f, root / f)
    return root


def test_generate_feeds_the_chat_template_and_stops_at_its_end_of_turn(chat_target, tokenizers, tmp_path, capsys):
    hf = hf_tokenizer(tokenizers["qwen3"])
    common = ["generate", "--mode", "ar", "--target", str(chat_target), "--max-new-tokens", "4", "--no-warmup", "--json"]
    cli.main(common + ["--prompt", "Hello!", "--system", "Be brief."])
    out = json.loads(capsys.readouterr().out)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    assert out["chat"] is True and out["prompt_ids"] == hf_ids(hf, messages, enable_thinking=False)
    assert out["stop_ids"] == [0, Tokenizer(chat_target).token_id("<|im_end|>")]
    # the other ways in, up to the ids (run_generate feeds exactly these, as above)
    conversation = CONVERSATIONS["multi"]
    (tmp_path / "conv.json").write_text(json.dumps(conversation))
    tok = Tokenizer(chat_target)
    args = cli.build_parser().parse_args(common + ["--messages", str(tmp_path / "conv.json"), "--thinking"])
    assert cli.prompt_ids(args, tok) == (hf_ids(hf, conversation, enable_thinking=True), True, tok.token_id("<|im_end|>"))
    args = cli.build_parser().parse_args(common + ["--prompt", "Hello!", "--no-chat"])
    assert cli.prompt_ids(args, tok) == (tok.encode("Hello!"), False, None)


def test_chat_options_without_a_template_or_with_bad_messages_fail_clearly(chat_target, model_dir_without_template,
                                                                           tmp_path, capsys):
    plain = ["--tokenizer", str(model_dir_without_template / "tokenizer.json")]
    with pytest.raises(SystemExit, match=r"error: --chat: the tokenizer at .*plain has no chat template"):
        cli.main(["generate", "--target", str(chat_target), "--prompt", "hi", "--chat", *plain, "--json"])
    with pytest.raises(SystemExit, match=r"error: --messages: the tokenizer at .*plain has no chat template"):
        cli.main(["generate", "--target", str(chat_target), "--messages", "m.json", *plain, "--json"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"role": "robot", "content": "hi"}]))
    with pytest.raises(SystemExit, match=r"error: .*bad.json: message 0 has role 'robot'"):
        cli.main(["generate", "--target", str(chat_target), "--messages", str(bad), "--json"])
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]))
    with pytest.raises(SystemExit, match=r"error: .*chat_template.jinja: the chat template raised: Conversation roles"):
        cli.main(["generate", "--target", str(chat_target), "--tokenizer", str(model_dir_without_template.parent / "gemma"),
                  "--messages", str(twice), "--json"])


@pytest.fixture(scope="module")
def model_dir_without_template(tokenizers):
    import shutil

    d = tokenizers["qwen3"].parent / "plain"
    d.mkdir(exist_ok=True)
    shutil.copy(tokenizers["qwen3"] / "tokenizer.json", d / "tokenizer.json")
    return d


def test_generate_stream_prints_the_answer_then_the_statistics(chat_target, capsys):
    cli.main(["generate", "--mode", "ar", "--target", str(chat_target), "--prompt", "Hello!", "--max-new-tokens", "6",
              "--no-warmup", "--stream"])
    out = capsys.readouterr().out
    assert out.startswith("[sample 0] ")
    assert out.index("[sample 0]") < out.index("(first call") < out.index("tokens/s=")
    with pytest.raises(SystemExit, match="--stream prints one sample"):
        cli.main(["generate", "--target", str(chat_target), "--prompt", "Hello!", "--stream", "--json"])


def test_a_gemma4_target_directory_feeds_its_gemma_template_and_stops_at_end_of_turn(tokenizers, tmp_path):
    """A Gemma 4 checkpoint (the fixture's config) beside a Gemma-style tokenizer: the generate
    path renders the prompt as transformers' apply_chat_template does and adds <end_of_turn>
    to the Gemma target's stop ids (no model is run: both come before the weights)."""
    import os
    import shutil

    from dspark_jax.checkpoint import load_target_config
    from dspark_jax.chat import with_stop_id
    from fixtures import require_fixture

    fixture = require_fixture("deepspec_gemma4_vanilla", "target/config.json")
    target = tmp_path / "gemma4"
    target.mkdir()
    os.symlink(fixture / "target" / "config.json", target / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizers["gemma"] / f, target / f)
    tok, hf = Tokenizer(target), hf_tokenizer(target)
    args = cli.build_parser().parse_args(["generate", "--target", str(target), "--prompt", "Hello!", "--system", "Be brief."])
    ids, chat, end_of_turn = cli.prompt_ids(args, tok)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    assert chat and ids == hf_ids(hf, messages, enable_thinking=False) and ids.count(tok.token_id("<bos>")) == 1
    assert end_of_turn == tok.token_id("<end_of_turn>")
    cfg = load_target_config(target)
    assert cfg.family == "gemma4" and with_stop_id(cfg, end_of_turn).eos_token_ids == cfg.eos_token_ids + (end_of_turn,)
