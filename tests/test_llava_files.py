"""LLaVA on disk: a save_pretrained folder passes the untrusted-folder checks and loads through the llava
backend; every route to code, another location or another architecture is refused in one line; a
pruned export reloads with hipp.load_model and computes what the in-memory materialised model does."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from hipp import load_model
from hipp.backends import make_prunable
from hipp.core.plan import Plan
from hipp.errors import HippError
from hipp.export.pruned import export_pruned
from hipp.export.slicing import materialize, model_structure
from hipp.query.bound import Base, base_config
from hipp.storage.checkpoint import PRUNED_CONFIG_NAME, PRUNED_WEIGHTS_NAME, family, fingerprint, preprocess_cfg
from hipp.storage.fileio import load_tensors
from test_llava import generate, logits, plans, prompts, tiny_llava


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A tiny random LLaVA (CLIP tower, Llama decoder with grouped-query attention) as save_pretrained
    writes it: config.json, generation_config.json, model.safetensors; no tokenizer or processor files."""
    path = tmp_path_factory.mktemp("llava") / "tiny"
    tiny_llava("llama").save_pretrained(str(path))
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(path: Path, edit) -> None:
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def _config(edit):
    return lambda d: _edit(d / "config.json", edit)


def _write(name: str, content: dict):
    return lambda d: (d / name).write_text(json.dumps(content))


def _set(*keys, value):
    def edit(cfg):
        for k in keys[:-1]:
            cfg = cfg[k]
        cfg[keys[-1]] = value
    return edit


def _drop(key):
    return lambda cfg: cfg.pop(key)


