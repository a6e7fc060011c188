"""A published repo loads with trust_remote_code=True on a machine without hf_fff.

The load runs in a subprocess in isolated mode (-I) whose import system refuses `hf_fff` outright (so an
editable or regular install of the package cannot leak in), against the fake Hub, with a fresh HF home.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_fff  # registers the model type with the Auto classes
from conftest import HUB_TOKEN, HUB_USER
from hf_fff.tools.hub import PublishError, push_to_hub, remote_code_sources

BLOCK_HF_FFF = textwrap.dedent(
    """
    import importlib.abc, sys

    class _NoHfFff(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_fff" or name.startswith("hf_fff."):
                raise ModuleNotFoundError(f"No module named {name!r} (hf_fff is blocked in this test)", name=name)
            return None

    sys.meta_path.insert(0, _NoHfFff())
    """
)

LOAD_REMOTE = textwrap.dedent(
    """
    import sys
    try:
        import hf_fff  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("hf_fff is importable: the test would prove nothing")

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    repo, inputs_path, out_path = sys.argv[1:4]
    inputs = load_file(inputs_path)
    mlm = AutoModelForMaskedLM.from_pretrained(repo, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
    with torch.no_grad():
        logits = mlm(**inputs).logits
        hidden = base(**inputs).last_hidden_state
    assert type(mlm).__module__.startswith("transformers_modules."), type(mlm).__module__
    assert not [m for m in sys.modules if m == "hf_fff" or m.startswith("hf_fff.")]
    ids = torch.tensor(tokenizer("the quick brown fox")["input_ids"])
    save_file({"logits": logits.contiguous(), "hidden": hidden.contiguous(), "ids": ids}, out_path)
    print("loaded", type(mlm).__name__, type(mlm).__module__)
    """
)


def test_exported_code_is_flat_torch_only_and_complete():
    sources = remote_code_sources()
    assert set(sources) == {"configuration_ultrafastbert.py", "modeling_ultrafastbert.py", "crammed.py", "ops.py"}
    for name, text in sources.items():
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                module = node.module or node.names[0].name
                assert f"{module.split('.')[0]}.py" in sources, f"{name} imports .{module}, which is not shipped"
            if isinstance(node, ast.ImportFrom) and not node.level:
                assert (node.module or "").split(".")[0] != "hf_fff", name
    ops_names = {n.name for n in ast.parse(sources["ops.py"]).body if isinstance(n, ast.FunctionDef)}
    assert {"fast_feedforward", "fff_forward"} <= ops_names
    assert "custom_op" not in sources["ops.py"] and "backends" not in sources["ops.py"].split('"""', 2)[2]


def test_export_refuses_code_that_would_not_load(tmp_path: Path):
    """A relative import of something the export does not ship (the JIT extension, say) is caught at export time."""
    package = Path(hf_fff.__file__).parent
    copy = tmp_path / "hf_fff"
    (copy / "backends").mkdir(parents=True)
    for name in ("configuration_ultrafastbert.py", "modeling_ultrafastbert.py", "crammed.py", "backends/reference.py"):
        (copy / name).write_text((package / name).read_text())
    assert set(remote_code_sources(copy)) == set(remote_code_sources())
    with open(copy / "modeling_ultrafastbert.py", "a") as handle:
        handle.write("\nfrom .extension import load_extension\n")
    with pytest.raises(PublishError, match="extension"):
        remote_code_sources(copy)
    with open(copy / "crammed.py", "a") as handle:
        handle.write("\nimport hf_fff\n")
    (copy / "modeling_ultrafastbert.py").write_text((package / "modeling_ultrafastbert.py").read_text())
    with pytest.raises(PublishError, match="hf_fff"):
        remote_code_sources(copy)


def test_remote_ops_match_the_package(converted_tiny: Path):
    """The shipped ops.py computes what hf_fff's FFF op computes, gradients included."""
    namespace: dict = {"__name__": "remote_ops"}
    exec(compile(remote_code_sources()["ops.py"], "ops.py", "exec"), namespace)  # noqa: S102 - our own generated module
    generator = torch.Generator().manual_seed(0)
    depth, trees, width = 3, 2, 16
    rows = trees * (2 ** (depth + 1) - 1)
    x = torch.randn(2, 5, width, generator=generator, requires_grad=True)
    w_in = torch.randn(rows, width, generator=generator, requires_grad=True)
    b_in = torch.randn(rows, generator=generator, requires_grad=True)
    w_out = torch.randn(rows, width, generator=generator, requires_grad=True)
    y_remote, leaves_remote = namespace["fast_feedforward"](x, w_in, b_in, w_out, depth)
    grads_remote = torch.autograd.grad(y_remote.square().sum(), (x, w_in, b_in, w_out))
    y_pkg, leaves_pkg = hf_fff.fast_feedforward(x, w_in, b_in, w_out, depth)
    grads_pkg = torch.autograd.grad(y_pkg.square().sum(), (x, w_in, b_in, w_out))
    assert torch.equal(leaves_remote, leaves_pkg)
    torch.testing.assert_close(y_remote, y_pkg, rtol=1e-5, atol=1e-6)
    for remote, packaged in zip(grads_remote, grads_pkg, strict=True):
        torch.testing.assert_close(remote, packaged, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_published_repo_loads_with_trust_remote_code_without_hf_fff(lfs_hub, hub_token, converted_tiny: Path, tmp_path: Path):
    from transformers import AutoModel, AutoModelForMaskedLM

    repo = f"{HUB_USER}/ufb-remote"
    report = push_to_hub(converted_tiny, repo)
    assert report.remote_code
    config = json.loads(lfs_hub.file_bytes(repo, "config.json"))
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_ultrafastbert.UltraFastBertForMaskedLM"
    assert config["auto_map"]["AutoConfig"] == "configuration_ultrafastbert.UltraFastBertConfig"
    card = lfs_hub.file_bytes(repo, "README.md").decode()
    assert "trust_remote_code=True" in card and "without" in card.lower()

    generator = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.randint(0, 512, (2, 9), generator=generator),
        "attention_mask": torch.tensor([[1] * 9, [1] * 6 + [0] * 3]),
    }
    inputs_path, out_path = tmp_path / "inputs.safetensors", tmp_path / "remote.safetensors"
    save_file(inputs, inputs_path)

    home = tmp_path / "machine-without-hf_fff"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "HF_HOME": str(home / "hf"),
        "HF_ENDPOINT": lfs_hub.url,
        "HF_TOKEN": HUB_TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
    }
    result = subprocess.run(
        [sys.executable, "-I", "-c", BLOCK_HF_FFF + LOAD_REMOTE, repo, str(inputs_path), str(out_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loaded UltraFastBertForMaskedLM transformers_modules." in result.stdout

    remote = load_file(out_path)
    local_mlm = AutoModelForMaskedLM.from_pretrained(converted_tiny).eval()
    local_base = AutoModel.from_pretrained(converted_tiny).eval()
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], local_mlm(**inputs).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(remote["hidden"], local_base(**inputs).last_hidden_state, rtol=1e-5, atol=1e-5)
    from transformers import AutoTokenizer

    assert remote["ids"].tolist() == AutoTokenizer.from_pretrained(converted_tiny)("the quick brown fox")["input_ids"]


def test_blocker_really_blocks_hf_fff(tmp_path: Path):
    """The subprocess set-up itself: without the blocker the installed package would be found."""
    code = BLOCK_HF_FFF + "import hf_fff\n"
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "hf_fff is blocked" in result.stderr
