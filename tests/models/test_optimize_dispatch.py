"""The optimize() entry point: dispatch, the no-match warning, the handle's contract."""
import pytest
import torch

import turbotune
from turbotune.models import dispatch as opt_mod


def test_rejects_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        turbotune.optimize("not a model")


def test_unknown_model_warns_and_runs_stock():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="no model path recognises Sequential"):
        handle = turbotune.optimize(model)
    assert handle.kind == "none" and handle.model is model and not handle.active
    assert handle.revert() is model


def test_dispatch_first_match_and_revert(monkeypatch):
    calls = []

    def apply(model, **options):
        old = model.forward
        model.forward = lambda x: old(x) * 2

        def undo():
            del model.forward
            calls.append("undo")

        calls.append(("apply", options))
        return opt_mod.OptimizeHandle(model, "toy", undo, ["doubled the output"], options)

    monkeypatch.setattr(opt_mod, "_PATHS", {})
    opt_mod.register_path("toy", lambda m: isinstance(m, torch.nn.Linear), apply, "toy path")
    opt_mod.register_path("never", lambda m: True, lambda m, **o: pytest.fail("second path must not run"))
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    ref = lin(x)
    with turbotune.optimize(lin, dtype=None) as handle:
        assert handle.kind == "toy" and handle.active
        torch.testing.assert_close(lin(x), ref * 2)
        with pytest.raises(RuntimeError, match="already optimized"):
            turbotune.optimize(lin)
    assert not handle.active and calls == [("apply", {"dtype": None}), "undo"]
    assert torch.equal(lin(x), ref)
    handle.revert()  # idempotent
    assert calls.count("undo") == 1
    assert not hasattr(lin, "_turbotune_handle")
    assert opt_mod.registered_paths() == {"toy": "toy path", "never": ""}
