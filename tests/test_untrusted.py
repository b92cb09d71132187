"""No model folder makes open_clip or transformers run its code, download anything or read outside it.

Each malicious folder below is a working model folder plus one route. Where the route imports a
python file, that file (evil.py) would create a marker file; where it names a path, the path lies in
a decoy folder beside the model. While HiPP looks at a folder an audit hook records every file opened
under the decoy and every network lookup or connection: both must stay empty, the marker must never
appear, and the CLI must answer with one line and exit status 2.
"""
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from hipp import get_preprocess, get_tokenizer, load_model
from hipp.backends import hf as hf_backend
from hipp.backends import make_prunable
from hipp.storage.checkpoint import CONFIG_NAME, PRUNED_CONFIG_NAME, fingerprint
from hipp.cli.main import main
from hipp.errors import HippError
from conftest import TEACHER_DIR
from test_query import PREFS, assert_bad, cli, designed_controller, tiny_controller_dir  # noqa: F401

# --- watching what a load touches ---

_WATCH = []  # (decoy folder, what was seen) while a check runs; the hook is idle otherwise


def _audit(event, args):
    if not _WATCH:
        return
    decoy, seen = _WATCH[0]
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(decoy):
            seen.append(path)
    elif event in ("socket.connect", "socket.getaddrinfo"):
        seen.append(f"{event} {args[:2]!r}")


sys.addaudithook(_audit)  # hooks cannot be removed; an idle one costs one list test per event


@contextmanager
def watched(decoy: Path):
    seen = []
    _WATCH.append((str(decoy.resolve()), seen))
    try:
        yield seen
    finally:
        _WATCH.clear()


# --- the legitimate folders every malicious one starts from ---

@pytest.fixture(scope="module")
def hf_dir(hf_tiny_dir):
    """The tiny open_clip model as `hipp convert` writes it (conftest): every transformers decoy starts here."""
    return hf_tiny_dir


@pytest.fixture(scope="module")
def exports(tiny_controller_dir, hf_dir, tmp_path_factory):  # noqa: F811
    """One `hipp export` of each backend."""
    root = tmp_path_factory.mktemp("untrusted-exports")
    model = load_model(hf_dir)
    print_ = fingerprint(model)
    hf_ctrl = root / "hf-ctrl"
    designed_controller(make_prunable(model, 16)).save(
        hf_ctrl, fingerprint=print_, extra={"base_model": str(hf_dir), "family": "clip", "channel_group": 16})
    out = {}
    for name, ctrl in (("oc_export", tiny_controller_dir), ("hf_export", hf_ctrl)):
        out[name] = root / name
        code = main(["export", "--controller", str(ctrl), "--pref", PREFS["partial"], "--out", str(out[name])])
        assert code == 0, name
    return out


@pytest.fixture
def bases(tiny_model_dir, hf_dir, exports):
    return {"oc": tiny_model_dir, "hf": hf_dir, **exports}


@pytest.fixture
def decoy(hf_dir, tmp_path):
    """Files a path in a config could reach outside the model folder, and a transformers folder whose
    own config imports evil.py."""
    import open_clip.tokenizer

    d = tmp_path / "decoy"
    d.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        shutil.copy(hf_dir / name, d / name)
    shutil.copy(open_clip.tokenizer.default_bpe(), d / "bpe.txt.gz")
    shutil.copy(hf_dir / "model.safetensors", d / "x.safetensors")
    shutil.copytree(hf_dir, d / "clip")
    _json(d / "clip" / "config.json", lambda c: c.update(auto_map={"AutoConfig": "evil.EvilConfig"}))
    return d


EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer


class EvilConfig(CLIPConfig):
    pass


class EvilModel(CLIPModel):
    pass


class EvilTokenizer(CLIPTokenizer):
    pass


class EvilImageProcessor(CLIPImageProcessor):
    pass
