"""The ``lsa-rewrite`` commands on tiny zoo checkpoints saved to temporary directories (no download, no SmolLM2).

``inspect``: the gemma3 zoo model has sliding-window layers 0 and 2 around a full-attention layer 1,
so the table must show one rewritten layer and two kept dense over their window. ``convert``,
``generate``, ``bench``: a tiny Llama with a character tokenizer; what the CLI writes and generates
must equal converting the same model in memory. Errors exit with code 2 and a one-line message.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_pretrained import CONFIG, char_tokenizer, save_tiny_checkpoint, tiny_llama
from typer.testing import CliRunner
from zoo import SLIDING_WINDOW, make_model

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(one_thread, tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3-tiny")
    make_model("gemma3").save_pretrained(path)
    return path


def invoke(*args):
    return CliRunner().invoke(app, ["inspect", *map(str, args)])


def test_inspect_prints_a_table(checkpoint):
    result = invoke(checkpoint)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Gemma3ForCausalLM" in out
    rows = [[cell.strip() for cell in line.strip("│ ").split("│")] for line in out.splitlines() if line.startswith("│")]
    assert [row[:8] for row in rows] == [
        ["0", "sdpa", "index_copy_", "4", "2", "16", str(SLIDING_WINDOW), "dense (window)"],
        ["1", "sdpa", "index_copy_", "4", "2", "16", "-", "rewrite"],
        ["2", "sdpa", "index_copy_", "4", "2", "16", str(SLIDING_WINDOW), "dense (window)"],
    ], out
    assert "1 of 3 layers rewritten to sparse decode attention; 2 kept dense over their sliding window" in " ".join(out.split())


def test_inspect_json(checkpoint):
    result = invoke(checkpoint, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert [r["action"] for r in rows] == ["ring", "rewrite", "ring"]
    assert [r["window"] for r in rows] == [SLIDING_WINDOW, None, SLIDING_WINDOW]
    assert all((r["q_heads"], r["kv_heads"], r["head_dim"]) == (4, 2, 16) for r in rows)
    assert {r["attention"] for r in rows} == {"sdpa"}


def test_inspect_eager_attention(checkpoint):
    result = invoke(checkpoint, "--json", "--attn", "eager")
    assert result.exit_code == 0, result.output
    assert {r["attention"] for r in json.loads(result.stdout)} == {"eager"}


ERRORS = [
    (["{tmp}/nope.gguf"], "no model at"),
    (["{tmp}"], "without config.json"),
    (["{checkpoint}", "--attn", "flash"], "--attn must be sdpa or eager"),
    (["{checkpoint}", "--capture-cache", "paged"], "capture_cache must be one of"),
]
ERROR_IDS = ["missing-file", "directory-without-config", "bad-attn", "bad-capture-cache"]


@pytest.mark.parametrize(("args", "message"), ERRORS, ids=ERROR_IDS)
def test_inspect_errors_exit_2_and_name_the_problem(checkpoint, tmp_path, args, message):
    result = invoke(*(a.format(tmp=tmp_path, checkpoint=checkpoint) for a in args))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "error: " in text and message in text, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("args", "message"), ERRORS, ids=ERROR_IDS)
def test_inspect_errors_are_one_line(checkpoint, tmp_path, args, message):
    result = invoke(*(a.format(tmp=tmp_path, checkpoint=checkpoint) for a in args))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got {len(lines)} lines:\n{result.output}"
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


# -- convert, generate, bench, --version ------------------------------------------------------
# A tiny Llama with a character tokenizer (tests/test_pretrained.py), saved as an ordinary HF
# directory. CONFIG's budget (96 tokens of a ~340-token context) makes selections happen, so a run
# with other settings than asked would decode differently.

LSA_OPTIONS = ["--budget", "96", "--chunk-size", "16", "--interval", "16", "--sink-tokens", "16", "--recent-tokens", "16"]
PROMPT = "The pass key is 68213. Remember it. " * 9
NEW_TOKENS = 12


def run(*args):
    return CliRunner().invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def tiny(one_thread, tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("llama-tiny"))


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "llama-lsa"
    result = run("convert", tiny, *LSA_OPTIONS, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in " ".join(result.stderr.split())
    return out


def _in_memory(config=CONFIG, *, chat=False, dense=False):
    """The reply and footprint of the same model converted in memory (or dense), greedy."""
    tokenizer = char_tokenizer()
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    model = tiny_llama() if dense else lsa_rewrite.convert(tiny_llama(), config)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return reply, (None if dense else lsa_rewrite.footprint(model)), ids.shape[1]


@pytest.fixture(scope="module")
def expected(one_thread):
    return _in_memory()


def test_version_prints_the_package_version():
    result = run("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"lsa-rewrite {lsa_rewrite.__version__}"


def test_convert_writes_a_directory_that_from_pretrained_loads(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "lsa_config.json", "tokenizer.json"} <= names
    assert "indexer.safetensors" not in names
    record = json.loads((converted / "lsa_config.json").read_text())
    assert record["_version"] == 1 and record["lsa_rewrite_version"] == lsa_rewrite.__version__
    assert LSAConfig.from_dict(record["config"]) == CONFIG
    model, tokenizer = lsa_rewrite.from_pretrained(converted)
    assert model.lsa.config == CONFIG
    assert tokenizer.decode(tokenizer(PROMPT).input_ids) == PROMPT


def test_generate_from_the_converted_directory_matches_converting_in_memory(converted, expected):
    reply, footprint, _ = expected
    result = run("generate", converted, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["reply"] == reply and got["tokens"] == NEW_TOKENS and got["seconds"] > 0
    assert got["footprint"] == footprint
    assert footprint["selections"] > 0 and footprint["ratio"] < 0.6


def test_generate_streams_the_reply_and_prints_the_footprint(converted, expected, tmp_path):
    reply, footprint, _ = expected
    (tmp_path / "prompt.txt").write_text(PROMPT)
    result = run("generate", converted, "--prompt-file", tmp_path / "prompt.txt", "--max-new-tokens", NEW_TOKENS)
    assert result.exit_code == 0, result.output
    assert result.stdout == reply + "\n"
    summary = " ".join(result.stderr.split())
    assert f"LSA KV on device: {footprint['resident_kv_bytes'] / 2**20:,.2f} MiB of {footprint['dense_kv_bytes'] / 2**20:,.2f} MiB dense" in summary
    assert f"({footprint['ratio']:.1%})" in summary and f"{NEW_TOKENS} tokens in" in summary


def test_generate_converts_a_plain_directory_with_the_options(tiny, expected):
    reply, footprint, _ = expected
    result = run("generate", tiny, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, *LSA_OPTIONS, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["reply"] == reply and got["footprint"] == footprint


def test_generate_chat_applies_the_chat_template(converted):
    reply, footprint, _ = _in_memory(chat=True)
    result = run("generate", converted, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--chat", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["reply"] == reply and got["footprint"]["tokens"] == footprint["tokens"]


def test_generate_dense_measures_the_dense_cache(converted):
    reply, _, prompt_len = _in_memory(dense=True)
    result = run("generate", converted, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--dense", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["reply"] == reply
    # 2 layers x (K, V) x 2 KV heads x head dim 16 x float32, for every token but the last generated one.
    assert got["footprint"]["dense_kv_bytes"] == got["footprint"]["resident_kv_bytes"] == 2 * 2 * 2 * 16 * 4 * (prompt_len + NEW_TOKENS - 1)
    assert "dense KV on device" in result.stderr


@pytest.fixture(scope="module")
def indexer_file(tiny, tmp_path_factory):
    from lsa_rewrite.indexer.calibrate import model_signature
    from lsa_rewrite.indexer.from_model import indexer_from_model

    model = tiny_llama()
    indexer = indexer_from_model(model, CONFIG, target_layers=[0, 1], rank=8)
    return indexer.save(tmp_path_factory.mktemp("indexer") / "tiny.safetensors", signature=model_signature(model), lsa=CONFIG.to_dict())


def test_convert_with_an_indexer_saves_it(tiny, indexer_file, tmp_path):
    from lsa_rewrite.indexer import LSAIndexer

    out = tmp_path / "out"
    result = run("convert", tiny, *LSA_OPTIONS, "--indexer", indexer_file, "-o", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "lsa_config.json").read_text())
    assert record["indexer"] == "indexer.safetensors" and record["config"]["_data"]["selector"] == "indexer"
    model, _ = lsa_rewrite.from_pretrained(out)
    want = LSAIndexer.load(indexer_file).state_dict()
    assert all(torch.equal(t, want[name]) for name, t in model.lsa.indexer.state_dict().items())


def test_convert_checks_the_conversion_before_writing(tiny, indexer_file, tmp_path):
    out = tmp_path / "out"
    result = run("convert", tiny, *LSA_OPTIONS[:2], "--chunk-size", "32", "--indexer", indexer_file, "-o", out)
    assert result.exit_code == 2, result.output
    assert "trained for chunk_size=16, but the LSAConfig has chunk_size=32" in " ".join(result.output.split())
    assert not out.exists()


def test_bench_json_rows(tiny):
    result = run("bench", tiny, "--contexts", "64,320", "--new-tokens", 4, *LSA_OPTIONS, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert LSAConfig.from_dict(got["config"]) == CONFIG and got["new_tokens"] == 4
    assert [row["context"] for row in got["rows"]] == [64, 320]
    for row in got["rows"]:
        held = row["context"] + 4 - 1
        assert row["dense"]["kv_bytes"] == 2 * 2 * 2 * 16 * 4 * held
        assert row["dense"]["tokens_per_s"] > 0 and row["lsa"]["tokens_per_s"] > 0
        assert row["lsa"]["kv_bytes"] == row["lsa"]["footprint"]["resident_kv_bytes"]
        assert row["lsa"]["footprint"]["tokens"] == held
    assert got["rows"][1]["lsa"]["kv_bytes"] < 0.6 * got["rows"][1]["dense"]["kv_bytes"]


def test_bench_table_reports_a_context_the_budget_cannot_serve(tiny):
    result = run("bench", tiny, "--contexts", "64,1024", "--new-tokens", 2, "--budget", 48, *LSA_OPTIONS[2:])
    assert result.exit_code == 0, result.output
    rows = [[cell.strip() for cell in line.strip("│ ").split("│")] for line in result.stdout.splitlines() if line.startswith("│")]
    assert [row[0] for row in rows] == ["64", "1,024"]
    assert rows[1][2] == "refused" and rows[0][2] != "refused"
    text = " ".join(result.stdout.split())
    assert "note: 1,024 tokens: budget 48 leaves 3 resident chunks" in text and "raise the budget" in text
    assert "note: 64 tokens: budget 48 cannot hold" in text  # kept everything resident, and said so


CLI_ERRORS = [
    (["convert", "{tiny}", "-o", "{tiny}"], "is MODEL itself"),
    (["convert", "{tiny}", "-o", "{tiny}/config.json"], "is a file"),
    (["convert", "{tiny}", "-o", "{checkpoint}"], "non-empty directory that holds no converted model"),
    (["convert", "{tiny}", "-o", "{tmp}/out", "--budget", "abc"], "--budget must be a fraction of the context"),
    (["convert", "{tiny}", "-o", "{tmp}/out", "--budget", "2.5"], "budget=2.5 is out of range"),
    (["convert", "{tiny}", "-o", "{tmp}/out", "--chunk-size", "24"], "chunk_size must be a positive power of two"),
    (["convert", "{tiny}", "-o", "{tmp}/out", "--selector", "indexer"], "needs a trained indexer: pass --indexer FILE"),
    (["convert", "{tiny}", "-o", "{tmp}/out", "--indexer", "{tmp}/nope.safetensors"], "--indexer '{tmp}/nope.safetensors' does not exist"),
    (["convert", "{tiny}", "-o", "{tmp}/out", "--indexer", "{tiny}/config.json", "--selector", "recency"], "leave out --selector"),
    (["convert", "{tiny}", "-o", "{tmp}/out", "--dtype", "int8"], "--dtype must be one of"),
    (["convert", "{tiny}", "-o", "{tmp}/out", "--mode", "evict", "--mirror", "fp8"], "mirror='fp8' with mode='evict'"),
    (["convert", "{tmp}/nope", "-o", "{tmp}/out"], "no model at"),
    (["generate", "{tiny}"], "exactly one of --prompt TEXT and --prompt-file FILE"),
    (["generate", "{tiny}", "-p", "hi", "--prompt-file", "{tiny}/config.json"], "exactly one of"),
    (["generate", "{tiny}", "--prompt-file", "{tmp}/nope.txt"], "--prompt-file '{tmp}/nope.txt' does not exist"),
    (["generate", "{tiny}", "-p", "  "], "the prompt is empty"),
    (["generate", "{tiny}", "-p", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "{tiny}", "-p", "hi", "--dense", "--budget", "0.5"], "--dense runs the model without LSA; leave out --budget"),
    (["generate", "{tiny}", "-p", "hi", "--device", "tpu"], "--device must be cpu or cuda"),
    (["generate", "{checkpoint}", "-p", "hi"], "has no tokenizer"),
    (["generate", "{tmp}/nope", "-p", "hi"], "no model at"),
    (["generate", "{no_chat}", "-p", "hi", "--chat", "--dense"], "has no chat template; leave out --chat"),
    (["bench", "{tiny}", "--contexts", "a,b"], "--contexts must be comma-separated prompt lengths"),
    (["bench", "{tiny}", "--new-tokens", "1"], "--new-tokens must be >= 2"),
    (["bench", "{tiny}", "--contexts", "4096"], "--contexts 4096 + --new-tokens 32 exceeds the 2048 positions of LlamaForCausalLM"),
]
CLI_ERROR_IDS = [
    "convert-out-is-model", "convert-out-is-file", "convert-out-not-empty", "convert-bad-budget", "convert-budget-range",
    "convert-chunk-size", "convert-indexer-selector-alone", "convert-missing-indexer", "convert-indexer-other-selector", "convert-dtype",
    "convert-fp8-mirror-in-evict-mode",
    "convert-missing-model", "generate-no-prompt", "generate-two-prompts", "generate-missing-prompt-file", "generate-empty-prompt",
    "generate-max-new-tokens", "generate-dense-with-budget", "generate-device", "generate-no-tokenizer", "generate-missing-model",
    "generate-no-chat-template", "bench-contexts", "bench-new-tokens", "bench-context-too-long",
]


@pytest.fixture(scope="module")
def no_chat(one_thread, tmp_path_factory):
    path = tmp_path_factory.mktemp("no-chat")
    tiny_llama().save_pretrained(path)
    char_tokenizer(chat_template=None).save_pretrained(path)
    return path


@pytest.mark.parametrize(("args", "message"), CLI_ERRORS, ids=CLI_ERROR_IDS)
def test_new_commands_fail_in_one_line_with_exit_2(request, tiny, checkpoint, tmp_path, args, message):
    paths = {"tiny": tiny, "checkpoint": checkpoint, "tmp": tmp_path}
    if "{no_chat}" in args:
        paths["no_chat"] = request.getfixturevalue("no_chat")
    result = run(*(a.format(**paths) for a in args))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got {len(lines)} lines:\n{result.output}"
    assert lines[0].startswith("error: ") and message.format(**paths) in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tiny, tmp_path):
    result = run("convert", tiny, "-o", tmp_path / "out", "--budget", "abc", "--debug")
    assert result.exit_code == 1
    assert isinstance(result.exception, ValueError) and "--budget must be a fraction" in str(result.exception)


def test_chat_keeps_the_store_across_turns(converted):
    """Interactive chat: the second turn prefills only its new tokens into the same conversation."""
    result = CliRunner().invoke(app, ["chat", str(converted), "--max-new-tokens", "6"], input=f"{PROMPT}\nand the key again?\n\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("you> ") == 3  # two turns, then the empty line ends it
    news = [int(part.split(" new prompt tokens")[0].split("(")[-1]) for part in result.stderr.split("\n") if "new prompt tokens prefilled" in part]
    assert len(news) == 2 and news[1] < news[0] / 4, news
    assert result.stderr.count("LSA KV on device") == 2


def test_chat_refuses_evict_mode_before_loading(converted):
    result = run("chat", converted, "--mode", "evict")
    assert result.exit_code == 2 and "use offload for chat" in result.output
