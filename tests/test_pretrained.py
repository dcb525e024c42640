"""A converted HF model on disk: ``save_pretrained`` and ``lsa_rewrite.from_pretrained`` (lsa_rewrite/pretrained.py).

Tiny zoo Llama (2 layers) with a character tokenizer built in code: nothing is downloaded. The budget
(96 tokens of a 300-token prompt) makes selections happen, so a conversion loaded with other settings
than the saved ones would decode differently.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json

import pytest
import torch
from helpers import hf_greedy
from zoo import VOCAB_SIZE, make_model

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.pretrained import CONFIG_FILE, INDEXER_FILE, read_lsa_config

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = LSAConfig(budget=96, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16)
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer(*, chat_template: str | None = CHAT_TEMPLATE):
    """One token per printable ASCII character, the rest of the zoo's 256 ids as ``<xN>`` tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {name: i for i, name in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}  # the zoo's pad/bos/eos ids 0-2
    for char in map(chr, range(32, 127)):
        vocab[char] = len(vocab)
    while len(vocab) < VOCAB_SIZE:
        vocab[f"<x{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = chat_template
    return fast


def tiny_llama():
    """The zoo Llama with EOS off (random weights emit it at random; runs must be compared at full length)."""
    model = make_model("llama").eval()
    model.generation_config.eos_token_id = None
    return model


def save_tiny_checkpoint(path, *, tokenizer: bool = True):
    """Save the tiny Llama (and its character tokenizer) as an ordinary HF model directory."""
    tiny_llama().save_pretrained(path)
    if tokenizer:
        char_tokenizer().save_pretrained(path)
    return path


def prompt_ids(length: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, (1, length), generator=torch.Generator().manual_seed(seed))


def test_save_pretrained_writes_lsa_config_and_the_model_keeps_working(tmp_path):
    converted = lsa_rewrite.convert(tiny_llama(), CONFIG)
    ids = prompt_ids()
    want, _ = hf_greedy(converted, ids, 20)
    session, store = converted.lsa, converted.lsa.store

    converted.save_pretrained(tmp_path)

    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert record == {
        "_type": "LSAPretrained", "_version": 1, "lsa_rewrite_version": lsa_rewrite.__version__, "config": CONFIG.to_dict(), "indexer": None,
    }
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert not (tmp_path / INDEXER_FILE).exists()
    # Still converted, with the same session and the sequences it held; and it decodes as before.
    assert converted.lsa is session and session.store is store and not store.retired
    assert torch.equal(hf_greedy(converted, ids, 20)[0], want)
    with pytest.raises(TypeError, match="state_dict"):  # the handlers came back after the save
        torch.save(converted, io.BytesIO())
    # The directory is an ordinary HF checkpoint of the dense weights.
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    reference = tiny_llama().state_dict()
    assert all(torch.equal(t, reference[name]) for name, t in dense.state_dict().items())


def test_from_pretrained_decodes_as_converting_in_memory(tmp_path):
    ids = prompt_ids(seed=1)
    in_memory = lsa_rewrite.convert(tiny_llama(), CONFIG)
    want_tokens, want_logits = hf_greedy(in_memory, ids, 24)
    in_memory.save_pretrained(tmp_path)

    loaded, tokenizer = lsa_rewrite.from_pretrained(tmp_path)

    assert tokenizer is None  # none was saved
    assert loaded.lsa.config == CONFIG and loaded.lsa.indexer is None
    tokens, logits = hf_greedy(loaded, ids, 24)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
    assert lsa_rewrite.footprint(loaded) == lsa_rewrite.footprint(in_memory)
    assert lsa_rewrite.footprint(loaded)["ratio"] < 0.6  # the budget bites: selections decided these tokens
    assert lsa_rewrite.footprint(loaded)["selections"] > 0


def test_indexer_is_saved_and_loaded_back(tmp_path):
    from lsa_rewrite.indexer.from_model import indexer_from_model

    config = dataclasses.replace(CONFIG, selector="indexer")
    model = tiny_llama()
    indexer = indexer_from_model(model, config, target_layers=[0, 1], rank=8)
    converted = lsa_rewrite.convert(model, config, indexer=indexer)
    ids = prompt_ids(seed=2)
    want, _ = hf_greedy(converted, ids, 20)
    converted.save_pretrained(tmp_path)

    assert json.loads((tmp_path / CONFIG_FILE).read_text())["indexer"] == INDEXER_FILE
    assert converted.lsa.indexer.source == "<in-memory indexer>"  # saving did not rewrite the live indexer
    loaded, _ = lsa_rewrite.from_pretrained(tmp_path)
    assert loaded.lsa.config == config
    saved = loaded.lsa.indexer.state_dict()
    assert saved.keys() == indexer.state_dict().keys()
    assert all(torch.equal(saved[name], t) for name, t in indexer.state_dict().items())
    assert loaded.lsa.indexer.signature["class"] == "LlamaForCausalLM"  # recorded from the model it was saved with
    assert torch.equal(hf_greedy(loaded, ids, 20)[0], want)

    # A config without the indexer selector ignores the saved indexer.
    plain, _ = lsa_rewrite.from_pretrained(tmp_path, config=CONFIG)
    assert plain.lsa.indexer is None and plain.lsa.config == CONFIG


def test_saving_without_an_indexer_removes_a_stale_one(tmp_path):
    (tmp_path / INDEXER_FILE).write_bytes(b"from an earlier save")
    lsa_rewrite.convert(tiny_llama(), CONFIG).save_pretrained(tmp_path)
    assert not (tmp_path / INDEXER_FILE).exists()
    assert read_lsa_config(tmp_path).indexer is None


def test_config_argument_overrides_the_saved_one_and_converts_plain_directories(tmp_path):
    converted_dir, plain_dir = tmp_path / "converted", tmp_path / "plain"
    lsa_rewrite.convert(tiny_llama(), CONFIG).save_pretrained(converted_dir)
    save_tiny_checkpoint(plain_dir)
    dense = LSAConfig(mode="dense", chunk_size=16, interval=16)

    model, _ = lsa_rewrite.from_pretrained(converted_dir, config=dense)
    assert model.lsa.config == dense

    model, tokenizer = lsa_rewrite.from_pretrained(plain_dir, config=CONFIG)
    assert model.lsa.config == CONFIG
    assert tokenizer is not None and tokenizer.decode(tokenizer("pass key").input_ids) == "pass key"

    with pytest.raises(FileNotFoundError, match="has no lsa_config.json.*config=LSAConfig.*lsa-rewrite convert"):
        lsa_rewrite.from_pretrained(plain_dir)


def _write_record(path, **changes):
    path.mkdir(exist_ok=True)
    record = {"_type": "LSAPretrained", "_version": 1, "lsa_rewrite_version": "0.1.0", "config": CONFIG.to_dict(), "indexer": None}
    record.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(record))
    return path


