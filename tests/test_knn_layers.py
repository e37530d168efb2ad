"""MemoryConfig.knn_layers: which memory layers search memory themselves (kNN reads); every memory
layer still stores memory and reads pinned blocks (question reads)."""
import argparse

import pytest
import torch

from conftest import tiny_backbone
from memformer import MemformerForCausalLM, MemoryConfig
from memformer.persistence import read_adapter_config


def make(seed=0, layers=4, **cfg):
    bb = tiny_backbone(seed=seed, num_hidden_layers=layers)
    return MemformerForCausalLM(bb, None, MemoryConfig(**{"window": 16, "top_k": 4, "overlap": 3, **cfg}))


def ids(n, seed=1):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_knn_layers_read_like_memory_in_those_layers_only():
    """All layers storing memory but kNN reads in layers 2-3 gives the same logits as memory in
    layers 2-3 alone (same weights; a fresh model has no LoRA, its gates start at 0); all layers
    store memory."""
    x, q = ids(60), ids(6, seed=2)
    split = make(knn_layers=[2, 3])
    only = make(memory_layers=[2, 3])
    full = make(knn_layers=[0, 1, 2, 3])
    for m in (split, only, full):
        m.memorize(x, show_progress=False)
    assert sorted(split.memories) == [0, 1, 2, 3] and sorted(only.memories) == [2, 3]
    with torch.no_grad():
        a, b, c = (m(q).logits for m in (split, only, full))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-4                    # reads in layers 0-1 do change the output