"""


def _json(path: Path, edit) -> None:
    cfg = json.loads(path.read_text()) if path.exists() else {}
    edit(cfg)
    path.write_text(json.dumps(cfg))


def _text(cfg: dict) -> dict:
    return cfg["model_cfg"]["text_cfg"]


def _vision(cfg: dict) -> dict:
    return cfg["model_cfg"]["vision_cfg"]


REMOTE = "asks for remote code"
ELSEWHERE = "names another location"
TOKENIZER_REMOTE = {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}


def _oc_remote_tokenizer(d, x):
    """The route known first: open_clip's local-dir tokenizer runs AutoTokenizer with the config's kwargs."""
    _json(d / CONFIG_NAME, lambda c: _text(c).update(hf_tokenizer_name=".",
                                                      tokenizer_kwargs={"trust_remote_code": True}))
    _json(d / "tokenizer_config.json", lambda c: c.update(TOKENIZER_REMOTE))


# name: (folder it starts from, what makes it malicious (folder, decoy), the refusal's words)
CASES = {
    # open_clip folders: open_clip_config.json
    "oc-tokenizer-remote-code": ("oc", _oc_remote_tokenizer, REMOTE + " (text_cfg.tokenizer_kwargs.trust_remote_code)"),
    "oc-hf-tokenizer": ("oc", lambda d, x: (_json(d / CONFIG_NAME, lambda c: _text(c).update(hf_tokenizer_name=".")),
                                            _json(d / "tokenizer_config.json", lambda c: c.update(TOKENIZER_REMOTE))),
                        "asks for a transformers tokenizer"),
    "oc-hf-text-tower-hub": ("oc", lambda d, x: _json(d / CONFIG_NAME, lambda c: _text(c).update(
        hf_model_name="evil-org/evil-bert", hf_model_pretrained=True)), ELSEWHERE + " 'evil-org/evil-bert'"),
    "oc-hf-text-tower-path": ("oc", lambda d, x: _json(d / CONFIG_NAME, lambda c: _text(c).update(
        hf_model_name=str(x / "clip"))), ELSEWHERE),
    "oc-timm-pretrained": ("oc", lambda d, x: _json(d / CONFIG_NAME, lambda c: _vision(c).update(
        timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=True)), ELSEWHERE),
    "oc-timm-hub": ("oc", lambda d, x: _json(d / CONFIG_NAME, lambda c: _vision(c).update(
        timm_model_name="hf-hub:evil-org/evil-vit")), ELSEWHERE),
    "oc-timm-tower": ("oc", lambda d, x: _json(d / CONFIG_NAME, lambda c: _vision(c).update(
        timm_model_name="vit_tiny_patch16_224")), "asks for a timm vision tower"),
    "oc-bpe-path": ("oc", lambda d, x: _json(d / CONFIG_NAME, lambda c: _text(c).update(
        tokenizer_kwargs={"bpe_path": str(x / "bpe.txt.gz")})), ELSEWHERE),
    "oc-nltk-download": ("oc", lambda d, x: _json(d / CONFIG_NAME, lambda c: _text(c).update(
        tokenizer_kwargs={"reduction_mask": "syntax"})), "download NLTK"),
    "oc-auto-map": ("oc", lambda d, x: _json(d / CONFIG_NAME, lambda c: c["model_cfg"].update(
        auto_map={"AutoModel": "evil.EvilModel"})), REMOTE + " (auto_map)"),
    "oc-unknown-key": ("oc", lambda d, x: _json(d / CONFIG_NAME, lambda c: _vision(c).update(evil=1)),
                       "is not one HiPP builds"),
    "oc-preprocess-key": ("oc", lambda d, x: _json(d / CONFIG_NAME, lambda c: c["preprocess_cfg"].update(evil=1)),
                          "preprocess_cfg key 'evil'"),
    # transformers folders: config.json and the tokenizer / image-processor files beside it
    "hf-config-auto-map": ("hf", lambda d, x: _json(d / "config.json", lambda c: c.update(
        auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})), REMOTE + " (auto_map)"),
    "hf-unknown-type-auto-map": ("hf", lambda d, x: _json(d / "config.json", lambda c: c.update(
        model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"})), REMOTE),
    "hf-text-config-auto-map": ("hf", lambda d, x: _json(d / "config.json", lambda c: c["text_config"].update(
        auto_map={"AutoConfig": "evil.EvilConfig"})), REMOTE + " (text_config.auto_map)"),
    "hf-model-type": ("hf", lambda d, x: _json(d / "config.json", lambda c: c.update(model_type="bert")),
                      "HiPP prunes clip and siglip"),
    "hf-tokenizer-auto-map": ("hf", lambda d, x: _json(d / "tokenizer_config.json", lambda c: c.update(
        auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})), REMOTE + " (auto_map)"),
    "hf-tokenizer-class": ("hf", lambda d, x: _json(d / "tokenizer_config.json", lambda c: c.update(
        tokenizer_class="EvilTokenizer")), "names tokenizer class 'EvilTokenizer'"),
    "hf-tokenizer-class-not-clip": ("hf", lambda d, x: _json(d / "tokenizer_config.json", lambda c: c.update(
        tokenizer_class="LlamaTokenizer")), "names tokenizer class 'LlamaTokenizer'"),
    "hf-config-tokenizer-class": ("hf", lambda d, x: _json(d / "config.json", lambda c: c.update(
        tokenizer_class="EvilTokenizer")), "names tokenizer class"),
    "hf-preprocessor-auto-map": ("hf", lambda d, x: _json(d / "preprocessor_config.json", lambda c: c.update(
        auto_map={"AutoImageProcessor": "evil.EvilImageProcessor"})), REMOTE + " (auto_map)"),
    "hf-processor-auto-map": ("hf", lambda d, x: _json(d / "processor_config.json", lambda c: c.update(
        processor_class="CLIPProcessor", image_processor={"auto_map": {"AutoImageProcessor": "evil.EvilImage"}})),
                              REMOTE + " (image_processor.auto_map)"),
    "hf-image-processor-type": ("hf", lambda d, x: _json(d / "preprocessor_config.json", lambda c: c.update(
        image_processor_type="TimmWrapperImageProcessor")), "names image processor"),
    "hf-vocab-file": ("hf", lambda d, x: _json(d / "tokenizer_config.json", lambda c: c.update(
        vocab_file=str(x / "vocab.json"))), ELSEWHERE),
    "hf-merges-file": ("hf", lambda d, x: _json(d / "tokenizer_config.json", lambda c: c.update(
        merges_file="../decoy/merges.txt")), ELSEWHERE + " '../decoy/merges.txt' (merges_file)"),
    "hf-tokenizer-file": ("hf", lambda d, x: _json(d / "tokenizer_config.json", lambda c: c.update(
        tokenizer_file=str(x / "tokenizer.json"))), ELSEWHERE),
    "hf-fast-tokenizer-files": ("hf", lambda d, x: _json(d / "tokenizer_config.json", lambda c: c.update(
        fast_tokenizer_files=["../decoy/tokenizer.json"])), ELSEWHERE),
    "hf-vocab-path": ("hf", lambda d, x: _json(d / "tokenizer_config.json", lambda c: c.update(
        vocab=str(x / "vocab.json"))), ELSEWHERE),
    "hf-sentencepiece-file": ("hf", lambda d, x: _json(d / "tokenizer_config.json", lambda c: c.update(
        sp_model_kwargs={"model_file": str(x / "bpe.txt.gz")})), ELSEWHERE),
    "hf-attention-kernel": ("hf", lambda d, x: _json(d / "config.json", lambda c: c.update(
        _attn_implementation="kernels-community/evil-attention")), ELSEWHERE + " 'kernels-community/evil-attention'"),
    "hf-attention-other": ("hf", lambda d, x: _json(d / "config.json", lambda c: c["vision_config"].update(
        attn_implementation="flash_attention_2")), "is not one HiPP runs"),
    "hf-weights-outside": ("hf", lambda d, x: _json(d / "config.json", lambda c: c.update(
        transformers_weights="../decoy/x.safetensors")), ELSEWHERE),
    "hf-weights-pickle": ("hf", lambda d, x: _json(d / "config.json", lambda c: c.update(
        transformers_weights="adapter_model.bin")), "safetensors weights only"),
    "hf-weight-index": ("hf", lambda d, x: ((d / "model.safetensors").unlink(), _json(
        d / "model.safetensors.index.json", lambda c: c.update(metadata={}, weight_map={
            "logit_scale": "../decoy/x.safetensors"})))[1], ELSEWHERE),
    "hf-adapter": ("hf", lambda d, x: _json(d / "adapter_config.json", lambda c: c.update(
        peft_type="LORA", base_model_name_or_path="evil-org/evil-clip")), "PEFT adapter"),
    "hf-quantized": ("hf", lambda d, x: _json(d / "config.json", lambda c: c.update(
        quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})), "quantized"),
    # exports: pruned_config.json carries the base's model_cfg, fed to the same builders
    "oc-export-model-cfg": ("oc_export", lambda d, x: _json(d / PRUNED_CONFIG_NAME, lambda c: _text(c).update(
        hf_model_name="evil-org/evil-bert")), ELSEWHERE),
    "oc-export-timm": ("oc_export", lambda d, x: _json(d / PRUNED_CONFIG_NAME, lambda c: _vision(c).update(
        timm_model_name="hf-hub:evil-org/evil-vit", timm_model_pretrained=True)), ELSEWHERE),
    "oc-export-tokenizer": ("oc_export", _oc_remote_tokenizer, REMOTE),
    "hf-export-auto-map": ("hf_export", lambda d, x: _json(d / PRUNED_CONFIG_NAME, lambda c: c["model_cfg"].update(
        auto_map={"AutoModel": "evil.EvilModel"})), REMOTE + " (auto_map)"),
    "hf-export-model-type": ("hf_export", lambda d, x: _json(d / PRUNED_CONFIG_NAME, lambda c: c["model_cfg"].update(
        model_type="evil")), "HiPP prunes clip and siglip"),
    "hf-export-attention": ("hf_export", lambda d, x: _json(d / PRUNED_CONFIG_NAME, lambda c: c["model_cfg"][
        "text_config"].update(_attn_implementation="kernels-community/evil")), ELSEWHERE),
    "hf-export-tokenizer-auto-map": ("hf_export", lambda d, x: _json(d / "tokenizer_config.json", lambda c: c.update(
        auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})), REMOTE),
    "hf-export-config-json": ("hf_export", lambda d, x: _json(d / "config.json", lambda c: c.update(
        model_type="clip", auto_map={"AutoConfig": "evil.EvilConfig"})), REMOTE),
    "hf-export-vocab-file": ("hf_export", lambda d, x: _json(d / "tokenizer_config.json", lambda c: c.update(
        vocab_file=str(x / "vocab.json"))), ELSEWHERE),
}


def malicious(name: str, bases: dict, tmp_path: Path, decoy: Path) -> tuple[Path, Path]:
    base, make, _ = CASES[name]
    folder = tmp_path / "model"
    shutil.copytree(bases[base], folder)
    marker = tmp_path / "marker"
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    (decoy / "clip" / "evil.py").write_text(EVIL.format(marker=str(marker)))
    make(folder, decoy)
    return folder, marker


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_malicious_folder_is_refused_in_one_line(name, bases, decoy, tmp_path, capsys):
    folder, marker = malicious(name, bases, tmp_path, decoy)
    needle = CASES[name][2]
    with watched(decoy) as seen:
        assert_bad(*cli(capsys, "eval", "--model", folder, "--data", "shapes"), needle)
        for api in (load_model, get_tokenizer, get_preprocess):
            with pytest.raises(HippError, match="^[^\n]*$") as e:
                api(folder)
            assert needle in str(e.value), (api.__name__, str(e.value))
    assert seen == [] and not marker.exists()


def test_the_folders_are_real_exploits(bases, decoy, tmp_path):
    """Without HiPP's checks the libraries do run evil.py: open_clip's local-dir tokenizer on its own,
    transformers for the folders' auto_map once remote code is trusted (as the open_clip route asks)."""
    script = ["import sys, open_clip, transformers",
              "open_clip.get_tokenizer('local-dir:' + sys.argv[1])"]
    folders = {}
    for i, (name, call) in enumerate((("hf-config-auto-map", "AutoConfig"),
                                      ("hf-tokenizer-auto-map", "AutoTokenizer"),
                                      ("hf-preprocessor-auto-map", "AutoImageProcessor")), start=2):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        script.append(f"transformers.{call}.from_pretrained(sys.argv[{i}], trust_remote_code=True)")
    runs = [malicious("oc-tokenizer-remote-code", bases, tmp_path / "oc", decoy)]
    for name, root in folders.items():
        runs.append(malicious(name, bases, root, decoy))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", "\n".join(script), *(str(f) for f, _ in runs)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(marker.exists() for _, marker in runs)