BAD_DIRECTORIES = [
    (lambda p: p / "nowhere", FileNotFoundError, "no model at"),
    (lambda p: (p / CONFIG_FILE).write_text("{not json") and p, ValueError, "lsa_config.json is not readable JSON.*lsa-rewrite convert"),
    (lambda p: _write_record(p, _version=99, lsa_rewrite_version="9.0"), ValueError, "format version 99.*lsa-rewrite 9.0.*reads version 1.*upgrade"),
    (lambda p: _write_record(p, _type="Other"), ValueError, "not an lsa-rewrite model config"),
    (lambda p: _write_record(p, config={"_type": "LSAConfig", "_version": 1, "_data": {"budget": 7.5}}), ValueError, "invalid LSA config: budget=7.5"),
    (lambda p: _write_record(p, config={"_type": "LSAConfig", "_version": 1, "_data": {"pool": 3}}), ValueError, "unknown LSAConfig fields"),
    (lambda p: _write_record(p, indexer=INDEXER_FILE), FileNotFoundError, "names the indexer 'indexer.safetensors', but .* is missing"),
    (lambda p: _write_record(p, indexer="../elsewhere.safetensors"), ValueError, "'indexer' must be null or a file name"),
]
BAD_IDS = ["missing", "corrupt-json", "unknown-version", "wrong-type", "bad-config-value", "unknown-config-field", "missing-indexer", "indexer-outside"]


@pytest.mark.parametrize(("make", "error", "message"), BAD_DIRECTORIES, ids=BAD_IDS)
def test_bad_directories_fail_before_loading_and_name_the_file(tmp_path, make, error, message):
    path = make(tmp_path)
    with pytest.raises(error, match=message) as info:
        lsa_rewrite.from_pretrained(path)
    if path.exists():
        assert str(path / CONFIG_FILE) in str(info.value)


def test_from_pretrained_refuses_a_config_of_another_type(tmp_path):
    with pytest.raises(TypeError, match="config must be an LSAConfig"):
        lsa_rewrite.from_pretrained(tmp_path, config={"budget": 0.25})


def test_deepcopy_and_moves_keep_save_pretrained(tmp_path):
    converted = lsa_rewrite.convert(tiny_llama(), CONFIG)
    clone = copy.deepcopy(converted)
    clone.save_pretrained(tmp_path / "clone")
    assert read_lsa_config(tmp_path / "clone").config == CONFIG
    moved = converted.to(torch.float64)
    moved.save_pretrained(tmp_path / "moved")
    assert read_lsa_config(tmp_path / "moved").config == CONFIG
    assert json.loads((tmp_path / "moved" / "config.json").read_text())["dtype"] == "float64"


@pytest.mark.slow
def test_gguf_model_saves_dequantized_and_keeps_its_quantizer(smollm2, tmp_path):
    model, tokenizer = smollm2
    converted = lsa_rewrite.convert(copy.deepcopy(model), LSAConfig(budget=0.25, chunk_size=16, interval=16))
    converted.save_pretrained(tmp_path)
    assert converted.hf_quantizer is not None and converted.config.quantization_config is not None  # set aside for the save only
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = lsa_rewrite.from_pretrained(tmp_path)
    reference = model.state_dict()
    assert all(torch.equal(t, reference[name]) for name, t in loaded.state_dict().items())
    assert loaded_tokenizer("The pass key is").input_ids == tokenizer("The pass key is").input_ids


def test_importing_the_convert_module_keeps_the_convert_function():
    # The import system sets a package attribute for each submodule it loads; from_pretrained and the
    # CLI import lsa_rewrite.convert, which must not turn lsa_rewrite.convert into the module.
    import sys

    setattr(lsa_rewrite, "convert", sys.modules["lsa_rewrite.convert"])
    assert callable(lsa_rewrite.convert) and lsa_rewrite.convert.__module__ == "lsa_rewrite.convert"