# name: (how a working folder is made malicious or foreign, what the one-line refusal says)
MALICIOUS = {
    "auto_map_in_text_config": (_config(_set("text_config", "auto_map", value={"AutoModel": "evil.Model"})),
                                "remote code (text_config.auto_map)"),
    "auto_map_in_vision_config": (_config(_set("vision_config", "auto_map", value={"AutoConfig": "evil.C"})),
                                  "remote code (vision_config.auto_map)"),
    "auto_map_top_level": (_config(_set("auto_map", value={"AutoModel": "evil.Model"})), "remote code (auto_map)"),
    "trust_remote_code": (_config(_set("trust_remote_code", value=True)), "remote code (trust_remote_code)"),
    "unknown_text_model_type": (_config(_set("text_config", "model_type", value="mistral")),
                                "text_config.model_type 'mistral' is not one HiPP prunes"),
    "evil_text_model_type": (_config(_set("text_config", "model_type", value="evil")),
                             "text_config.model_type 'evil'"),
    "siglip_vision_tower": (_config(_set("vision_config", "model_type", value="siglip_vision_model")),
                            "vision_config.model_type 'siglip_vision_model'"),
    "no_text_config": (_config(_drop("text_config")), "needs text_config"),
    "text_config_a_string": (_config(_set("text_config", value="org/evil")), "needs text_config"),
    "not_llava": (_config(_set("model_type", value="llava_next")), "HiPP prunes clip and siglip"),
    "hub_attention_kernel": (_config(_set("text_config", "attn_implementation", value="evil/kernel")),
                             "names another location 'evil/kernel'"),
    "unknown_attention": (_config(_set("_attn_implementation", value="flex_attention")),
                          "attention implementation 'flex_attention'"),
    "quantized_decoder": (_config(_set("text_config", "quantization_config", value={"quant_method": "bitsandbytes"})),
                          "quantized weights (text_config.quantization_config)"),
    "weights_elsewhere": (_config(_set("transformers_weights", value="../other/model.safetensors")),
                          "names another location"),
    "pickle_weights": (_config(_set("transformers_weights", value="pytorch_model.bin")), "safetensors weights only"),
    "adapter": (_write("adapter_config.json", {"base_model_name_or_path": "org/base"}), "PEFT adapter"),
    "foreign_shard": (_write("model.safetensors.index.json", {"weight_map": {"lm_head.weight": "/etc/passwd"}}),
                      "names another location '/etc/passwd'"),
    "tokenizer_remote_code": (_write("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["evil.T", None]}}),
                              "remote code (auto_map)"),
    "tokenizer_class": (_write("tokenizer_config.json", {"tokenizer_class": "EvilTokenizer"}),
                        "names tokenizer class 'EvilTokenizer'"),
    "image_processor": (_write("preprocessor_config.json", {"image_processor_type": "EvilImageProcessor"}),
                        "names image processor 'EvilImageProcessor'"),
}


@pytest.fixture
def no_transformers_load(monkeypatch):
    """Refusals come before transformers reads the folder: any config or model load here fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("transformers was handed a refused folder")
    for owner in (transformers.AutoConfig, transformers.LlavaForConditionalGeneration):
        monkeypatch.setattr(owner, "from_pretrained", refuse)


@pytest.mark.parametrize("name", sorted(MALICIOUS))
def test_a_malicious_llava_folder_is_refused_in_one_line(name, llava_dir, tmp_path, no_transformers_load):
    damage, needle = MALICIOUS[name]
    folder = _copy(llava_dir, tmp_path / "m")
    damage(folder)
    with pytest.raises(HippError) as e:
        load_model(folder)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_llava_folder_loads_locally_without_code(llava_dir, monkeypatch):
    calls = []
    original = transformers.LlavaForConditionalGeneration.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **kwargs)
    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", classmethod(spy))
    model = load_model(llava_dir)
    assert isinstance(model, transformers.LlavaForConditionalGeneration) and family(model) == "llava"
    assert calls and all(c["trust_remote_code"] is False and c["local_files_only"] is True
                         and c["use_safetensors"] is True for c in calls)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert preprocess_cfg(model)["size"] == 16  # CLIP's defaults at the tower's size: no processor files here
    original_model = tiny_llava("llama")  # the same seed: the weights that were saved
    inputs = prompts(model)
    assert torch.equal(logits(model, inputs), logits(original_model, inputs))
    assert load_model(llava_dir, expect="llava") is not None
    with pytest.raises(HippError, match="is a llava model, but clip was asked for"):
        load_model(llava_dir, expect="clip")


def _hard_plan(model) -> Plan:
    """A key/value group and some channels off in every layer, and the first layer of each stage dropped."""
    space = make_prunable(model)
    plan = Plan.from_gates(space, plans(space)["partial_and_dropped"], preference={"utility": 1.0})
    assert not plan.layer_keep.all() and any(not h.all() for h in plan.head_keep)
    return plan


@pytest.fixture(scope="module")
def export(llava_dir, tmp_path_factory):
    model = load_model(llava_dir)
    base = Base(model, str(llava_dir), None, base_config(model, str(llava_dir)), preprocess_cfg(model), None,
                fingerprint(model))
    plan = _hard_plan(model)
    out = tmp_path_factory.mktemp("export") / "pruned"
    result = export_pruned(base, plan, out)
    return base, plan, out, result


def test_an_exported_llava_reloads_and_computes_as_the_materialised_model(export):
    base, plan, out, result = export
    small = materialize(base.model, plan)
    loaded = load_model(out)
    assert isinstance(loaded, transformers.LlavaForConditionalGeneration) and family(loaded) == "llava"
    assert model_structure(loaded) == model_structure(small)
    inputs = prompts(small)
    assert torch.allclose(logits(loaded, inputs), logits(small, inputs), atol=1e-6, rtol=0)
    assert torch.equal(generate(loaded, inputs, 8), generate(small, inputs, 8))
    assert result["num_params"] == sum(p.numel() for p in loaded.parameters()) < sum(
        p.numel() for p in base.model.parameters())


def test_the_export_folder_holds_transformers_names_and_smaller_shapes(export):
    base, plan, out, result = export
    assert sorted(result["files"]) == [PRUNED_WEIGHTS_NAME, PRUNED_CONFIG_NAME]  # no tokenizer files in the base
    weights, dense = load_tensors(out / PRUNED_WEIGHTS_NAME), base.model.state_dict()
    small = materialize(base.model, plan).state_dict()
    assert set(weights) == set(small) and set(weights) < set(dense)  # dropped layers leave no tensors
    assert all(weights[k].shape == small[k].shape for k in weights)
    q = "model.language_model.layers.1.self_attn.q_proj.weight"
    assert weights[q].shape[0] < dense[q].shape[0]  # one of the two key/value groups and its query heads gone
    config = json.loads((out / PRUNED_CONFIG_NAME).read_text())
    assert config["backend"] == "llava" and config["model_cfg"]["model_type"] == "llava"
    assert config["model_cfg"]["text_config"]["model_type"] == "llama"
    structure = config["structure"]
    assert [l["kept"] for l in structure["vision"]][0] is False and structure["language"][0]["kept"] is False
    assert structure["language"][1]["heads"] == 1 and structure == model_structure(materialize(base.model, plan))


def test_compensation_is_refused_for_llava_before_anything_is_written(export, tmp_path):
    base, plan, _, _ = export
    with pytest.raises(HippError, match="--compensate is not available for a llava model"):
        export_pruned(base, plan, tmp_path / "x", compensate=True)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("damage,needle", [
    (lambda c: c["model_cfg"]["text_config"].update(auto_map={"AutoModel": "evil.M"}), "remote code"),
    (lambda c: c["model_cfg"]["text_config"].update(model_type="evil"), "text_config.model_type 'evil'"),
    (lambda c: c["model_cfg"].update(model_type="clip"), "backend 'llava' does not build a transformers 'clip'"),
    (lambda c: c["structure"]["language"].pop(), "structure must list 3 language layers"),
])
def test_a_damaged_llava_export_is_refused_in_one_line(export, tmp_path, damage, needle):
    folder = _copy(export[2], tmp_path / "e")
    _edit(folder / PRUNED_CONFIG_NAME, damage)
    with pytest.raises(HippError) as e:
        load_model(folder)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_eval_without_a_processor_and_train_refuse_a_llava_in_one_line(llava_dir, tmp_path, capsys):
    """eval and the generative task need the folder's processor files, and the default (contrastive)
    task refuses a LLaVA: one line and status 2 each."""
    from hipp.cli.main import main

    cfg, instruct = tmp_path / "train.yaml", tmp_path / "instruct.yaml"
    cfg.write_text(f"model: {llava_dir}\noutput: {tmp_path / 'ctrl'}\n")
    instruct.write_text(f"model: {llava_dir}\noutput: {tmp_path / 'ctrl'}\ntask: instruct\n")
    for args, says in ((["eval", "--model", str(llava_dir), "--data", "shapes"], "has no processor"),
                       (["train", "--config", str(cfg)], "a llava model takes task instruct"),
                       (["train", "--config", str(instruct)], "has no processor")):
        capsys.readouterr()
        code = main(args)
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert says in err


def test_a_qwen2_llava_round_trips_too(tmp_path):
    """A Qwen2-shaped decoder (q/k/v biases, 6 query heads on 2 k/v groups) and every vision position
    as image features: save_pretrained folder -> load -> export -> load, as the materialised model."""
    tiny_llava("qwen2").save_pretrained(str(tmp_path / "base"))
    model = load_model(tmp_path / "base")
    base = Base(model, str(tmp_path / "base"), None, base_config(model, str(tmp_path / "base")),
                preprocess_cfg(model), None, fingerprint(model))
    plan = _hard_plan(model)
    export_pruned(base, plan, tmp_path / "pruned")
    small, loaded = materialize(model, plan), load_model(tmp_path / "pruned")
    inputs = prompts(small)
    assert torch.allclose(logits(loaded, inputs), logits(small, inputs), atol=1e-6, rtol=0)
    assert torch.equal(generate(loaded, inputs, 8), generate(small, inputs, 8))


def test_a_plan_for_another_model_is_refused_in_one_line(export):
    """A Plan carries its prune space: materialising it on a model of other shapes says so, rather
    than failing inside the slicing (the Qwen2-shaped LLaVA has other head counts)."""
    from hipp.export.slicing import materialize

    base, plan, _, _ = export
    other = tiny_llava("qwen2")
    make_prunable(other)
    with pytest.raises(HippError, match="the plan is for another model") as e:
        materialize(other, plan)
    assert "\n" not in str(e.value) and "language: 3 layers, 2 attention units" in str(e.value)


def test_recover_with_the_default_config_refuses_a_llava_export_in_one_line(export, tmp_path, capsys):
    """The default recovery config names a contrastive task; a generative export gets one line first."""
    from hipp.cli.main import main

    _, _, out, _ = export
    code = main(["recover", "--model", str(out), "--out", str(tmp_path / "r")])
    stdout, err = capsys.readouterr()
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1
    assert "a llava model takes task instruct" in err and not (tmp_path / "r").exists()