def test_names_that_are_neither_folders_nor_known_reach_no_library(tmp_path):
    """open_clip's own schemes would read a folder (local-dir:) or the hub (hf-hub:) past the checks."""
    evil = tmp_path / "evil"
    evil.mkdir()
    for spec in (f"local-dir:{evil}", "hf-hub:evil-org/evil-clip", "ViT-Z-99"):
        for api in (load_model, get_tokenizer, get_preprocess):
            with pytest.raises(HippError, match="neither a model folder"):
                api(spec)


# --- what stays accepted ---

def test_legitimate_folders_still_load(bases, tmp_path):
    from PIL import Image

    image = Image.new("RGB", (40, 50))
    with watched(tmp_path) as seen:  # nothing fetched: no network at all
        for folder in (TEACHER_DIR, bases["oc"], bases["hf"], bases["oc_export"], bases["hf_export"]):
            model = load_model(folder)
            tokens = get_tokenizer(folder)(["a small red circle"])
            assert tokens.shape[0] == 1 and get_preprocess(folder)(image).dim() == 3, folder
            with torch.no_grad():
                assert model.encode_text(tokens).shape[0] == 1
    assert seen == []


def test_hub_style_metadata_is_accepted(bases, tmp_path):
    """Folders saved from hub checkpoints record where they came from (often the saver's own absolute
    paths); transformers never opens those values, so they are not refused. A SigLIP folder saved by
    save_pretrained loads too."""
    from test_hf_backend import tiny_hf

    folder = tmp_path / "from-hub"
    shutil.copytree(bases["hf"], folder)
    _json(folder / "config.json", lambda c: (c.update(_name_or_path="openai/clip-vit-base-patch32"),
                                             c["text_config"].update(tokenizer_class=None, auto_map=None)))
    _json(folder / "tokenizer_config.json", lambda c: c.update(
        name_or_path="openai/clip-vit-base-patch32", tokenizer_class="CLIPTokenizer",
        special_tokens_map_file="/home/someone/.cache/huggingface/special_tokens_map.json"))
    assert get_tokenizer(folder)(["a red circle"]).shape == (1, 32)
    assert load_model(folder).model_type == "clip"
    siglip = tmp_path / "siglip"
    tiny_hf("siglip").hf.save_pretrained(siglip)
    assert load_model(siglip).model_type == "siglip"


def _spy(monkeypatch, owner, calls):
    original = owner.from_pretrained

    def from_pretrained(*args, **kwargs):
        calls.append((owner.__name__, kwargs))
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, "from_pretrained", from_pretrained)


def test_every_from_pretrained_is_local_and_trusts_no_code(bases, monkeypatch):
    import transformers

    calls = []
    for owner in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoImageProcessor,
                  transformers.CLIPModel):
        _spy(monkeypatch, owner, calls)
    load_model(bases["hf"])
    get_tokenizer(bases["hf"])
    get_tokenizer(bases["hf_export"])
    assert {name for name, _ in calls} == {"AutoConfig", "AutoTokenizer", "AutoImageProcessor", "CLIPModel"}
    assert all(k.get("trust_remote_code") is False and k.get("local_files_only") is True for _, k in calls), calls


def test_a_hub_id_may_use_the_hub_but_never_its_code(monkeypatch):
    import transformers

    calls = []

    def offline(spec, **kwargs):  # the hub itself is out of reach here
        calls.append(kwargs)
        raise OSError("offline")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(HippError, match="cannot load the transformers config"):
        hf_backend.load("evil-org/not-in-the-cache")
    assert calls == [{"trust_remote_code": False}]