@pytest.mark.parametrize("layers", [2, 3, 4, 7])
def test_default_knn_layers_are_the_upper_two_thirds_of_an_all_layer_memory(layers):
    """knn_layers=None with every layer a memory layer: kNN reads in layers L//3 .. L-1 (the
    lowest third only stores memory and reads question blocks); generation records kNN reads in
    exactly those layers."""
    model = make(layers=layers)
    want = list(range(layers // 3, layers))
    assert model.knn_layer_ids == want and model.memory_layer_ids == list(range(layers))
    assert model.memory_config.knn_layers is None           # the config keeps "default"
    model.memorize(ids(30), show_progress=False)
    model.generate(ids(5, seed=2), max_new_tokens=1, do_sample=False, record=True)
    assert sorted(model.recorded_reads()) == want


@pytest.mark.parametrize("memory_layers", [[0, 2], [1, 3], [3]])
def test_default_knn_layers_of_explicit_memory_layers_are_all_of_them(memory_layers):
    model = make(memory_layers=memory_layers)
    assert model.knn_layer_ids == memory_layers == model.memory_layer_ids
    model.memorize(ids(30), show_progress=False)
    assert sorted(model.memories) == memory_layers
    model.generate(ids(5, seed=2), max_new_tokens=1, do_sample=False, record=True)
    assert sorted(model.recorded_reads()) == memory_layers


def test_only_knn_layers_record_kNN_reads_but_every_layer_reads_pinned_blocks():
    model = make(knn_layers=[1, 3], block_size=8)
    model.memorize(ids(60), show_progress=False)
    rt = model.runtime
    rt.record = True
    with torch.no_grad():
        model(ids(5, seed=2))
    assert sorted(model.recorded_reads()) == [1, 3]
    model.clear_recorded_reads()
    with torch.no_grad(), model.reading_blocks([1, 2]):
        model(ids(5, seed=2))
    assert sorted(model.recorded_reads()) == [0, 1, 2, 3]
    rt.record = False


@pytest.mark.parametrize("kw, msg", [(dict(knn_layers=[]), "knn_layers is empty"),
                                     (dict(memory_layers=[1, 2], knn_layers=[3]), r"knn_layers \[3\] are not")])
def test_knn_layers_are_validated(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MemoryConfig(**kw)


@pytest.mark.parametrize("kw, msg", [(dict(knn_layers=[7]), r"knn_layers \[7\] are not memory layers"),
                                     (dict(knn_layers=[2, 4]), r"knn_layers \[4\] are not memory layers"),
                                     (dict(memory_layers=[0, 5]), r"memory_layers \[5\] out of range")])
def test_layers_beyond_the_backbone_are_refused_when_the_model_is_built(kw, msg):
    with pytest.raises(ValueError, match=msg):
        make(**kw)


def test_knn_layers_do_not_change_the_qa_cache_key():
    """kNN layers only change how memory is read, not what is stored: the same cache key; a
    setting that changes what is stored (the window) changes it."""
    from types import SimpleNamespace
    from memformer.qa.documents import Document
    from memformer.qa.longdoc import memory_key
    corpus = SimpleNamespace(documents=[Document("notes", "a fact worth keeping")])
    key = memory_key(corpus, make())
    assert memory_key(corpus, make(knn_layers=[3])) == key
    assert memory_key(corpus, make(knn_layers=[0, 1, 2, 3])) == key
    assert memory_key(corpus, make(window=32)) != key


def test_cli_layer_lists():
    from memformer.cli.common import add_model_args, memory_config_from_args, parse_layers
    assert parse_layers("0,2,5..7", "--x") == [0, 2, 5, 6, 7] and parse_layers(None, "--x") is None
    with pytest.raises(ValueError, match="--knn-layers: expected layer indices"):
        parse_layers("10-29", "--knn-layers")
    p = argparse.ArgumentParser()
    add_model_args(p)
    cfg = memory_config_from_args(p.parse_args(["--knn-layers", "10..29"]))
    assert cfg.knn_layers == list(range(10, 30)) and cfg.memory_layers is None


def test_cli_bad_knn_layers_exit_2_with_the_reason(tmp_path, capsys):
    from memformer.cli.main import main
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "ppl", "--knn-layers", "a..b", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--knn-layers: expected layer indices" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_report_headers_name_the_kNN_layers():
    from memformer.cli.common import describe_layers
    assert describe_layers(make()) == "all 4 (own reads in 1..3: 32 blocks per query chunk)"
    assert describe_layers(make(knn_layers=[0, 1, 2, 3])) == "all 4 (own reads in 0..3: 32 blocks per query chunk)"
    assert describe_layers(make(knn_layers=[1, 3], layer_blocks=0)) == "all 4 (own reads in [1, 3]: kNN, top-4)"
    assert describe_layers(make(memory_layers=[0, 2, 3], knn_layers=[0, 3], layer_blocks=8)) == \
        "[0, 2, 3] (own reads in [0, 3]: 8 blocks per query chunk)"


def test_load_model_passes_knn_layers_to_the_model_and_exits_2_when_bad(monkeypatch, capsys, tmp_path):
    """--knn-layers reaches MemoryConfig.knn_layers and the model's kNN layers, also over an
    adapter's config (whose other settings stay); a layer the backbone does not have, one that is
    not a memory layer, or a malformed list is a message and exit status 2."""
    from memformer.cli import common
    p = argparse.ArgumentParser()
    common.add_model_args(p)
    make(memory_layers=[0, 2, 3], top_k=5).save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    seen = []

    def tiny(cls, model=None, memory_config=None, *, adapter="auto", configure=None, **kw):
        """from_pretrained's choice of config on a tiny backbone (which has no shipped adapter)."""
        base = read_adapter_config(adapter) if adapter not in (None, "auto") else MemoryConfig()
        seen.append(configure(base) if configure else base)
        return MemformerForCausalLM(tiny_backbone(num_hidden_layers=4), None, seen[-1])

    monkeypatch.setattr(MemformerForCausalLM, "from_pretrained", classmethod(tiny))
    model = common.load_model(p.parse_args(["--knn-layers", "2..3"]))
    assert seen[-1].knn_layers == [2, 3] and model.knn_layer_ids == [2, 3]
    model = common.load_model(p.parse_args([]))
    assert seen[-1].knn_layers is None and model.knn_layer_ids == [1, 2, 3]
    model = common.load_model(p.parse_args(["--adapter", adapter, "--knn-layers", "2,3"]))
    assert model.knn_layer_ids == [2, 3] and seen[-1].memory_layers == [0, 2, 3]
    assert (seen[-1].top_k, seen[-1].window, seen[-1].overlap) == (5, 16, 3)     # the adapter's
    model = common.load_model(p.parse_args(["--adapter", adapter]))
    assert model.knn_layer_ids == [0, 2, 3]
    for argv, msg in ((["--knn-layers", "9"], "knn_layers [9] are not memory layers"),
                      (["--memory-layers", "0,1", "--knn-layers", "2"], "knn_layers [2] are not memory layers"),
                      (["--adapter", adapter, "--knn-layers", "1"], "knn_layers [1] are not memory layers"),
                      (["--knn-layers", "1-3"], "--knn-layers: expected layer indices")):
        with pytest.raises(SystemExit) as e:
            common.load_model(p.parse_args(argv))
        assert e.value.code == 2 and msg in capsys.readouterr().err
