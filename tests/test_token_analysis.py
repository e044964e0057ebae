"""Token Routing's analyses (eq. 1-3) against eager `output_attentions` / `output_hidden_states` of the stock model."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from harness.cli import main
from harness.method import create_method
from harness.state import Kind
from harness.token_analysis import Observer
from tests.conftest import QUERY
from tests.reference import assembled_sequence


def test_analyses_equal_eager_attentions_and_hidden_states(tiny_eager, image):
    observer = Observer(create_method("none"))
    r = tiny_eager.segment(image, QUERY, observer)
    state = assembled_sequence(tiny_eager, image, QUERY, create_method("none"))
    with torch.inference_mode():
        out = tiny_eager.language_model(inputs_embeds=state.hidden, output_attentions=True,
                                        output_hidden_states=True, use_cache=False)
    image_keys = state.kind == Kind.IMAGE
    carrier = int(state.row_of(Kind.SEG)[0]) - 1
    got = {(x["layer"], x["metric"], x["kind"]): x["value"] for x in observer.rows}
    for layer in range(8):
        mass = out.attentions[layer][0].mean(0)[:, image_keys].sum(-1)  # head mean, then mass on image keys
        assert got[layer, "img_attn", "all"] == pytest.approx(float(mass.mean()), abs=1e-6)
        assert got[layer, "mask2img", "mask"] == pytest.approx(float(mass[carrier]), abs=1e-6)
        h = out.hidden_states[layer][0]
        for kind in Kind:
            rows = h[state.kind == kind]
            want = float(torch.log(rows.std(0) + 1e-5).sum()) if len(rows) >= 2 else math.nan
            assert got[layer, "entropy", kind.name.lower()] == pytest.approx(want, rel=1e-5, abs=1e-4, nan_ok=True)
    assert got[7, "mask2img", "mask"] != got[1, "mask2img", "mask"]
    assert r.ledger.method == []  # analysis is charged to nothing
    assert r.flops == tiny_eager.segment(image, QUERY, "none").flops


def test_a_held_mask_token_has_no_attention_until_it_enters(tiny, image):
    observer = Observer(create_method("routing:mask_tokens=carrier,image=full"))
    tiny.segment(image, QUERY, observer)
    mask = [x["value"] for x in observer.rows if x["metric"] == "mask2img"]
    assert all(math.isnan(v) for v in mask[:4]) and not any(math.isnan(v) for v in mask[4:])


def test_cli_on_a_model_and_on_a_run_folder(tmp_path):
    cli = CliRunner()
    result = cli.invoke(main, ["analyze", "random:tiny", "--dataset", "toy:val", "--limit", "2", "--method", "none",
                               "--method", "fastv", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "token_analysis.png").is_file()
    csv = (tmp_path / "a" / "token_analysis.csv").read_text().splitlines()
    assert csv[0] == "method,layer,metric,kind,value,n" and len(csv) == 1 + 2 * 8 * (2 + 5)
    run = tmp_path / "run"
    assert cli.invoke(main, ["run", "--model", "random:tiny", "--method", "none", "--dataset", "toy:val", "--limit",
                             "1", "--out", str(run)]).exit_code == 0
    result = cli.invoke(main, ["analyze", str(run), "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert (run / "token_analysis" / "token_analysis.csv").is_file() and result.output.startswith("none: ")
    bad = cli.invoke(main, ["analyze", str(tmp_path / "a")])  # a folder that is neither a run nor a model
    assert bad.exit_code == 2 and bad.output.startswith("error: ")
